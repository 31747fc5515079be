"""The config layer: the only code besides the commands that reads a ``DictConfig``.

Commands (``pipeline.train``, ``evaluate``, ``export``, ``bench``, ...) compose a
config with Hydra and hand it here: ``check_config`` checks the choices that
would otherwise fail much later, and the factories below turn config sections
into typed arguments and ready objects for the libraries (data, models,
training). TensorFlow is imported only once the config is known to be good.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.data.sources import list_sources
from pipeline.errors import PipelineError
from pipeline.evaluation.tta import TTA_MODES
from pipeline.training import devices as devices_mod

log = logging.getLogger(__name__)

# conf/ at the top of a checkout (also under an editable install); pipeline/conf in a wheel
_INSTALLED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = str(
    _INSTALLED_CONF if _INSTALLED_CONF.is_dir() else Path(__file__).resolve().parent.parent / "conf"
)
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
    "trainer.checkpoint_monitor": ("val_accuracy", "val_loss", "val_top5_accuracy"),
}
POSITIVE_INTS = (
    "trainer.epochs",
    "data.batch_size",
    "data.image_size",
    "trainer.steps_per_execution",
)
# The groups whose keys are checked, and the key that picks the option files to compare
# against (None: every option of the group): data=folder's keys are not data=digits's.
KEYED_GROUPS = {
    "data": "source",
    "model": "arch",
    "optimizer": "_target_",
    "schedule": None,  # warmup_fraction and warmup_from apply to every kind
    "augment": None,
    "trainer": None,
    "logger": None,  # every option's keys: logger=[tensorboard,mlflow] holds several
}
ROOT_SECTIONS = ("export", "objective", "sweep")  # defined by conf/config.yaml itself
LOGGERS = ("tensorboard", "mlflow", "csv")  # conf/logger/: any of them (logger=[...])
CSV_FILE = "metrics.csv"  # logger=csv: under the run dir
LOCAL_TRACKING_DIR = "mlruns"  # logger=mlflow's local store, in the directory training starts in
# Keras callbacks that set the learning rate: ours is always a schedule (WarmupSchedule),
# which Keras refuses to change mid-training (TypeError at the first change)
SETS_LEARNING_RATE = ("keras.callbacks.ReduceLROnPlateau", "keras.callbacks.LearningRateScheduler")
# Keras optimizer arguments the optimizer files leave at Keras's defaults; also accepted
OPTIMIZER_KWARGS = (
    "amsgrad",
    "clipnorm",
    "clipvalue",
    "epsilon",
    "global_clipnorm",
    "loss_scale_factor",
    "ema_overwrite_frequency",
)
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
NOT_HPARAMS = (  # keys, and sections whose every key is left out
    "resume",
    "logger",
    "trainer.verbose",
    "trainer.profile_batches",
    "trainer.log_every_steps",
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
    check_keys(cfg)
    loggers(cfg)
    _callback_specs(cfg)
    _check_choices(cfg)
    _check_numbers(cfg)
    formats = list(cfg.export.formats or [])
    if formats:
        from pipeline import exporting

        try:
            exporting.check_formats(formats, tta=cfg.export.get("tta", "none"))
        except PipelineError as err:
            raise PipelineError(f"export: {err}") from err
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


def _check_choices(cfg: DictConfig) -> None:
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and value not in valid:
            shown = ", ".join(str(v).lower() if isinstance(v, bool) else v for v in valid)
            raise PipelineError(f"{key} must be one of {shown}; got {value!r}")


def _check_numbers(cfg: DictConfig) -> None:
    """Counts >= 1, a finite positive learning rate, split fractions that leave a training split."""
    for key in POSITIVE_INTS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and int(value) < 1:
            raise PipelineError(f"{key} must be >= 1, got {value}")
    lr = float(cfg.optimizer.lr)
    if not math.isfinite(lr) or lr <= 0:
        raise PipelineError(f"optimizer.lr must be > 0 and finite, got {cfg.optimizer.lr}")
    if cfg.optimizer.ref_batch < 1:
        raise PipelineError(f"optimizer.ref_batch must be >= 1, got {cfg.optimizer.ref_batch}")
    fractions = {}
    for split in ("val", "test"):
        value = cfg.data.get(f"{split}_fraction")
        if value is None or cfg.data.get(f"{split}_path"):  # a folder of its own: unused
            continue
        if not 0 <= float(value) < 1:
            raise PipelineError(f"data.{split}_fraction must be in [0, 1), got {value}")
        fractions[f"data.{split}_fraction"] = float(value)
    if sum(fractions.values()) >= 1:
        shown = " + ".join(f"{k}={v}" for k, v in fractions.items())
        raise PipelineError(f"{shown} leaves no training images: their sum must be < 1")


def check_training_split(cfg: DictConfig, *, train_count: int, class_names: list[str]) -> None:
    """Refuses a data set of one class, or a batch larger than its training split.

    Raises:
        PipelineError: naming the key, the value and the data set's size.
    """
    if len(class_names) < 2:
        raise PipelineError(
            f"data: {len(class_names)} class found ({', '.join(map(str, class_names))}); a "
            "classifier needs at least 2 (for data=folder: one subfolder per class under data.path)"
        )
    if cfg.data.batch_size > train_count:
        raise PipelineError(
            f"data.batch_size={cfg.data.batch_size} is larger than the training split "
            f"({train_count} images); set data.batch_size to at most {train_count}"
        )


def check_keys(cfg: DictConfig) -> None:
    """Refuses a key the package's config files do not define (``+trainer.epoch=3``).

    Each section of :data:`KEYED_GROUPS` is compared with the files of ``conf/<group>/``
    that describe the chosen option (with the files their ``defaults`` name); a section
    whose option no file describes (your own ``--config-dir`` option) is not compared.

    Raises:
        PipelineError: naming the unknown key, its value and the closest valid key.
    """
    for group, selector in KEYED_GROUPS.items():
        section = cfg.get(group)
        if isinstance(section, DictConfig):
            choice = section.get(selector) if selector else None
            spec = _group_spec(group, selector, choice)
            if spec and group == "optimizer":
                spec.update(dict.fromkeys(k for k in OPTIMIZER_KWARGS if k not in spec))
            if spec:
                where = f"{group} with {selector}={choice}" if selector else group
                _compare_keys(OmegaConf.to_container(section, resolve=False), spec, group, where)
    root = _option_spec(Path(CONF_DIR) / "config.yaml")
    for name in ROOT_SECTIONS:
        section = cfg.get(name)
        if isinstance(section, DictConfig) and isinstance(root.get(name), dict):
            _compare_keys(OmegaConf.to_container(section, resolve=False), root[name], name, name)


def check_overrides(args: list[str], config_name: str = "config") -> None:
    """Names the key meant by a plain override of a key conf/ lacks (``trainer.epoch=3``).

    Hydra refuses those itself but suggests ``+trainer.epoch=3``, which adds a key that
    nothing reads. Command lines with Hydra flags other than ``-m`` are left to Hydra.

    Raises:
        PipelineError: naming the override and the closest valid key.
    """
    from hydra import compose, initialize_config_dir

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return
    plain = [a for a in args if "=" in a and not a.startswith(("+", "~", "-"))]
    choices = [
        a for a in plain if not any(c in a.partition("=")[0] for c in "./@") and "," not in a
    ]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=choices)
    except Exception:  # a bad group choice: Hydra reports it itself
        return
    for arg in plain:
        key, _, value = arg.partition("=")
        parent_key, _, leaf = key.rpartition(".")
        if key.partition(".")[0] not in (*KEYED_GROUPS, *ROOT_SECTIONS) or not parent_key:
            continue
        parent = OmegaConf.select(cfg, parent_key, default=None)
        if isinstance(parent, DictConfig) and leaf not in list(parent.keys()):  # ??? is "not in"
            close = difflib.get_close_matches(leaf, [str(k) for k in parent], n=1)
            hint = f"did you mean {parent_key}.{close[0]}?" if close else "see conf/"
            raise PipelineError(
                f"{key}={value} is not a key of {parent_key}; {hint} (+{key}=... would add a "
                "key that nothing reads)"
            )


def _group_spec(group: str, selector: str | None, choice) -> dict:
    """The keys of the group's option files that ``selector=choice`` picks, merged."""
    spec: dict = {}
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        option = _option_spec(path)
        if selector is None or option.get(selector) == choice:
            _merge_spec(spec, option)
    return spec


