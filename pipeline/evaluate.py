"""Evaluate a trained run: ``python -m pipeline.evaluate run_dir=... [checkpoint=last]``.

Writes ``<run_dir>/eval/`` (``report.json``, ``confusion_matrix.png``,
``mistakes.png``) and logs them to TensorBoard: see ``pipeline.evaluation.report``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.config import hydra_main, require_run_dir
from pipeline.errors import user_errors
from pipeline.evaluation.report import evaluate
from pipeline.terminal import quiet_tensorflow

__all__ = ["evaluate", "main"]


@hydra_main("evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (see ``conf/evaluate.yaml``)."""
    with user_errors():
        require_run_dir(cfg)
        quiet_tensorflow()
        evaluate(
            cfg.run_dir,
            checkpoint=cfg.checkpoint,
            test_path=cfg.data.test_path,
            batch_size=cfg.data.batch_size,
            out_dir=cfg.out_dir,
            adversarial=cfg.eval.adversarial,
            eps=list(cfg.eval.eps),
            pgd_steps=cfg.eval.pgd_steps,
            step_size=cfg.eval.step_size,
            random_start=cfg.eval.random_start,
            max_examples=cfg.eval.max_examples,
            tta=cfg.eval.tta,
        )


if __name__ == "__main__":
    main()
