"""Race our training step against the PyTorch reference on this machine, alternately.

For each model, runs ``python -m pipeline.bench model=<model> data=synthetic
bench.which=[synthetic]`` (the training step on one in-memory batch) and its PyTorch
reference (the same network, batch and SGD step in eager mode, channels_last) one
after the other, ``--rounds`` times, the side that goes first alternating, and prints
each pair and the median ratio per model. The machine is noisy: only a ratio measured
side by side means anything.

- ``resnet20|32|44|56|110``: ``../shared/bench/torch_resnet_cifar.py --depth <d>``,
  batch 128 by default (He et al.'s);
- ``fastnet``: ``../shared/bench/torch_fast_cifar.py``, batch 1024 by default (the
  speed records'); ``--widths`` goes to both sides (``model.widths`` on ours).

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 numpy
    python bench/cpu_race.py --torch-python /tmp/torch/bin/python --models resnet20 resnet56
    python bench/cpu_race.py --torch-python /tmp/torch/bin/python --models fastnet --steps 10
    python bench/cpu_race.py --torch-python /tmp/torch/bin/python --models fastnet \\
        --widths 128 384 384 --steps 10 --json race.json -- trainer.steps_per_execution=4

``--depths 20 56`` is short for ``--models resnet20 resnet56``. Overrides after ``--``
go to every ``pipeline.bench`` run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE_DIR = REPO.parent / "shared" / "bench"
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)  # registered in pipeline/models/resnet_cifar.py
MODELS = (*(f"resnet{depth}" for depth in CIFAR_RESNET_DEPTHS), "fastnet")
DEFAULT_MODELS = ("resnet20", "resnet56")
RESNET_BATCH = 128  # images; He et al. (2015)
FASTNET_BATCH = 1024  # images; the batch of the CIFAR-10 speed records (airbench94)
FASTNET_WIDTHS = (64, 256, 256)  # conf/model/fastnet.yaml; 128 384 384 is the wider net
OUR_WINDOWS = 3  # pipeline.bench reports the median of this many windows of --steps steps


@dataclass(frozen=True)
class Contender:
    """One model as both sides run it.

    Attributes:
        name: our model config (``model=<name>``) and the label printed.
        batch: images per training step, both sides.
        ours: ``pipeline.bench`` overrides beyond the common ones.
        reference: the PyTorch script's file name in the reference folder.
        theirs: its arguments beyond ``--batch --steps --warmup --layout``.
        widths: fastnet's block widths, else None.
    """

    name: str
    batch: int
    ours: tuple[str, ...]
    reference: str
    theirs: tuple[str, ...]
    widths: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Timing:
    """What each side times: ``steps`` steps after ``warmup`` untimed ones."""

    steps: int
    warmup: int
    layout: str  # the reference's memory layout: channels_last | nchw


def contender(name: str, batch: int | None, widths: tuple[int, ...]) -> Contender:
    """The race settings of model ``name`` (one of ``MODELS``); ``batch`` None: its default."""
    if name == "fastnet":
        return Contender(
            name=name,
            batch=batch or FASTNET_BATCH,
            ours=(f"model.widths=[{','.join(map(str, widths))}]",),
            reference="torch_fast_cifar.py",
            theirs=("--widths", *map(str, widths)),
            widths=widths,
        )
    return Contender(
        name=name,
        batch=batch or RESNET_BATCH,
        ours=(),
        reference="torch_resnet_cifar.py",
        theirs=("--depth", name.removeprefix("resnet")),
    )


def ours(c: Contender, timing: Timing, extra: list[str]) -> float:
    """Our training step's images/s: the median window of ``pipeline.bench``."""
    with tempfile.TemporaryDirectory() as run_dir:
        _run(
            [
                sys.executable,
                "-m",
                "pipeline.bench",
                f"model={c.name}",
                "data=synthetic",
                f"data.batch_size={c.batch}",
                "data.image_size=32",
                "bench.which=[synthetic]",
                f"bench.steps={timing.steps}",
                f"bench.windows={OUR_WINDOWS}",
                f"bench.warmup_steps={timing.warmup}",
                f"hydra.run.dir={run_dir}",
                *c.ours,
                *extra,
            ]
        )
        result = json.loads((Path(run_dir) / "bench.json").read_text())
    return float(result["images_per_sec"]["synthetic"])


def theirs(python: str, reference_dir: Path, c: Contender, timing: Timing) -> float:
    """The PyTorch reference's images/s, from the JSON line it prints last."""
    stdout = _run(
        [
            python,
            str(reference_dir / c.reference),
            *c.theirs,
            "--batch",
            str(c.batch),
            "--steps",
            str(timing.steps),
            "--warmup",
            str(timing.warmup),
            "--layout",
            timing.layout,
        ]
    )
    return float(json.loads(stdout.strip().splitlines()[-1])["images_per_s"])


def _run(cmd: list[str]) -> str:
    """Runs ``cmd`` from the repository root; exits with its last lines of output if it fails."""
    try:
        done = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    except OSError as err:
        sys.exit(f"cannot run {shlex.join(cmd)}: {err}")
    except subprocess.CalledProcessError as err:
        tail = "\n".join((err.stderr or err.stdout or "").strip().splitlines()[-20:])
        sys.exit(f"failed (exit {err.returncode}): {shlex.join(cmd)}\n{tail}")
    return done.stdout


