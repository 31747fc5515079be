"""Train an image classifier: ``python -m pipeline.train [overrides]``.

The command: ``main`` runs ``train(cfg)`` under Hydra (sweeps, resume, exit
codes); ``train`` checks the config and turns it into typed arguments through
``pipeline.config``, then loads the data (``pipeline.data``), builds the model
(``pipeline.models``), trains (``pipeline.training``) and writes the run
directory (``pipeline.runs``). TensorFlow is imported only once the config is
known to be good.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import config, terminal
from pipeline.data.sources import get_source
from pipeline.errors import PipelineError, carried_user_error
from pipeline.runs import hparams, rundir, sweep

log = logging.getLogger("pipeline.train")
DATA_SHARDS = ("auto", "worker", "batch")  # data.shard under multi_worker
DISK_FULL = "No space left on device"  # h5py's OSErrors carry no errno, only this text


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
    config.check_config(cfg)
    config.select_backend(cfg.get("backend", "tensorflow"))
    terminal.quiet_tensorflow()  # tf.data runs on TensorFlow whatever the backend
    if not get_source(cfg.data.source).for_training:
        raise PipelineError(
            f"data={cfg.data.source} is for `python -m pipeline.bench` only; pick real data"
        )
    run_dir = config.prepare_run_dir(cfg, run_dir).absolute()  # hashes take relative paths
    devices, plan, strategy = config.setup_training(cfg)
    shared_dir = run_dir  # every worker resumes from the backups here (the chief's)
    if plan.strategy == "multi_worker":  # only the chief writes the run; the others a temp dir
        from pipeline.training import distributed

        run_dir = config.prepare_run_dir(cfg, distributed.worker_run_dir(run_dir))
    with (
        rundir.locked(run_dir),
        _full_disk_is_one_line(shared_dir),
        _tracking(cfg, run_dir, chief=run_dir == shared_dir) as tracker,
    ):
        machine = _machine_report(cfg, devices, plan)
        source, bundle = _load_data(cfg, run_dir, plan, strategy)
        build_model, build_optimizer, peak_lr = config.model_factories(cfg, bundle)
        factories = (build_model, build_optimizer)
        result = _fit(cfg, strategy, plan, factories, bundle, source, run_dir, shared_dir, tracker)
        metrics = {
            **result.metrics,
            "backend": cfg.get("backend", "tensorflow"),
            "peak_lr": peak_lr,
            "wall_time_s": time.perf_counter() - started,
            **({"limit_batches": bundle.limit_batches} if bundle.limit_batches else {}),
        }
        _finish(cfg, run_dir, result, metrics, (devices, plan, machine), (source, bundle), tracker)
    _print_summary(metrics, run_dir, config.loggers(cfg))
    return metrics


def _finish(
    cfg: DictConfig, run_dir: Path, result, metrics: dict, machine_info, data, tracker=None
) -> None:
    """What a run does after training, each step safe to redo (``resume=`` redoes them all).

    ``model.keras``, history, manifest and hashes, exports, HParams, the MLflow run's
    final metrics and artifacts, and ``metrics.json`` last: it marks the run finished
    (``pipeline.runs.target.FINISHED``).
    """
    from pipeline.runs import manifest
    from pipeline.training.callbacks import kill_point

    kill_point("save")
    _save_model(result.model, run_dir / "model.keras")
    kill_point("records")
    _write_records(cfg, run_dir, result, machine_info, *data)
    kill_point("export")
    _export(cfg, run_dir, metrics)
    if "tensorboard" in config.loggers(cfg):
        hparams.log_run(run_dir, config.hparams_of(cfg), metrics, objective=cfg.objective.metric)
    if tracker is not None:
        tracker.log_final(metrics, run_dir, images=_pictures(result.model, data[1]))
    manifest.write_json(run_dir / "metrics.json", metrics)


def _pictures(model, bundle) -> dict:
    """The final model's confusion matrix on the test split (else validation), for MLflow."""
    from pipeline.runs import tracking

    split, dataset = ("test", bundle.test) if bundle.test is not None else ("val", bundle.val)
    if dataset is None:
        return {}
    image = tracking.confusion_matrix_image(model, dataset, bundle.class_names)
    return {f"confusion_matrix_{split}.png": image}


@contextlib.contextmanager
def _tracking(cfg: DictConfig, run_dir: Path, chief: bool):
    """With ``logger=mlflow``, the run's MLflow run (the chief's only), ended as the run ends.

    Opened before the data are loaded: a tracking server that cannot be reached stops
    the run before anything is trained. Yields None without MLflow.
    """
    settings = config.tracking_settings(cfg, run_dir) if chief else None
    if settings is None:
        yield None
        return
    from pipeline.runs import tracking

    with tracking.start(run_dir, settings, config.tracking_params(cfg, run_dir)).ended() as run:
        yield run


