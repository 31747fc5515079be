"""Reading a finished run directory: its config, manifest, checkpoints and model.

Shared by ``pipeline.evaluate``, ``pipeline.export`` and ``pipeline.predict``:
it reads what a run recorded and rebuilds its model without composing a config.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import PipelineError
from pipeline.runs import hashes

log = logging.getLogger(__name__)

CHECKPOINTS = {
    "best": "checkpoints/best.weights.h5",  # by trainer.checkpoint_monitor
    "last": "checkpoints/last.weights.h5",  # the last finished epoch
    "final": "model.keras",  # what training ended with (EMA weights swapped in)
}


@dataclass
class Run:
    """What a training run recorded: its directory, composed config and manifest.

    Attributes:
        path: the run directory.
        config: ``.hydra/config.yaml``, as composed for training.
        manifest: ``manifest.json``.
    """

    path: Path
    config: DictConfig
    manifest: dict

    @property
    def class_names(self) -> list[str]:
        """The model's classes, in output order."""
        return list(self.manifest["data"]["class_names"])

    @property
    def image_size(self) -> int:
        """Height and width of the model's input, in pixels."""
        return int(self.manifest["data"]["image_shape"][0])

    @property
    def resize(self) -> str:
        """How images of another size are brought to ``image_size``.

        Folder and TFDS runs record ``data.resize``; digits are square and
        were stretched, which ``stretch`` (antialiased) matches for new images.
        """
        return str(self.config.data.get("resize", None) or "stretch")

    def _had_no_val_split(self) -> bool:
        return self.manifest.get("data", {}).get("counts", {}).get("val") == 0

    def weights_path(self, checkpoint: str) -> Path:
        """The file holding ``checkpoint`` (``best``, ``last`` or ``final``).

        Raises:
            PipelineError: an unknown name or a missing file.
        """
        if checkpoint not in CHECKPOINTS:
            raise PipelineError(
                f"checkpoint must be one of {', '.join(CHECKPOINTS)}; got {checkpoint!r}"
            )
        path = self.path / CHECKPOINTS[checkpoint]
        if checkpoint == "best" and not path.is_file() and self._had_no_val_split():
            log.info(
                "the run had no validation split, so no best checkpoint: using the final model"
            )
            path = self.path / CHECKPOINTS["final"]
        if not path.is_file():
            raise PipelineError(
                f"{path} does not exist: the run has no {checkpoint!r} checkpoint (did training "
                "finish an epoch?). Pick another with checkpoint=best|last|final."
            )
        return path

    def build_model(self, checkpoint: str = "best"):
        """Rebuilds the model in float32 and loads a checkpoint's weights into it.

        A mixed-precision run keeps float32 weights, so its model is rebuilt
        under the float32 policy; the global policy is put back afterwards.

        Args:
            checkpoint: ``best``, ``last`` or ``final``.

        Returns:
            A ``keras.Model`` taking 0..255 float pixels and returning logits.

        Raises:
            PipelineError: a missing checkpoint, or one that does not fit the model.
        """
        import keras

        from pipeline import models

        path = self.weights_path(checkpoint)
        hashes.verify_artifact(self.path, path)  # before a byte of it is loaded
        model_section = OmegaConf.to_container(self.config.model, resolve=True)
        data = self.manifest["data"]
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("float32")
        try:
            model = models.build_from_config(
                model_section,
                num_classes=len(data["class_names"]),
                input_shape=tuple(data["image_shape"]),
                mean=data["mean"],
                std=data["std"],
                weights=None,  # the fine-tuning start point; ours are loaded below
            )
            model.load_weights(path)
        except PipelineError as err:  # build_from_config's "model=<arch>: ..."
            raise PipelineError(f"cannot load {path} into {err}") from err
        except (ValueError, TypeError) as err:
            arch = model_section["arch"]
            raise PipelineError(f"cannot load {path} into model={arch}: {err}") from err
        finally:
            keras.mixed_precision.set_global_policy(previous)
        return model


def load_run(run_dir) -> Run:
    """Reads a run directory written by ``pipeline.train``.

    Raises:
        PipelineError: the directory or one of its records is missing.
    """
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise PipelineError(f"run_dir={str(run_dir)!r} is not a folder. Pass a training run's dir.")
    for name in ("manifest.json", ".hydra/config.yaml"):
        if not (path / name).is_file():
            raise PipelineError(
                f"run_dir={str(run_dir)!r} has no {name}: it is not a finished training run "
                "(python -m pipeline.train writes one)."
            )
    manifest = json.loads((path / "manifest.json").read_text())
    return Run(path=path, config=OmegaConf.load(path / ".hydra" / "config.yaml"), manifest=manifest)