def race(
    c: Contender,
    *,
    rounds: int,
    timing: Timing,
    torch_python: str,
    reference_dir: Path,
    overrides: list[str],
) -> dict:
    """``rounds`` side-by-side pairs of model ``c``; odd rounds run ours first, even theirs.

    Running the two sides in turn, and first in turn, spreads the machine's drift
    (other jobs, heat) over both.

    Returns:
        ``{"batch", "widths", "pairs": [[ours, torch], ...], "median_ratio"}``.
    """
    label = c.name if c.widths is None else f"{c.name} {list(c.widths)}"
    pairs = []
    for round_ in range(1, rounds + 1):
        if round_ % 2:
            a = ours(c, timing, overrides)
            b = theirs(torch_python, reference_dir, c, timing)
        else:
            b = theirs(torch_python, reference_dir, c, timing)
            a = ours(c, timing, overrides)
        pairs.append([a, b])
        print(
            f"{label} batch {c.batch} round {round_}/{rounds}: pipeline {a:.0f} images/s, "
            f"torch {b:.0f} images/s, ratio {a / b:.2f}",
            flush=True,
        )
    ratio = statistics.median(a / b for a, b in pairs)
    print(f"{label}: median ratio pipeline/torch {ratio:.2f}\n", flush=True)
    widths = list(c.widths) if c.widths else None
    return {"batch": c.batch, "widths": widths, "pairs": pairs, "median_ratio": ratio}


def format_summary(summary: dict[str, dict]) -> str:
    """The table printed at the end: each model's pairs and median ratio."""
    rows = [("model", "batch", "pipeline, images/s", "torch, images/s", "ratio (median)")]
    for name, r in summary.items():
        label = name if r["widths"] is None else f"{name} {'/'.join(map(str, r['widths']))}"
        rows.append(
            (
                label,
                str(r["batch"]),
                ", ".join(f"{a:.0f}" for a, _ in r["pairs"]),
                ", ".join(f"{b:.0f}" for _, b in r["pairs"]),
                f"{r['median_ratio']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _at_least(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked; ``models`` holds the union of ``--models`` and ``--depths``."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Overrides for pipeline.bench go after --, e.g. -- trainer.steps_per_execution=4",
    )
    parser.add_argument("--torch-python", required=True, help="a Python with torch installed")
    parser.add_argument(
        "--reference-dir",
        type=Path,
        default=REFERENCE_DIR,
        help="folder of torch_resnet_cifar.py and torch_fast_cifar.py (default: %(default)s)",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=[], metavar="MODEL")
    parser.add_argument(
        "--depths", type=int, nargs="+", default=[], help="CIFAR ResNet depths: --depths 20 56"
    )
    parser.add_argument(
        "--batch",
        type=_at_least(1),
        help=f"images per step, every model (default: {RESNET_BATCH} resnets, "
        f"{FASTNET_BATCH} fastnet)",
    )
    parser.add_argument(
        "--widths",
        type=_at_least(1),
        nargs=3,
        help=f"fastnet's block widths, both sides (default: {' '.join(map(str, FASTNET_WIDTHS))})",
    )
    parser.add_argument("--rounds", type=_at_least(1), default=3)
    parser.add_argument(
        "--steps",
        type=_at_least(1),
        default=20,
        help=f"timed steps per measurement (ours: median of {OUR_WINDOWS} such windows)",
    )
    parser.add_argument("--warmup", type=_at_least(0), default=5, help="untimed steps first")
    parser.add_argument(
        "--layout",
        choices=["channels_last", "nchw"],
        default="channels_last",
        help="the reference's memory layout (ours is NHWC)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary to this JSON file")
    parser.add_argument("overrides", nargs="*", help="extra pipeline.bench overrides")
    args = parser.parse_args(argv)
    bad = [d for d in args.depths if d not in CIFAR_RESNET_DEPTHS]
    if bad:
        parser.error(f"--depths must be among {list(CIFAR_RESNET_DEPTHS)}, got {bad}")
    models = args.models + [f"resnet{d}" for d in args.depths]
    args.models = list(dict.fromkeys(models or DEFAULT_MODELS))  # in order, once each
    if args.widths and "fastnet" not in args.models:
        parser.error("--widths applies to fastnet only; add --models fastnet")
    args.widths = tuple(args.widths or FASTNET_WIDTHS)
    for name in {contender(m, None, args.widths).reference for m in args.models}:
        if not (args.reference_dir / name).is_file():
            parser.error(f"no {name} in {args.reference_dir}; pass --reference-dir")
    return args


def main() -> None:
    args = parse_args()
    timing = Timing(steps=args.steps, warmup=args.warmup, layout=args.layout)
    summary = {}
    for name in args.models:
        c = contender(name, args.batch, args.widths)
        summary[name] = race(
            c,
            rounds=args.rounds,
            timing=timing,
            torch_python=args.torch_python,
            reference_dir=args.reference_dir,
            overrides=args.overrides,
        )
    print(format_summary(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary: {args.json}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