def _save_model(model, path: Path) -> None:
    """Saves ``model`` to a temporary ``.keras`` file, then renames it: never half a file."""
    tmp = path.with_name(f".{os.getpid()}.{path.name}")  # Keras wants the .keras suffix
    model.save(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _full_disk_is_one_line(run_dir: Path):
    """A full disk stops the run with one line naming the file and the backup to resume from."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) and DISK_FULL not in str(err):
            raise
        from pipeline.training import backups

        newest = backups.backups(run_dir / backups.BACKUP_DIR)
        kept = (
            f"the last backup, {newest[0]}, is whole: free some space and resume with "
            f"`python -m pipeline.train resume={run_dir}`"
            if newest
            else "no backup was made yet"
        )
        where = err.filename or f"a file under {run_dir}"
        raise PipelineError(f"the disk is full: writing {where} failed; {kept}.") from err


def _machine_report(cfg: DictConfig, devices, plan) -> dict:
    """The doctor's one-line view of this machine (printed), for the manifest."""
    from pipeline import doctor

    t = cfg.trainer
    if cfg.get("backend", "tensorflow") == "tensorflow":
        machine = doctor.report(
            strategy=t.strategy,
            precision=t.precision,
            jit_compile=t.jit_compile,
            deterministic=bool(t.deterministic),
        )
        print(doctor.summary_line(machine), flush=True)
    else:  # the doctor checks TensorFlow's view of the GPUs, which JAX does not use
        machine = {"keras_backend": cfg.backend, "devices": devices.cpus}
    log.info(
        "Devices: %d GPU(s), CPUs %s. %s", len(devices.gpus), devices.cpus, "; ".join(plan.reasons)
    )
    return machine


def _worker_shard(cfg: DictConfig, plan, strategy):
    """This worker's share of the input under ``multi_worker`` with ``data.shard`` auto|worker."""
    shard = cfg.data.get("shard", "auto")
    if shard not in DATA_SHARDS:
        raise PipelineError(f"data.shard must be one of {', '.join(DATA_SHARDS)}, got {shard!r}")
    if plan.strategy != "multi_worker" or shard == "batch":
        return None
    from pipeline import data
    from pipeline.training import distributed

    index, workers, replicas = distributed.worker_place(strategy)
    return data.WorkerShard(
        index=index,
        count=workers,
        replicas=replicas,
        all_reduce=lambda sums: distributed.sum_array_over_workers(strategy, sums),
    )


def _load_data(cfg: DictConfig, run_dir: Path, plan=None, strategy=None):
    """The data source and its tf.data pipelines; writes the scan report and statistics."""
    from pipeline import data
    from pipeline.runs import manifest

    options, cache_dir = config.data_options(cfg)
    source = data.load_source(
        cfg.data.source, image_size=cfg.data.image_size, seed=cfg.seed, **options
    )
    config.check_training_split(cfg, train_count=source.train.count, class_names=source.class_names)
    scan_report = source.details.pop("scan", None)
    if scan_report is not None:
        manifest.write_json(run_dir / "scan_report.json", scan_report)
    aug = OmegaConf.to_container(cfg.augment, resolve=True)
    bundle = data.make_datasets(
        source,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        stats_cache_dir=cache_dir,
        limit_batches=cfg.trainer.get("limit_batches"),
        shard=_worker_shard(cfg, plan, strategy) if plan is not None else None,
        service=cfg.data.get("service"),
        **aug,
    )
    manifest.write_json(run_dir / "stats.json", bundle.stats)
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
    return source, bundle


def _fit(
    cfg: DictConfig,
    strategy,
    plan,
    factories,
    bundle,
    source,
    run_dir: Path,
    shared_dir: Path,
    tracker=None,
):
    """Hands the config's training settings to ``pipeline.training.loop.fit``.

    The loggers' callbacks (``metrics.csv``, MLflow's epochs) come after the
    techniques and ``trainer.callbacks``, so they see every metric those add.
    """
    from pipeline.runs import target
    from pipeline.training import loop

    t = cfg.trainer
    extra = [
        *config.technique_callbacks(cfg, bundle),
        *config.logger_callbacks(cfg, run_dir, tracker),
    ]
    build_model, build_optimizer = factories
    early = OmegaConf.to_container(t.early_stopping) if t.early_stopping.enabled else None
    training = loop.TrainSettings(
        epochs=t.epochs,
        seed=cfg.seed,
        label_smoothing=t.label_smoothing,
        steps_per_execution=t.steps_per_execution,
        preflight=t.preflight,
        class_weight=config.class_weights_for(cfg, bundle),
        early_stopping=early,
        sync_batchnorm=config.sync_batchnorm(cfg, plan, strategy),
        extra_callbacks=extra,
    )
    checkpoints = loop.CheckpointSettings(
        monitor=t.checkpoint_monitor,
        backup=t.backup,
        backup_every_steps=t.get("backup_every_steps"),
        restore_dir=shared_dir / "backup",
        signature=target.signature(cfg, bundle, source),
        finished=(shared_dir / target.FINISHED).exists(),
    )
    return loop.fit(
        strategy=strategy,
        plan=plan,
        build_model=build_model,
        build_optimizer=build_optimizer,
        data=bundle,
        run_dir=run_dir,
        training=training,
        checkpoints=checkpoints,
        reports=_report_settings(cfg),
    )


def _report_settings(cfg: DictConfig):
    """``loop.ReportSettings``: console, TensorBoard (if ``logger=`` has it), TTA."""
    from pipeline.training import loop

    t = cfg.trainer
    return loop.ReportSettings(
        verbose=t.verbose,
        profile_batches=t.profile_batches,
        confusion_matrix_every=t.confusion_matrix_every,
        tta=t.get("tta", "none"),
        tensorboard="tensorboard" in config.loggers(cfg),
        log_every_steps=t.get("log_every_steps"),
    )


def _write_records(cfg: DictConfig, run_dir: Path, result, machine_info, source, bundle):
    """history.json, the manifest and the artifact hashes."""
    from pipeline.runs import hashes, manifest

    devices, plan, machine = machine_info
    manifest.write_json(run_dir / "history.json", result.history)
    manifest.write_json(
        run_dir / "manifest.json",
        manifest.manifest(
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
    hashes.record_artifacts(
        run_dir, [run_dir / "model.keras", *sorted((run_dir / "checkpoints").glob("*.weights.h5"))]
    )


def _export(cfg: DictConfig, run_dir: Path, metrics: dict) -> None:
    """The ``export.formats`` the run asked for; their parity goes into ``metrics``."""
    if not cfg.export.formats:
        return
    if cfg.get("backend", "tensorflow") != "tensorflow":
        log.warning(
            "export.formats=%s skipped: export traces the model with TensorFlow; run "
            "`python -m pipeline.export run_dir=%s` (TensorFlow backend) on this run",
            list(cfg.export.formats),
            run_dir,
        )
        return
    from pipeline import exporting

    parity = exporting.export_run(
        run_dir, formats=list(cfg.export.formats), tta=cfg.export.get("tta", "none")
    )
    metrics["export_max_abs_diff"] = max(
        (f["max_abs_diff"] for f in parity.get("formats", {}).values()), default=0.0
    )


def _print_summary(metrics: dict, run_dir: Path, loggers: tuple[str, ...]) -> None:
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
        ("precision / XLA", f"{metrics['precision']} / {_on_off(metrics['jit_compile'])}"),
        ("run dir", str(run_dir)),
    ]
    if metrics.get("limit_batches"):
        rows.append(("limited to", f"{metrics['limit_batches']} batches per epoch and split"))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows) + "\n", flush=True)
    print(terminal.next_steps(run_dir, loggers=loggers) + "\n", flush=True)


