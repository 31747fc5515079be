"""Export a trained run: ``python -m pipeline.export run_dir=... format=saved_model [tta=flip]``.

Writes each format to ``<run_dir>/export/`` with a parity check against the
in-memory model (``export/parity.json``); see ``pipeline.exporting`` for the
formats and what each holds.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from pipeline.config import hydra_main, require_run_dir
from pipeline.errors import user_errors
from pipeline.exporting import export_run
from pipeline.terminal import quiet_tensorflow

__all__ = ["export_run", "main"]


def _print_summary(report: dict, out: Path) -> None:
    for fmt, result in report["formats"].items():
        print(
            f"  {fmt:<12} {out / result['path']}  max |diff| of probabilities "
            f"{result['max_abs_diff']:.2e} (<= {report['tolerance']:g})",
            flush=True,
        )
    if report["tta"] != "none":
        print(f"  test-time augmentation {report['tta']} (baked into the exports)", flush=True)
    print(f"  parity report {out / 'parity.json'}", flush=True)


@hydra_main("export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (see ``conf/export.yaml``)."""
    formats = list(cfg.format) if isinstance(cfg.format, ListConfig) else [cfg.format]
    with user_errors():
        require_run_dir(cfg)
        quiet_tensorflow()
        report = export_run(
            cfg.run_dir,
            formats=formats,
            checkpoint=cfg.checkpoint,
            out_dir=cfg.out_dir,
            tta=cfg.tta,
        )
    _print_summary(report, Path(cfg.out_dir) if cfg.out_dir else Path(cfg.run_dir) / "export")


if __name__ == "__main__":
    main()
