"""The config layer: the only code besides the commands that reads a ``DictConfig``.

Commands (``pipeline.train``, ``evaluate``, ``export``, ``bench``, ...) compose a
config with Hydra and hand it here: ``check_config`` checks the choices that
would otherwise fail much later, and the factories below turn config sections
into typed arguments and ready objects for the libraries (data, models,
training). TensorFlow is imported only once the config is known to be good.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.data.sources import list_sources
from pipeline.errors import PipelineError
from pipeline.evaluation.tta import TTA_MODES
from pipeline.training import devices as devices_mod

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
BACKENDS = ("tensorflow", "jax")
CHOICES = {
    "backend": BACKENDS,
    "trainer.strategy": devices_mod.STRATEGIES,
    "trainer.precision": devices_mod.PRECISIONS,
    "trainer.jit_compile": devices_mod.JIT_CHOICES,
    "trainer.adversarial": ("none", "fgsm_rs", "pgd"),
    "trainer.tta": TTA_MODES,
    "export.tta": TTA_MODES,
    "augment.flip": (True, False, "alternating"),
    "augment.pad_mode": ("zeros", "reflect"),
    "schedule.name": ("constant", "step", "cosine", "linear"),
    "data.source": tuple(list_sources()),
    "data.resize": ("crop", "pad", "stretch"),
}
HPARAM_KEYS = (  # logged for the HParams dashboard, with whatever the command line overrides
    "model.arch",
    "optimizer.lr",
    "optimizer.weight_decay",
    "data.batch_size",
    "data.image_size",
    "trainer.epochs",
    "trainer.label_smoothing",
    "schedule.name",
    "augment.crop_padding",
    "augment.mixup_alpha",
    "augment.cutmix_alpha",
    "seed",
)
NOT_HPARAMS = (
    "resume",
    "trainer.verbose",
    "trainer.profile_batches",
    "export.formats",
    "export.tta",
    "data.cache_dir",
)


def check_config(cfg: DictConfig) -> None:
    """Checks the choices TensorFlow would otherwise trip over much later.

    Raises:
        PipelineError: naming the key, the value received and the valid ones.
    """
    from pipeline import security

    security.check_targets(cfg)  # every _target_ allowlisted before anything is instantiated
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and value not in valid:
            shown = ", ".join(str(v).lower() if isinstance(v, bool) else v for v in valid)
            raise PipelineError(f"{key} must be one of {shown}; got {value!r}")
    for key in ("trainer.epochs", "data.batch_size", "data.image_size"):
        if int(OmegaConf.select(cfg, key)) < 1:
            raise PipelineError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    formats = list(cfg.export.formats or [])
    if formats:
        from pipeline import exporting

        try:
            exporting.check_formats(formats, tta=cfg.export.get("tta", "none"))
        except PipelineError as err:
            raise PipelineError(f"export: {err}") from err
    if cfg.optimizer.lr <= 0 or cfg.optimizer.ref_batch < 1:
        raise PipelineError(
            f"optimizer.lr must be > 0 and optimizer.ref_batch >= 1, got "
            f"{cfg.optimizer.lr} and {cfg.optimizer.ref_batch}"
        )
    if cfg.get("backend") == "jax" and cfg.trainer.get("adversarial", "none") != "none":
        raise PipelineError(
            f"trainer.adversarial={cfg.trainer.adversarial} needs backend=tensorflow "
            "(its attack step uses tf.GradientTape)"
        )
    if cfg.trainer.get("adversarial", "none") != "none":
        from pipeline.training import adversarial

        try:
            adversarial.check(**adversarial_options(cfg.trainer))
        except ValueError as err:
            raise PipelineError(f"trainer.{err}") from err


def select_backend(backend: str) -> None:
    """Points Keras at ``backend`` (``tensorflow`` or ``jax``); call before Keras is imported.

    Raises:
        PipelineError: an unknown backend, or Keras already imported with another one
            (a second ``train(cfg)`` in one process cannot switch).
    """
    if backend not in BACKENDS:
        raise PipelineError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != backend:
            raise PipelineError(
                f"backend={backend} asked for, but Keras is already imported with the "
                f"{current} backend in this process; run a fresh process."
            )
        return
    os.environ["KERAS_BACKEND"] = backend


def adversarial_options(trainer_cfg: DictConfig) -> dict:
    return {
        "method": trainer_cfg.get("adversarial", "none"),
        "eps": float(trainer_cfg.get("adversarial_eps", 0.0)),
        "steps": int(trainer_cfg.get("adversarial_steps", 1)),
        "step_size": trainer_cfg.get("adversarial_step_size"),
    }


def optimizer_factory(
    opt_cfg: DictConfig,
    *,
    schedule_cfg: DictConfig,
    global_batch: int,
    steps_per_epoch: int,
    epochs: int,
):
    """Returns (build_optimizer, peak_lr): the lr is scaled from ref_batch to the global batch."""
    from pipeline.training.schedules import WarmupSchedule

    kwargs = OmegaConf.to_container(opt_cfg, resolve=True)
    base_lr, ref_batch = kwargs.pop("lr"), kwargs.pop("ref_batch")
    peak_lr = float(base_lr) * global_batch / int(ref_batch)
    sched = OmegaConf.to_container(schedule_cfg, resolve=True)
    total = epochs * steps_per_epoch
    schedule_kwargs = {
        "peak_lr": peak_lr,
        "total_steps": total,
        "warmup_steps": min(total, _warmup_steps(sched, steps_per_epoch, total)),
        "kind": sched["name"],
        "warmup_from": sched.get("warmup_from", 0.0),
    }
    if sched["name"] == "linear":
        schedule_kwargs["final"] = sched.get("final", 0.0)
    if sched["name"] == "cosine":
        schedule_kwargs["alpha"] = sched.get("alpha", 0.0)
    if sched["name"] == "step":
        schedule_kwargs["milestones"] = tuple(sched.get("milestones", ()))
        schedule_kwargs["factor"] = sched.get("factor", 0.1)

    def build_optimizer():
        return hydra.utils.instantiate(
            kwargs, learning_rate=WarmupSchedule(**schedule_kwargs), _convert_="all"
        )

    return build_optimizer, peak_lr


def _warmup_steps(sched: dict, steps_per_epoch: int, total: int) -> int:
    """``schedule.warmup_fraction`` of all steps if set, else ``schedule.warmup_epochs``."""
    if sched.get("warmup_fraction") is not None:
        return int(round(float(sched["warmup_fraction"]) * total))
    return int(round(sched.get("warmup_epochs", 0) * steps_per_epoch))


def setup_training(cfg: DictConfig):
    """Devices, seeds, the resolved strategy/precision/XLA plan and the strategy.

    Returns:
        ``(devices, plan, strategy)``.

    Raises:
        PipelineError: an unknown model, or a combination that cannot work.
    """
    from pipeline import models

    t = cfg.trainer
    backend = cfg.get("backend", "tensorflow")
    devices = devices_mod.setup_devices(
        logical_cpus=t.logical_cpus, deterministic=t.deterministic, seed=cfg.seed, backend=backend
    )
    try:
        models.get_model(cfg.model.arch)  # an unknown name fails before data loading
    except ValueError as err:
        raise PipelineError(f"model.arch: {err}") from err
    plan = devices_mod.plan(
        strategy=t.strategy,
        precision=t.precision,
        jit_compile=t.jit_compile,
        devices=devices,
        backend=backend,
        deterministic=bool(t.deterministic),
    )
    strategy = devices_mod.make_strategy(plan.strategy, devices)
    replicas = strategy.num_replicas_in_sync
    if cfg.optimizer.get("gradient_accumulation_steps") and replicas > 1:
        raise PipelineError(
            f"optimizer.gradient_accumulation_steps={cfg.optimizer.gradient_accumulation_steps} "
            f"does not work with {replicas} replicas (Keras raises under a multi-replica "
            "strategy). Raise data.batch_size instead, or use one device."
        )
    return devices, plan, strategy


def class_weights_for(cfg: DictConfig, bundle) -> dict | None:
    """The per-class loss weights ``data.class_weights`` asks for, or None.

    Raises:
        PipelineError: a value other than null or auto.
    """
    choice = cfg.data.get("class_weights")
    if choice is None:
        return None
    if choice != "auto":
        raise PipelineError(f"data.class_weights must be null or auto, got {choice!r}")
    from pipeline import data

    return data.class_weights(bundle.stats["class_counts"], bundle.class_names)


def model_factories(cfg: DictConfig, bundle):
    """What the trainer calls under the strategy's scope to build the model and optimizer.

    Returns:
        ``(build_model, build_optimizer, peak_lr)``; the learning rate is
        ``optimizer.lr`` scaled from ``optimizer.ref_batch`` to the global batch.
    """
    from pipeline import models
    from pipeline.training import adversarial as adversarial_training

    model_section = OmegaConf.to_container(cfg.model, resolve=True)
    adversarial = adversarial_options(cfg.trainer)
    whiten_images = int(model_section.get("whiten_images", 0))  # fastnet: its whitening filters
    adapt_images = bundle.sample_images(whiten_images) if whiten_images else None

    def build_model():
        model = models.build_from_config(
            model_section,
            num_classes=bundle.num_classes,
            input_shape=bundle.image_shape,
            mean=bundle.mean,
            std=bundle.std,
            adapt_images=adapt_images,
            alternating_flip=cfg.augment.get("flip") == "alternating",
        )
        return adversarial_training.wrap(model, **adversarial)  # "none": the model itself

    build_optimizer, peak_lr = optimizer_factory(
        cfg.optimizer,
        schedule_cfg=cfg.schedule,
        global_batch=cfg.data.batch_size,
        steps_per_epoch=bundle.steps_per_epoch(),
        epochs=cfg.trainer.epochs,
    )
    return build_model, build_optimizer, peak_lr


def technique_callbacks(cfg: DictConfig, bundle) -> list:
    """The training techniques the config turns on, as callbacks (``pipeline.training.callbacks``).

    ``trainer.lookahead`` ({every, base, power}), ``trainer.freeze_after``
    ({layer name: epochs}), ``trainer.test_each_epoch`` and, for
    ``augment.flip=alternating``, the epoch parity of the model's flip layer.
    """
    from pipeline.training import callbacks

    steps_per_epoch = bundle.steps_per_epoch()
    found = []
    if cfg.augment.get("flip") == "alternating":
        found.append(callbacks.AlternatingFlipEpochs())
    lookahead = cfg.trainer.get("lookahead")
    if lookahead:
        total = int(cfg.trainer.epochs) * steps_per_epoch
        try:
            found.append(callbacks.Lookahead(total, **OmegaConf.to_container(lookahead)))
        except (TypeError, ValueError) as err:
            raise PipelineError(f"trainer.lookahead: {err}") from err
    freeze = cfg.trainer.get("freeze_after")
    if freeze:
        found.append(callbacks.FreezeLayers(OmegaConf.to_container(freeze)))
    if cfg.trainer.get("test_each_epoch"):  # after the others: it sees the weights they left
        found.append(callbacks.EvaluateEachEpoch(bundle.test, "test"))
    return found


def prepare_run_dir(cfg: DictConfig, run_dir) -> Path:
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise PipelineError("train(cfg) outside a Hydra app needs run_dir=...")
        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    config_file = path / ".hydra" / "config.yaml"
    if not config_file.exists():  # Hydra writes it for command-line runs
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(OmegaConf.to_yaml(cfg))
    return path


def require_run_dir(cfg: DictConfig) -> None:
    """Fails with a usage line when the command line gave no ``run_dir=``."""
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise PipelineError(
            "run_dir=... is required: the directory of a finished training run, "
            "e.g. run_dir=outputs/2026-01-01/12-00-00"
        )


def hparams_of(cfg: DictConfig) -> dict:
    """The run's hyperparameters: :data:`HPARAM_KEYS` plus every key the command line set."""
    from hydra.core.hydra_config import HydraConfig

    params = {key: OmegaConf.select(cfg, key, default=None) for key in HPARAM_KEYS}
    if not HydraConfig.initialized():
        return params
    hydra_cfg = HydraConfig.get()
    for override in hydra_cfg.overrides.task:
        key, _, raw = override.lstrip("+~").partition("=")
        if key.startswith("hydra") or key in NOT_HPARAMS or "/" in key or "@" in key:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (DictConfig, ListConfig)):  # a group choice (model=resnet20)
            value = hydra_cfg.runtime.choices.get(key, raw)
        params[key] = raw if value is None else value
    return params