def _on_off(flag) -> str:
    """Booleans as the doctor's header spells them."""
    return {True: "on", False: "off"}.get(flag, str(flag))


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


rundir.register_resolvers()  # hydra.run.dir's ${run_id:}, before @hydra.main composes


@config.hydra_main("config")
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
        user_error = carried_user_error(err)  # also one raised inside tf.data (a vanished file)
        if user_error is None:
            raise
        _exit(user_error)


def _resume_target(cfg: DictConfig) -> tuple[Path, DictConfig]:
    """The run ``resume=<dir>|auto`` continues, and its config (see ``pipeline.runs.target``)."""
    from hydra.core.hydra_config import HydraConfig

    from pipeline.runs import target

    overrides = list(HydraConfig.get().overrides.task)
    run_dir, cfg = target.resolve(cfg, overrides, target.outputs_dir())
    print(f"resuming run {run_dir}", flush=True)
    return run_dir, cfg


def _exit(err: PipelineError) -> None:
    log.error("%s", err)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(getattr(err, "exit_code", 2))


def cli() -> None:
    """``pipeline-train`` and ``python -m pipeline.train``: overrides checked, then ``main``."""
    from pipeline.errors import user_errors

    with user_errors():  # Hydra's own message for trainer.epoch=3 suggests +trainer.epoch=3
        config.check_overrides(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
