"""Train an image classifier: ``python -m pipeline.train [overrides]``.

The only module that reads the Hydra config: it checks it, then hands typed
arguments to ``pipeline.data``, ``pipeline.models`` and ``pipeline.trainer``.
TensorFlow is imported only once the config is known to be good.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline import hparams, sweep, tta
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.train")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
COMMON_DATA_KEYS = (
    "source",
    "image_size",
    "batch_size",
    "natural_images",
    "cache_dir",
    "class_weights",
)
BACKENDS = ("tensorflow", "jax")
CHOICES = {
    "backend": BACKENDS,
    "trainer.strategy": ("auto", "mirrored", "multi_worker", "one_device", "default"),
    "trainer.precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "trainer.jit_compile": ("auto", True, False),
    "trainer.adversarial": ("none", "fgsm_rs", "pgd"),
    "trainer.tta": tta.TTA_MODES,
    "export.tta": tta.TTA_MODES,
    "augment.flip": (True, False, "alternating"),
    "augment.pad_mode": ("zeros", "reflect"),
    "schedule.name": ("constant", "step", "cosine", "linear"),
    "data.source": ("digits", "folder", "tfds", "synthetic"),
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
        from pipeline import export

        try:
            export.check_formats(formats, tta=cfg.export.get("tta", "none"))
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
        from pipeline import adversarial_training

        try:
            adversarial_training.check(**_adversarial_options(cfg.trainer))
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


def _adversarial_options(trainer_cfg: DictConfig) -> dict:
    return {
        "method": trainer_cfg.get("adversarial", "none"),
        "eps": float(trainer_cfg.get("adversarial_eps", 0.0)),
        "steps": int(trainer_cfg.get("adversarial_steps", 1)),
        "step_size": trainer_cfg.get("adversarial_step_size"),
    }


def data_options(data_cfg: DictConfig) -> dict:
    options = OmegaConf.to_container(data_cfg, resolve=True)
    source = options["source"]
    kept = {k: v for k, v in options.items() if k not in COMMON_DATA_KEYS}
    if source in ("tfds", "folder"):
        kept["cache_dir"] = options.get("cache_dir", "data")
    return kept


def _optimizer_factory(
    opt_cfg: DictConfig,
    *,
    schedule_cfg: DictConfig,
    global_batch: int,
    steps_per_epoch: int,
    epochs: int,
):
    """Returns (build_optimizer, peak_lr): the lr is scaled from ref_batch to the global batch."""
    from pipeline.schedules import WarmupSchedule

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
    from pipeline import models, trainer

    t = cfg.trainer
    backend = cfg.get("backend", "tensorflow")
    devices = trainer.setup_devices(
        logical_cpus=t.logical_cpus, deterministic=t.deterministic, seed=cfg.seed, backend=backend
    )
    try:
        models.get_model(cfg.model.arch)  # an unknown name fails before data loading
    except ValueError as err:
        raise PipelineError(f"model.arch: {err}") from err
    plan = trainer.plan(
        strategy=t.strategy,
        precision=t.precision,
        jit_compile=t.jit_compile,
        devices=devices,
        backend=backend,
        deterministic=bool(t.deterministic),
    )
    strategy = trainer.make_strategy(plan.strategy, devices)
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
    from pipeline import adversarial_training, models

    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    adversarial = _adversarial_options(cfg.trainer)
    arch = model_kwargs.pop("arch")
    whiten_images = int(model_kwargs.get("whiten_images", 0))  # fastnet: its whitening filters
    adapt_images = bundle.sample_images(whiten_images) if whiten_images else None

    def build_model():
        try:
            model = models.build(
                arch,
                num_classes=bundle.num_classes,
                input_shape=bundle.image_shape,
                mean=bundle.mean,
                std=bundle.std,
                adapt_images=adapt_images,
                alternating_flip=cfg.augment.get("flip") == "alternating",
                **model_kwargs,
            )
        except (ValueError, FileNotFoundError, TypeError) as err:
            raise PipelineError(f"model={arch}: {err}") from err
        return adversarial_training.wrap(model, **adversarial)  # "none": the model itself

    build_optimizer, peak_lr = _optimizer_factory(
        cfg.optimizer,
        schedule_cfg=cfg.schedule,
        global_batch=cfg.data.batch_size,
        steps_per_epoch=bundle.steps_per_epoch(),
        epochs=cfg.trainer.epochs,
    )
    return build_model, build_optimizer, peak_lr


def technique_callbacks(cfg: DictConfig, bundle) -> list:
    """The training techniques the config turns on, as callbacks (``pipeline.callbacks``).

    ``trainer.lookahead`` ({every, base, power}), ``trainer.freeze_after``
    ({layer name: epochs}), ``trainer.test_each_epoch`` and, for
    ``augment.flip=alternating``, the epoch parity of the model's flip layer.
    """
    from pipeline import callbacks

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


def train(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Trains, evaluates and saves one model as the config says.

    Args:
        cfg: the composed config (``conf/config.yaml`` plus overrides).
        run_dir: where to write; defaults to Hydra's output dir.

    Returns:
        The final metrics (also written to ``<run_dir>/metrics.json``).

    Raises:
        PipelineError: a problem with the config, data or files.
    """
    started = time.perf_counter()
    check_config(cfg)
    select_backend(cfg.get("backend", "tensorflow"))
    if cfg.data.source == "synthetic":
        raise PipelineError("data=synthetic is for `python -m pipeline.bench` only; pick real data")
    run_dir = prepare_run_dir(cfg, run_dir)

    from pipeline import data, doctor, runinfo, runs, trainer

    t = cfg.trainer
    devices, plan, strategy = setup_training(cfg)
    shared_dir = run_dir  # every worker resumes from the backups here (the chief's)
    if plan.strategy == "multi_worker":  # only the chief writes the run; the others a temp dir
        from pipeline import distributed

        run_dir = prepare_run_dir(cfg, distributed.worker_run_dir(run_dir))
    if cfg.get("backend", "tensorflow") == "tensorflow":
        machine = doctor.report(
            strategy=t.strategy, precision=t.precision, jit_compile=t.jit_compile
        )
        print(doctor.summary_line(machine), flush=True)
    else:  # the doctor checks TensorFlow's view of the GPUs, which JAX does not use
        machine = {"keras_backend": cfg.backend, "devices": devices.cpus}
    log.info(
        "Devices: %d GPU(s), CPUs %s. %s", len(devices.gpus), devices.cpus, "; ".join(plan.reasons)
    )

    source = data.load_source(
        cfg.data.source, image_size=cfg.data.image_size, seed=cfg.seed, **data_options(cfg.data)
    )
    scan_report = source.details.pop("scan", None)
    if scan_report is not None:
        runinfo.write_json(run_dir / "scan_report.json", scan_report)
    aug = OmegaConf.to_container(cfg.augment, resolve=True)
    bundle = data.make_datasets(
        source,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        stats_cache_dir=cfg.data.get("cache_dir"),
        **aug,
    )
    runinfo.write_json(run_dir / "stats.json", bundle.stats)
    log.info(
        "Data %s: %s images, %d classes, %s px, mean %s, std %s%s; class imbalance %.2f (max/min)",
        source.name,
        bundle.counts,
        bundle.num_classes,
        bundle.image_shape,
        [round(m, 4) for m in bundle.mean],
        [round(s, 4) for s in bundle.std],
        " (cached)" if bundle.stats.get("cached") else "",
        bundle.stats["imbalance"],
    )
    weights = class_weights_for(cfg, bundle)
    build_model, build_optimizer, peak_lr = model_factories(cfg, bundle)
    early = OmegaConf.to_container(t.early_stopping) if t.early_stopping.enabled else None
    result = trainer.fit(
        strategy=strategy,
        plan=plan,
        build_model=build_model,
        build_optimizer=build_optimizer,
        data=bundle,
        run_dir=run_dir,
        epochs=t.epochs,
        seed=cfg.seed,
        label_smoothing=t.label_smoothing,
        steps_per_execution=t.steps_per_execution,
        preflight=t.preflight,
        verbose=t.verbose,
        profile_batches=t.profile_batches,
        checkpoint_monitor=t.checkpoint_monitor,
        early_stopping=early,
        backup=t.backup,
        backup_every_steps=t.get("backup_every_steps"),
        restore_dir=shared_dir / "backup",
        signature=runs.signature(cfg, bundle, source),
        class_weight=weights,
        confusion_matrix_every=t.confusion_matrix_every,
        extra_callbacks=technique_callbacks(cfg, bundle),
        tta=t.get("tta", "none"),
    )
    result.model.save(run_dir / "model.keras")
    metrics = {
        **result.metrics,
        "backend": cfg.get("backend", "tensorflow"),
        "peak_lr": peak_lr,
        "wall_time_s": time.perf_counter() - started,
    }
    runinfo.write_json(run_dir / "metrics.json", metrics)
    runinfo.write_json(run_dir / "history.json", result.history)
    runinfo.write_json(
        run_dir / "manifest.json",
        runinfo.manifest(
            devices={"gpus": devices.gpus, "cpus": devices.cpus, "doctor": machine},
            plan={
                **vars(plan),
                "attempts": result.attempts,
                "backend": cfg.get("backend", "tensorflow"),
            },
            data={
                "source": source.name,
                "fingerprint": source.fingerprint,
                "class_names": bundle.class_names,
                "image_shape": list(bundle.image_shape),
                "mean": bundle.mean,
                "std": bundle.std,
                "counts": bundle.counts,
                "seed": cfg.seed,
                "details": source.details,
                "splits": {s: getattr(source, s).members for s in ("train", "val", "test")},
            },
        ),
    )
    from pipeline import security

    security.record_artifacts(
        run_dir, [run_dir / "model.keras", *sorted((run_dir / "checkpoints").glob("*.weights.h5"))]
    )
    if cfg.export.formats and cfg.get("backend", "tensorflow") != "tensorflow":
        log.warning(
            "export.formats=%s skipped: export traces the model with TensorFlow; run "
            "`python -m pipeline.export run_dir=%s` (TensorFlow backend) on this run",
            list(cfg.export.formats),
            run_dir,
        )
    elif cfg.export.formats:
        from pipeline import export

        parity = export.export_run(
            run_dir, formats=list(cfg.export.formats), tta=cfg.export.get("tta", "none")
        )
        metrics["export_max_abs_diff"] = max(
            (f["max_abs_diff"] for f in parity.get("formats", {}).values()), default=0.0
        )
        runinfo.write_json(run_dir / "metrics.json", metrics)
    hparams.log_run(run_dir, _hparams(cfg), metrics)
    _print_summary(metrics, run_dir)
    return metrics


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


