"""Pictures people look at rather than read: the confusion matrix and the mistakes grid.

Both are drawn for TensorBoard's image cards, which fit a picture into about
205 px of height and 390 px of width and scale it without smoothing: text drawn
small (a bitmap font) or shrunk (a larger picture) turns illegible, "36" reads
as "30" and "6" as "8". So the pictures are drawn at most :data:`CARD_HEIGHT` px
tall (a matrix of up to 10 classes, a page of mistakes) in a TrueType font of
:data:`FONT_SIZE` px, and the mistakes come in pages of :data:`PAGE_ROWS` rows.
"""

from __future__ import annotations

import numpy as np

FONT_SIZE = 13  # px: TrueType (Pillow's bundled Aileron), legible at TensorBoard's card size
CAPTION_SIZE = 12  # px: the mistakes' captions and the matrix's legend
CARD_HEIGHT = 200  # px: TensorBoard's image card shows about 205 px of height unscaled
GRID_HEIGHT = 150  # px the cells of a matrix take together, at most (up to ~10 classes)
MAX_CELL = 50  # px a side of one cell of a matrix of few classes, at most
MIN_CELL = 2  # px: a matrix of hundreds of classes is a heat map
LABEL_CHARS = 12  # class names longer than this are shortened (with "~")
MISTAKE_TILE = 64  # px a side of one image in the mistakes grid
MISTAKE_TEXT = 76  # px of caption width under each image
GRID_COLUMNS = 4
PAGE_ROWS = 2  # rows of mistakes per TensorBoard image (a card shows one page at a time)
BLUE = np.array([8, 48, 107], np.float64)  # the colour of a full row in the heat map
TRUE_INK, PREDICTED_INK = (0, 110, 40), (190, 20, 20)
CONFUSION_MATRIX_TAG = "images/confusion_matrix"  # TensorBoard tags (runs validation, eval)
MISTAKES_TAG = "images/mistakes"
LEGEND = "green: true class; red: predicted, confidence"


def font(size: int = FONT_SIZE):
    """Pillow's bundled TrueType font at ``size`` px."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_confusion_matrix(cm: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Draws a confusion matrix as a heat map: rows true, columns predicted.

    Each cell's colour is its share of the row (the class's recall on the
    diagonal). Cells a line of text tall show that share in percent (blank
    for none); cells two lines tall also show the count. Rows are labelled
    with the class names; columns too when the names fit, else with numbers
    that the row labels end with.

    Args:
        cm: ``[C, C]`` counts.
        class_names: the C class names, in order.

    Returns:
        ``[H, W, 3]`` uint8 image.
    """
    from PIL import Image, ImageDraw

    cm = np.asarray(cm)
    layout = matrix_layout(cm, [str(c) for c in class_names])
    image = Image.new("RGB", layout["size"], "white")
    draw = ImageDraw.Draw(image)
    _draw_cells(draw, cm, layout)
    text = font()
    top, left = layout["top"], layout["left"]
    cell_w, cell_h = layout["cell"]
    for i, (row, column) in enumerate(zip(layout["rows"], layout["columns"], strict=True)):
        draw.text((left - 6, top + (i + 0.5) * cell_h), row, fill="black", font=text, anchor="rm")
        draw.text(
            (left + (i + 0.5) * cell_w, top - 3), column, fill="black", font=text, anchor="md"
        )
    height = layout["size"][1]
    draw.text((4, height - 4), layout["legend"], fill="black", font=font(CAPTION_SIZE), anchor="ld")
    return np.asarray(image)


