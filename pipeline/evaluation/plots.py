"""Pictures people look at rather than read: the confusion matrix and the mistakes grid."""

from __future__ import annotations

import numpy as np

MISTAKE_TILE = 96  # pixels a side of one image in the grid, at least
GRID_COLUMNS = 4
CM_MAX_SIDE = 800  # pixels: the confusion matrix's cells shrink to fit
BLUE = np.array([8, 48, 107], np.float64)  # the colour of a full row in the heat map


def render_confusion_matrix(cm: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Draws a confusion matrix as a heat map: rows true, columns predicted.

    Each cell's colour is its share of the row (the class's recall on the
    diagonal); counts and class names are written when the cells are large
    enough to hold them.

    Returns:
        ``[H, W, 3]`` uint8 image.
    """
    from PIL import Image, ImageDraw, ImageFont

    cm = np.asarray(cm)
    n = len(class_names)
    cell = int(np.clip(CM_MAX_SIDE // max(n, 1), 2, 48))
    font = ImageFont.load_default()
    labelled = cell >= 10
    names = [_shorten(str(c), 14) for c in class_names]
    margin = 8 + (max(_text_size(font, s)[0] for s in names) if labelled else 0)
    header = 22  # the axis caption
    grid = cell * n
    caption = "rows: true class, columns: predicted"
    width = max(margin + grid, _text_size(font, caption)[0] + 8) + 8
    image = Image.new("RGB", (width, header + margin + grid + 8), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), caption, fill="black", font=font)
    top = header + margin
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i in range(n):
        for j in range(n):
            colour = tuple(int(c) for c in 255 - share[i, j] * (255 - BLUE))
            x0, y0 = margin + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour)
            text = str(int(cm[i, j]))
            w, h = _text_size(font, text)
            if cell >= 18 and w < cell - 2:
                ink = "white" if share[i, j] > 0.5 else "black"
                draw.text((x0 + (cell - w) / 2, y0 + (cell - h) / 2), text, fill=ink, font=font)
    if labelled:
        for i, name in enumerate(names):
            w, h = _text_size(font, name)
            draw.text((margin - w - 4, top + i * cell + (cell - h) / 2), name, fill="black")
            label = Image.new("RGB", (w + 2, h + 2), "white")
            ImageDraw.Draw(label).text((1, 1), name, fill="black", font=font)
            label = label.rotate(90, expand=True)
            image.paste(label, (margin + i * cell + (cell - label.width) // 2, top - label.height))
    return np.asarray(image)


def render_mistakes(images: list[np.ndarray], captions: list[tuple[str, str]]) -> np.ndarray:
    """Tiles images in a grid, each upscaled and captioned with two lines.

    Args:
        images: uint8 ``[H, W, 3]`` images.
        captions: two lines of text per image.

    Returns:
        ``[H, W, 3]`` uint8 image (a short note when ``images`` is empty).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    if not images:
        image = Image.new("RGB", (240, 40), "white")
        ImageDraw.Draw(image).text((8, 12), "no misclassified images", fill="black", font=font)
        return np.asarray(image)
    side = max(images[0].shape[:2])
    scale = max(1, -(-MISTAKE_TILE // side))
    tile = side * scale
    caption_h = 2 * (_text_size(font, "Ag")[1] + 3)
    cols = min(GRID_COLUMNS, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * (tile + 6), rows * (tile + caption_h + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(4, tile // 6)
    for k, (img, lines) in enumerate(zip(images, captions, strict=True)):
        x0, y0 = (k % cols) * (tile + 6) + 3, (k // cols) * (tile + caption_h + 6) + 3
        big = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), 0)
        sheet.paste(big, (x0, y0))
        for line_no, line in enumerate(lines):
            y = y0 + tile + 2 + line_no * (caption_h // 2)
            draw.text((x0, y), _shorten(line, chars), fill="black", font=font)
    return np.asarray(sheet)


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"