def _option_spec(path: Path) -> dict:
    """One option file's keys (unresolved), after the group files its ``defaults`` names."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    spec: dict = {}
    for entry in raw.pop("defaults", None) or []:
        if isinstance(entry, str) and (path.parent / f"{entry}.yaml").is_file():
            _merge_spec(spec, _option_spec(path.parent / f"{entry}.yaml"))
    _merge_spec(spec, raw)
    return spec


def _merge_spec(into: dict, new: dict) -> None:
    """Unions keys; a key that is a dict in one file and not in another takes any keys (None)."""
    for key, value in new.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _merge_spec(into[key], value)
        elif isinstance(into[key], dict) or isinstance(value, dict):
            into[key] = None


def _compare_keys(section: dict, spec: dict, prefix: str, where: str) -> None:
    for key, value in section.items():
        if key not in spec:
            close = difflib.get_close_matches(str(key), [str(k) for k in spec], n=1)
            hint = (
                f"did you mean {prefix}.{close[0]}?"
                if close
                else f"valid keys: {', '.join(sorted(map(str, spec)))}"
            )
            raise PipelineError(
                f"{prefix}.{key}={value!r} is not a key of {where} (conf/ defines no such key, "
                f"so it would be ignored); {hint}"
            )
        if isinstance(spec[key], dict) and spec[key] and isinstance(value, dict):
            _compare_keys(value, spec[key], f"{prefix}.{key}", where)


def data_options(cfg: DictConfig) -> tuple[dict, str | None]:
    """The data loader's own options, and the cache directory to use (None: no cache).

    A ``data.cache_dir`` that cannot be written (read-only, not a folder) is a warning:
    the run goes on without the scan and statistics caches. TFDS keeps it: its prepared
    data are read from there.
    """
    import logging

    from pipeline.data.sources import source_options

    options = source_options(cfg.data)
    cache_dir = cfg.data.get("cache_dir")
    if not cache_dir:
        return options, None
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as err:
        logging.getLogger("pipeline.config").warning(
            "data.cache_dir=%s cannot be written (%s): going on without the scan and "
            "statistics caches",
            cache_dir,
            err.strerror or err,
        )
        if "cache_dir" in options and cfg.data.source != "tfds":
            options["cache_dir"] = None
        return options, None
    return options, str(cache_dir)


def hydra_main(config_name: str):
    """``@hydra.main`` for the commands: ``conf/<config_name>.yaml``, ``_target_``s checked first.

    Every ``_target_`` of the composed config, ``hydra:`` included, is checked
    (``pipeline.security.check_targets``) before Hydra instantiates its callbacks,
    sweeper or launcher, and so before the command runs.
    """
    import functools

    from pipeline import security

    def decorate(task):
        from pipeline.runs import sweep

        sweep.register_resolvers()  # hydra.sweep.subdir's, here and in launcher processes
        hydra_task = hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(
            task
        )

        @functools.wraps(task)
        def main(*args, **kwargs):
            with security.targets_checked_before_hydra():
                return hydra_task(*args, **kwargs)

        return main

    return decorate


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
    from pipeline import security
    from pipeline.training.schedules import WarmupSchedule

    kwargs = OmegaConf.to_container(opt_cfg, resolve=True)
    security.check_targets({"optimizer": kwargs})  # what instantiate() below builds, once more
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


SYNC_BATCHNORM = ("auto", True, False)


def sync_batchnorm(cfg: DictConfig, plan, strategy) -> bool:
    """Whether BatchNorm normalizes over the global batch (``trainer.sync_batchnorm``).

    ``auto``: on where several replicas train on the TensorFlow backend
    (``mirrored``, ``multi_worker``), so they do one device's math; under JAX
    a data-parallel batch is one global array and its statistics are global
    already.

    Raises:
        PipelineError: a value other than auto, true or false.
    """
    choice = cfg.trainer.get("sync_batchnorm", "auto")
    if choice not in SYNC_BATCHNORM:
        raise PipelineError(f"trainer.sync_batchnorm must be auto, true or false, got {choice!r}")
    several = plan.strategy in ("mirrored", "multi_worker") and strategy.num_replicas_in_sync > 1
    if choice == "auto":
        choice = several
        log.info(
            "trainer.sync_batchnorm auto -> %s (%d replica(s))",
            several,
            strategy.num_replicas_in_sync,
        )
    elif choice and cfg.get("backend", "tensorflow") != "tensorflow":
        raise PipelineError(
            "trainer.sync_batchnorm=true needs backend=tensorflow (Keras synchronizes BatchNorm "
            "only there; under JAX a data-parallel batch's statistics are global already)"
        )
    return bool(choice)


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
    ({layer name: epochs}), ``trainer.test_each_epoch``, for
    ``augment.flip=alternating`` the epoch parity of the model's flip layer, and
    last the Keras callbacks of ``trainer.callbacks`` (:func:`configured_callbacks`),
    which then see every metric the others add.
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
    return [*found, *configured_callbacks(cfg)]


def configured_callbacks(cfg: DictConfig) -> list:
    """The Keras callbacks ``trainer.callbacks`` names, built from their ``_target_``.

    ``trainer.callbacks`` maps a name of your choice to a class and its arguments
    (``{early: {_target_: keras.callbacks.EarlyStopping, monitor: val_loss, patience: 5}}``);
    a null entry is left out (an experiment's callback turned off). Only the classes in
    ``pipeline.security.ALLOWED_TARGETS`` are built, checked again right here.

    Raises:
        PipelineError: an entry that is not a mapping with a ``_target_``, a class that
            is not allowed or sets the learning rate, or arguments the class refuses.
    """
    from pipeline import security

    specs = _callback_specs(cfg)
    security.check_targets({"trainer": {"callbacks": specs}})
    built = []
    for name, spec in specs.items():
        try:
            built.append(hydra.utils.instantiate(spec, _convert_="all"))
        except Exception as err:  # Hydra wraps the class's TypeError in its own error
            cause = " ".join(str(err.__cause__ or err).split())
            args = {k: v for k, v in spec.items() if k != "_target_"}
            raise PipelineError(
                f"trainer.callbacks.{name}: {spec['_target_']} cannot be built from {args}: {cause}"
            ) from err
    return built


def _callback_specs(cfg: DictConfig) -> dict[str, dict]:
    """``trainer.callbacks`` as ``{name: {_target_, arguments}}``, null entries left out.

    Raises:
        PipelineError: not a mapping of mappings with a ``_target_``, or a class that
            sets the learning rate (:data:`SETS_LEARNING_RATE`).
    """
    section = cfg.trainer.get("callbacks")
    if section is None:
        return {}
    example = "{early: {_target_: keras.callbacks.EarlyStopping, monitor: val_loss, patience: 5}}"
    if not isinstance(section, DictConfig):
        raise PipelineError(f"trainer.callbacks must map names to callbacks, e.g. {example}")
    specs = {}
    for name, spec in section.items():
        if spec is None:
            continue
        if not isinstance(spec, DictConfig) or not isinstance(spec.get("_target_"), str):
            raise PipelineError(
                f"trainer.callbacks.{name}={spec!r} is not a callback: give a mapping with a "
                f"_target_ and the class's arguments, e.g. trainer.callbacks={example}"
            )
        if spec._target_ in SETS_LEARNING_RATE:
            raise PipelineError(
                f"trainer.callbacks.{name}: {spec._target_} sets the learning rate, which here "
                f"is a schedule (schedule={cfg.schedule.get('name')}) that Keras cannot change "
                "during training; choose the schedule instead (schedule=step, cosine, ...)"
            )
        specs[str(name)] = OmegaConf.to_container(spec, resolve=True)
    return specs


def loggers(cfg: DictConfig) -> tuple[str, ...]:
    """The loggers ``logger=`` picked: any of :data:`LOGGERS`.

    A run saved before the ``logger`` group existed logs to TensorBoard, as it did.

    Raises:
        PipelineError: a logger that is not one of :data:`LOGGERS`.
    """
    if "logger" not in cfg:
        return ("tensorboard",)
    section = cfg.logger
    names = tuple(str(name) for name in section) if isinstance(section, DictConfig) else ()
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise PipelineError(
            f"logger: {', '.join(unknown)} is not a logger; pick any of {', '.join(LOGGERS)}, "
            "e.g. logger=[tensorboard,mlflow]"
        )
    return names


def logger_callbacks(cfg: DictConfig, run_dir: Path, tracker=None) -> list:
    """The Keras callbacks of the loggers besides TensorBoard, in the order they run.

    ``csv``: Keras's CSVLogger, one row per epoch in ``<run_dir>/metrics.csv``,
    appended to (a resumed run continues its file; a resume within an epoch calls
    ``fit`` twice). ``tracker`` (an open ``pipeline.runs.tracking.MlflowRun``): its
    per-epoch metrics. Before them, the learning rate joins each epoch's logs, as
    Keras's TensorBoard callback (which runs after them) puts it there for itself.
    """
    from pipeline.runs import tracking

    found = []
    if "csv" in loggers(cfg):
        import keras

        found.append(keras.callbacks.CSVLogger(str(Path(run_dir) / CSV_FILE), append=True))
    if tracker is not None:
        found.append(tracking.EpochMetrics(tracker))
    return [tracking.LearningRateLog(), *found] if found else []


def tracking_settings(cfg: DictConfig, run_dir: Path):
    """How ``logger=mlflow`` tracks the run in ``run_dir``, or None without it.

    The store: ``logger.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
    an SQLite store in ``mlruns/`` of the directory training was started in (where
    ``outputs/`` goes): ``mlruns/mlflow.db``, artifacts under ``mlruns/artifacts``.
    SQLite whatever the MLflow version: MLflow 3 deprecates its old ``./mlruns``
    file store and warns about it, later versions refuse it.

    Returns:
        A ``pipeline.runs.tracking.MlflowSettings``, or None.
    """
    if "mlflow" not in loggers(cfg):
        return None
    from pipeline.runs import tracking

    section = cfg.logger.mlflow
    artifacts = None
    if section.get("tracking_uri"):
        uri, uri_from = str(section.tracking_uri), "logger.mlflow.tracking_uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, uri_from = os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    else:
        local = _launch_dir() / LOCAL_TRACKING_DIR
        uri, uri_from = f"sqlite:///{local / 'mlflow.db'}", "the local default"
        artifacts = (local / "artifacts").as_uri()
    name, tags = _tracked_as(Path(run_dir))
    return tracking.MlflowSettings(
        tracking_uri=uri,
        uri_from=uri_from,
        experiment=str(section.get("experiment") or "pipeline"),
        run_name=name,
        tags=tags,
        log_model=bool(section.get("log_model", True)),
        artifact_location=artifacts,
    )


def _launch_dir() -> Path:
    """The directory the command was started in (Hydra's, should a job change into its run dir)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(hydra.utils.get_original_cwd())
    return Path.cwd()


def _tracked_as(run_dir: Path) -> tuple[str, dict]:
    """A new MLflow run's name (its overrides) and tags (run dir; sweep dir and job number)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    tags = {"pipeline.run_dir": str(run_dir.absolute()), "mlflow.source.name": "pipeline.train"}
    if not HydraConfig.initialized():
        return run_dir.name, tags
    hydra_cfg = HydraConfig.get()
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    unnamed = ("logger", "resume", "hydra")  # where the run goes, not what it trains
    named = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in unnamed]
    tags["pipeline.overrides"] = " ".join(overrides)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        tags["pipeline.sweep_dir"] = str(Path(hydra_cfg.sweep.dir).absolute())
        tags["pipeline.job"] = str(hydra_cfg.job.num)
    return ",".join(named) or run_dir.name, tags


def tracking_params(cfg: DictConfig, run_dir: Path) -> dict:
    """The run's parameters for a tracker: the composed config, flattened, and its options.

    Every key (``optimizer.lr``: 0.1, ``trainer.epochs``: 20, ...) but the loggers'
    own settings and ``resume``, plus the group options the run was composed from
    (``model``: ``resnet20``; from ``<run_dir>/.hydra/hydra.yaml``, so a resumed run
    reports its own).
    """
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that resolves only inside a Hydra app: as written
        tree = OmegaConf.to_container(cfg, resolve=False)
    params = {}
    for key, value in tree.items():
        if key not in ("logger", "resume", "hydra"):
            _flatten(value, str(key), params)
    hydra_file = Path(run_dir) / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices") or {}
        params.update({str(g): v for g, v in choices.items() if "/" not in str(g)})
    return params


def _flatten(value, key: str, into: dict) -> None:
    if isinstance(value, dict) and value:
        for child, inner in value.items():
            _flatten(inner, f"{key}.{child}", into)
    else:
        into[key] = value


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
            "e.g. run_dir=outputs/2026-01-01/12-00-00-a1b2c3"
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
        if key.startswith("hydra") or "/" in key or "@" in key:
            continue
        if key in NOT_HPARAMS or key.partition(".")[0] in NOT_HPARAMS:  # logger.mlflow.*
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (DictConfig, ListConfig)):  # a group choice (model=resnet20)
            value = hydra_cfg.runtime.choices.get(key, raw)
        params[key] = raw if value is None else value
    return params