def matrix_layout(cm: np.ndarray, names: list[str]) -> dict:
    """Cell size, lines of text per cell, labels and picture size for ``len(names)`` classes."""
    text = font()
    line = sum(text.getmetrics())
    n = len(names)
    cell_h = int(np.clip(GRID_HEIGHT // max(n, 1), MIN_CELL, MAX_CELL))
    lines = 2 if cell_h >= 2 * line + 4 else 1 if cell_h >= line - 2 else 0
    widest = {0: "", 1: "100", 2: max("100%", str(int(cm.max(initial=0))), key=len)}[lines]
    cell_w = max(cell_h, _width(text, widest) + 5) if lines else cell_h
    short = [_shorten(name, LABEL_CHARS) for name in names]
    rows, columns = ([""] * n,) * 2
    if lines and all(_width(text, name) <= cell_w - 4 for name in short):
        rows, columns = short, short
    elif lines:
        rows, columns = [f"{name} {i}" for i, name in enumerate(short)], [str(i) for i in range(n)]
    legend = "rows: true class, columns: predicted"
    legend += {0: "; colour: share of row", 1: "; % of row", 2: "; % of row, count"}[lines]
    left = 4 + (max(_width(text, r) for r in rows) + 10 if lines else 0)
    top = 4 + (line + 2 if lines else 0)
    width = max(left + n * cell_w + 4, _width(font(CAPTION_SIZE), legend) + 8)
    height = top + n * cell_h + sum(font(CAPTION_SIZE).getmetrics()) + 6
    return {
        "cell": (cell_w, cell_h),
        "lines": lines,
        "rows": rows,
        "columns": columns,
        "legend": legend,
        "left": left,
        "top": top,
        "size": (width, height),
    }


def _draw_cells(draw, cm: np.ndarray, layout: dict) -> None:
    """The heat map's cells, each with its share of the row (and count) when there is room."""
    text = font()
    (cell_w, cell_h), lines = layout["cell"], layout["lines"]
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            colour = tuple(int(c) for c in 255 - share[i, j] * (255 - BLUE))
            x0, y0 = layout["left"] + j * cell_w, layout["top"] + i * cell_h
            grid = (225, 225, 225) if lines else colour
            draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=colour, outline=grid)
            if not lines or not cm[i, j]:
                continue
            percent = 100 * share[i, j]
            label = "<1" if percent < 0.5 else f"{percent:.0f}"
            if lines == 2:
                label = f"{label}%\n{int(cm[i, j])}"
            ink = "white" if share[i, j] > 0.5 else "black"
            centre = (x0 + cell_w / 2, y0 + cell_h / 2)
            draw.multiline_text(centre, label, fill=ink, font=text, anchor="mm", align="center")


def render_mistakes(
    images: list[np.ndarray],
    captions: list[tuple[str, str]],
    rows: int | None = None,
    legend: bool = True,
) -> np.ndarray:
    """Tiles images in a grid of :data:`GRID_COLUMNS` columns, each with two caption lines.

    Images are scaled to :data:`MISTAKE_TILE` px (by a whole factor when
    smaller, without smoothing); the first caption line is drawn green (the
    true class), the second red (the prediction), as a legend line says.

    Args:
        images: uint8 ``[H, W, 3]`` images.
        captions: (true class, prediction) text per image.
        rows: rows of the grid; None: as many as the images need. A fixed
            number gives pages of the same size.
        legend: end with the line that says which colour is which.

    Returns:
        ``[H, W, 3]`` uint8 image (a short note when ``images`` is empty).
    """
    from PIL import Image, ImageDraw

    small = font(CAPTION_SIZE)
    if not images:
        image = Image.new("RGB", (240, 40), "white")
        ImageDraw.Draw(image).text((8, 12), "no misclassified images", fill="black", font=small)
        return np.asarray(image)
    line = sum(small.getmetrics())
    box_w, box_h = max(MISTAKE_TILE, MISTAKE_TEXT) + 6, MISTAKE_TILE + 2 * line + 4
    rows = rows or -(-len(images) // GRID_COLUMNS)
    note = LEGEND if legend else ""
    width = max(GRID_COLUMNS * box_w + 6, _width(small, note) + 8)
    sheet = Image.new("RGB", (width, rows * box_h + (line + 10 if legend else 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, (truth, predicted)) in enumerate(zip(images, captions, strict=True)):
        x0, y0 = (k % GRID_COLUMNS) * box_w + 6, (k // GRID_COLUMNS) * box_h + 4
        tile = _tile(img)
        sheet.paste(tile, (x0 + (box_w - 6 - tile.width) // 2, y0))
        for number, (text, ink) in enumerate(((truth, TRUE_INK), (predicted, PREDICTED_INK))):
            y = y0 + MISTAKE_TILE + 3 + number * line
            draw.text((x0, y), _fit(small, text, box_w - 8), fill=ink, font=small)
    draw.text((6, sheet.height - 4), note, fill="black", font=small, anchor="ld")
    return np.asarray(sheet)


def mistake_pages(images: list[np.ndarray], captions: list[tuple[str, str]]) -> np.ndarray:
    """The mistakes grid cut into pages of :data:`PAGE_ROWS` rows: ``[pages, H, W, 3]`` uint8.

    TensorBoard shows one page per card, with a slider to the next, each at a
    size it shows unscaled; :data:`LEGEND` goes into the card's description.
    """
    per_page = GRID_COLUMNS * PAGE_ROWS
    pages = [
        render_mistakes(images[s : s + per_page], captions[s : s + per_page], PAGE_ROWS, False)
        for s in range(0, max(len(images), 1), per_page)
    ]
    return np.stack(pages)


def _tile(img: np.ndarray):
    """``img`` fitted to :data:`MISTAKE_TILE` px: enlarged by a whole factor, or shrunk."""
    from PIL import Image

    picture = Image.fromarray(np.asarray(img, np.uint8))
    side = max(picture.size)
    if side <= MISTAKE_TILE:
        factor = MISTAKE_TILE // side
        return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    picture.thumbnail((MISTAKE_TILE, MISTAKE_TILE), Image.LANCZOS)
    return picture


def _width(font_, text: str) -> int:
    left, _, right, _ = font_.getbbox(text) if text else (0, 0, 0, 0)
    return right - left


def _fit(font_, text: str, width: int) -> str:
    """``text``, shortened with "~" until it is at most ``width`` px wide."""
    while len(text) > 1 and _width(font_, text) > width:
        text = text[:-2] + "~"
    return text


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"
