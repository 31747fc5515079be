"""Scan a folder for bad images and report them: ``python -m pipeline.data.scan``.

    python -m pipeline.data.scan data=folder data.path=/my/images

Writes ``scan_report.json`` to the run dir and prints the summary; nothing is
moved or deleted (see ``pipeline.data.quarantine``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.data.quarantine import scan_folder, summary_table
from pipeline.errors import user_errors


def main() -> None:
    """``python -m pipeline.data.scan data=folder data.path=...``: scan and report."""
    from omegaconf import DictConfig

    from pipeline.config import hydra_main

    @hydra_main("config")
    def run(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        d = cfg.data
        if d.source != "folder":
            print(f"error: scan needs data=folder, got data.source={d.source!r}", file=sys.stderr)
            sys.exit(2)
        with user_errors():
            result = scan_folder(
                d.path, min_size=d.min_size, max_pixels=d.max_pixels, cache_dir=d.cache_dir
            )
        out = Path(HydraConfig.get().runtime.output_dir) / "scan_report.json"
        out.write_text(json.dumps(result.report(), indent=2) + "\n")
        print(summary_table(result))
        print(f"Report: {out}")

    run()


if __name__ == "__main__":
    main()