def _print_summary(metrics: dict, run_dir: Path) -> None:
    tta_mode = metrics.get("tta")
    rows = [
        ("test accuracy", f"{metrics.get('test_accuracy', float('nan')):.4f}"),
        *([("  without TTA", f"{metrics['test_plain_accuracy']:.4f}")] if tta_mode else []),
        ("test loss", f"{metrics.get('test_loss', float('nan')):.4f}"),
        ("val accuracy", f"{metrics.get('val_accuracy', float('nan')):.4f}"),
        ("train accuracy", f"{metrics.get('train_accuracy', float('nan')):.4f}"),
        ("epochs", str(metrics["epochs"])),
        ("training time", f"{metrics['train_time_s']:.1f} s"),
        ("images/s", f"{metrics['images_per_sec']:.0f}"),
        ("strategy / replicas", f"{metrics['strategy']} / {metrics['num_replicas']}"),
        ("precision / XLA", f"{metrics['precision']} / {metrics['jit_compile']}"),
        ("run dir", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows) + "\n", flush=True)


def _hparams(cfg: DictConfig) -> dict:
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


def _job() -> tuple[Path, bool, Path | None]:
    """(this job's output dir, whether it runs in a multirun, the sweep dir if parallel)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    parallel = in_sweep and "joblib" in str(hydra_cfg.launcher.get("_target_", "")).lower()
    return (
        Path(hydra_cfg.runtime.output_dir),
        in_sweep,
        Path(hydra_cfg.sweep.dir) if parallel else None,
    )


def _job_num() -> int:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.num


def _objective(metrics: dict, metric: str) -> float:
    """The metric sweepers optimize, checked to be a finite number.

    Raises:
        PipelineError: the metric is unknown, or training diverged (NaN loss).
    """
    numeric = sorted(hparams.final_metrics(metrics))
    if metric not in metrics:
        raise PipelineError(
            f"objective.metric={metric!r} is not a metric of the run; use one of "
            f"{', '.join(numeric)}"
        )
    for key in ("train_loss", metric):
        value = metrics.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise PipelineError(
                f"training diverged: {key} is {value} (training stopped on it); "
                "lower optimizer.lr or check the data"
            )
    return float(metrics[metric])


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the objective (``objective.metric``) for sweepers.

    In a multirun a failed job leaves ``failed.json`` and returns the worst
    objective, so the sweep goes on (unless ``sweep.fail_fast``); a single run
    exits with status 2 on a :class:`PipelineError`.
    """
    job_dir, in_sweep, parallel_sweep_dir = _job()
    if in_sweep:  # test hook: PIPELINE_TEST_KILL_JOB=<job number> SIGKILLs that job here
        sweep.kill_job_for_tests(_job_num())
    direction = cfg.objective.direction
    if direction not in sweep.DIRECTIONS:
        _exit(PipelineError(f"objective.direction must be maximize or minimize, got {direction!r}"))
    try:
        if parallel_sweep_dir is not None and cfg.sweep.one_gpu_per_job:
            sweep.claim_gpu(parallel_sweep_dir / ".gpu_locks")
        run_dir = None
        if cfg.get("resume"):
            run_dir, cfg = _resume_target(cfg)
        metrics = train(cfg, run_dir)
        if not in_sweep and cfg.objective.metric not in metrics:
            return None  # a single run needs no objective (val_accuracy without a val split)
        return _objective(metrics, cfg.objective.metric)
    except Exception as err:
        if in_sweep and not cfg.sweep.fail_fast:
            sweep.record_failure(job_dir, err)
            return sweep.worst_value(direction)
        if not isinstance(err, PipelineError):
            raise
        _exit(err)


def _resume_target(cfg: DictConfig) -> tuple[Path, DictConfig]:
    """The run ``resume=<dir>|auto`` continues, and its config (see ``pipeline.runs``)."""
    from hydra.core.hydra_config import HydraConfig

    from pipeline import runs

    overrides = list(HydraConfig.get().overrides.task)
    run_dir, cfg = runs.resolve(cfg, overrides, runs.outputs_dir())
    print(f"resuming run {run_dir}", flush=True)
    return run_dir, cfg


def _exit(err: PipelineError) -> None:
    log.error("%s", err)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(getattr(err, "exit_code", 2))


if __name__ == "__main__":
    main()
