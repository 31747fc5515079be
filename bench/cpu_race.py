"""Race our training step against the PyTorch reference on this machine, alternately.

For each depth, runs ``python -m pipeline.bench model=resnet<depth> data=synthetic
bench.which=[synthetic]`` (the training step on one in-memory batch) and the
reference ``torch_resnet_cifar.py --depth <depth>`` (the same network, batch and
SGD step in PyTorch eager mode, channels_last) one after the other, ``--rounds``
times, and prints each pair and the median ratio. The machine is noisy: only a
ratio measured side by side means anything.

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 numpy
    python bench/cpu_race.py --torch-python /tmp/torch/bin/python --depths 20 56
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "bench" / "torch_resnet_cifar.py"


def ours(depth: int, batch: int, steps: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable,
            "-m",
            "pipeline.bench",
            f"model=resnet{depth}",
            "data=synthetic",
            f"data.batch_size={batch}",
            "data.image_size=32",
            "bench.which=[synthetic]",
            f"bench.steps={steps}",
            "bench.windows=3",
            "bench.warmup_steps=5",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        result = json.loads((Path(run_dir) / "bench.json").read_text())
    return float(result["images_per_sec"]["synthetic"])


def theirs(python: str, reference: Path, depth: int, batch: int, steps: int) -> float:
    cmd = [python, str(reference), "--depth", str(depth), "--batch", str(batch)]
    out = subprocess.run(cmd + ["--steps", str(steps)], check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python with torch installed")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("overrides", nargs="*", help="extra pipeline.bench overrides")
    args = parser.parse_args()
    summary = {}
    for depth in args.depths:
        pairs = []
        for round_ in range(1, args.rounds + 1):
            a = ours(depth, args.batch, args.steps, args.overrides)
            b = theirs(args.torch_python, args.reference, depth, args.batch, args.steps)
            pairs.append((a, b))
            print(
                f"resnet{depth} round {round_}/{args.rounds}: pipeline {a:.0f} images/s, "
                f"torch {b:.0f} images/s, ratio {a / b:.2f}",
                flush=True,
            )
        ratio = statistics.median(a / b for a, b in pairs)
        summary[f"resnet{depth}"] = {"pairs": pairs, "median_ratio": ratio}
        print(f"resnet{depth}: median ratio pipeline/torch {ratio:.2f}\n", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
