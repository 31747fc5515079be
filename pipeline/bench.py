"""Measure training throughput piece by piece: ``python -m pipeline.bench [overrides]``.

Each measurement is the median images/s of ``bench.windows`` timed windows of
``bench.steps`` batches, after ``bench.warmup_steps`` untimed ones:

- ``pipeline``: iterating the training set alone (cache, shuffle, augment,
  batch, prefetch), repeated over as many epochs as it takes;
- ``synthetic``: ``model.fit`` on one batch of random tensors held in memory,
  repeated: what the model, optimizer and devices do with no input to wait for;
- ``end_to_end``: ``model.fit`` on the training set, as ``pipeline.train``
  runs it (validation excluded, as in its images/s);
- ``keras_fit``: ``model.fit`` on training images held in memory as float
  tensors (``from_tensor_slices``): plain Keras, the baseline of our overhead.

The ratios say where the time goes: ``end_to_end/synthetic`` below 1 means
steps wait for input; ``end_to_end/keras_fit`` compares our pipeline with
plain Keras; ``pipeline/synthetic`` says how many times faster the input runs
than training consumes it. The model and optimizer are built as training
builds them (``pipeline.training.loop.build_compiled``, pre-flight off). The channel
statistics pass fills the training set's in-memory cache before any window,
so every number is the steady state of epochs after the first.

    python -m pipeline.bench data=folder data.path=/my/images model=resnet20 data.image_size=32
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.config import (
    check_config,
    class_weights_for,
    hydra_main,
    model_factories,
    optimizer_factory,
    prepare_run_dir,
    select_backend,
    setup_training,
    sync_batchnorm,
)
from pipeline.errors import PipelineError, user_errors
from pipeline.runs import manifest
from pipeline.terminal import quiet_tensorflow
from pipeline.training import devices as devices_mod

log = logging.getLogger("pipeline.bench")

MEASUREMENTS = ("pipeline", "synthetic", "end_to_end", "keras_fit")
RATIOS = {  # name: (numerator, denominator, what it says)
    "end_to_end/synthetic": ("end_to_end", "synthetic", "input stall: below 1, steps wait"),
    "end_to_end/keras_fit": ("end_to_end", "keras_fit", "against plain Keras on in-memory tensors"),
    "pipeline/synthetic": ("pipeline", "synthetic", "times faster the input runs than training"),
}
IN_MEMORY_BYTES = 256 * 2**20  # float32 images kept for keras_fit; a tf.data constant stays < 2 GB
SERVICE_BATCHES = 2**40  # batch numbers asked of a tf.data service: more than any bench takes


def check_bench(bench_cfg: DictConfig) -> None:
    """Checks the ``bench.*`` keys.

    Raises:
        PipelineError: naming the key, the value received and what is valid.
    """
    for key, least in (("warmup_steps", 0), ("steps", 1), ("windows", 1)):
        if int(bench_cfg[key]) < least:
            raise PipelineError(f"bench.{key} must be >= {least}, got {bench_cfg[key]}")
    which = list(bench_cfg.which)
    unknown = [w for w in which if w not in MEASUREMENTS]
    if unknown or not which:
        raise PipelineError(
            f"bench.which must list some of {', '.join(MEASUREMENTS)}; got {which}. "
            "E.g. bench.which=[pipeline,end_to_end]"
        )
    if bench_cfg.synthetic_data and (
        bench_cfg.synthetic_images < 1 or bench_cfg.synthetic_classes < 2
    ):
        raise PipelineError(
            f"bench.synthetic_images must be >= 1 and bench.synthetic_classes >= 2, got "
            f"{bench_cfg.synthetic_images} and {bench_cfg.synthetic_classes}"
        )


def bench(cfg: DictConfig, run_dir=None) -> dict:
    """Measures the images/s of the input pipeline, the training step and ``fit``.

    Args:
        cfg: the composed config (``conf/bench.yaml`` plus overrides).
        run_dir: where ``bench.json`` goes; defaults to Hydra's output dir.

    Returns:
        The results (also written to ``<run_dir>/bench.json``): ``images_per_sec``
        (median per measurement), ``windows`` (each window's images/s), ``ratios``,
        ``plan`` (effective strategy, replicas, precision, XLA), ``settings`` and ``data``.

    Raises:
        PipelineError: a problem with the config, data or files.
    """
    check_config(cfg)
    check_bench(cfg.bench)
    select_backend(cfg.get("backend", "tensorflow"))
    run_dir = prepare_run_dir(cfg, run_dir)
    synthetic = cfg.bench.synthetic_data or cfg.data.source == "synthetic"
    if cfg.get("backend", "tensorflow") == "jax" and synthetic:
        return _bench_jax_synthetic(cfg, run_dir)
    if cfg.data.source == "synthetic":
        cfg.bench.synthetic_data = True
    strategy, plan, devices = _setup(cfg)
    bundle, prepare_s = _load_bundle(cfg)
    model = _build_model(cfg, bundle, strategy, plan)
    timing = _timing(cfg.bench)
    which = [m for m in MEASUREMENTS if m in cfg.bench.which]
    weights = class_weights_for(cfg, bundle)
    spe = cfg.trainer.steps_per_execution
    windows = _measure_all(which, model, bundle, timing, weights, plan, spe)
    return _finish(
        run_dir,
        windows,
        plan={**_plan_facts(plan, strategy), "gpus": len(devices.gpus)},
        settings={
            **timing,
            "batch_size": bundle.batch_size,
            "steps_per_execution": int(spe),
            "model": cfg.model.arch,
            "service": cfg.data.get("service"),
            "keras_fit_images": _in_memory_count(bundle) if "keras_fit" in which else None,
        },
        data={
            "source": bundle.source.name,
            "image_shape": list(bundle.image_shape),
            "num_classes": bundle.num_classes,
            "train_images": bundle.counts["train"],
            "steps_per_epoch": bundle.steps_per_epoch(),
            "prepare_s": prepare_s,
        },
    )


def _timing(bench_cfg: DictConfig) -> dict:
    """``warmup_steps``, ``steps`` and ``windows`` of ``bench.*``, as ints."""
    return {key: int(bench_cfg[key]) for key in ("warmup_steps", "steps", "windows")}


def _plan_facts(plan, strategy) -> dict:
    """What bench.json records of the plan that ran."""
    return {
        "strategy": plan.strategy,
        "num_replicas": int(strategy.num_replicas_in_sync),
        "precision": plan.precision,
        "jit_compile": plan.jit_compile,
        "reasons": plan.reasons,
    }


def _finish(run_dir, windows: dict, *, plan: dict, settings: dict, data: dict) -> dict:
    """The summary of ``windows`` with what was measured; written to bench.json and printed."""
    result = summarize(windows)
    result.update(plan=plan, settings=settings, data=data)
    out = Path(run_dir) / "bench.json"
    manifest.write_json(out, result)
    print(format_table(result))
    print(f"bench.json: {out}", flush=True)
    return result


def _bench_jax_synthetic(cfg: DictConfig, run_dir) -> dict:
    """``backend=jax`` on random images: Keras-JAX on NumPy batches, no TensorFlow imported.

    Runs ``synthetic`` (one batch repeated) and ``keras_fit`` (the random set cycled);
    ``pipeline`` and ``end_to_end`` need tf.data and are skipped. Strategy,
    precision and XLA are planned by ``pipeline.training.devices.plan``, as in training.
    """
    b, batch = cfg.bench, int(cfg.data.batch_size)
    x, y = _random_images(cfg)
    devices, plan, strategy = _jax_setup(cfg)
    model = _jax_model(cfg, x, plan)
    timing = _timing(b)
    in_memory = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)]
    batches = {  # generators: Keras-JAX takes them as they are (arrays would need steps math)
        "synthetic": lambda: (pair for pair in itertools.repeat((x[:batch], y[:batch]))),
        "keras_fit": lambda: (pair for pair in itertools.cycle(in_memory)),
    }
    windows = {}
    for name in [m for m in MEASUREMENTS if m in b.which]:
        if name not in batches:
            print(f"{name}: skipped (needs tf.data; backend=jax with synthetic data)", flush=True)
            continue
        windows[name] = measure_fit(model, batches[name](), **timing, batch_size=batch, label=name)
    return _finish(
        run_dir,
        windows,
        plan={
            "backend": "jax",
            **_plan_facts(plan, strategy),
            "reasons": [*plan.reasons, "TensorFlow not imported"],
            "gpus": len(devices.gpus),
        },
        settings={
            **timing,
            "batch_size": batch,
            "steps_per_execution": int(cfg.trainer.steps_per_execution),
            "model": cfg.model.arch,
            "keras_fit_images": len(x) if "keras_fit" in windows else None,
        },
        data={
            "source": "synthetic",
            "image_shape": list(x.shape[1:]),
            "num_classes": int(b.synthetic_classes),
            "train_images": len(x),
            "steps_per_epoch": len(x) // batch,
            "prepare_s": 0.0,
        },
    )


def _random_images(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """``bench.synthetic_images`` random 0..255 images and one-hot labels, seeded by ``seed``.

    Raises:
        PipelineError: fewer images than one batch.
    """
    b, batch = cfg.bench, int(cfg.data.batch_size)
    size, count = int(cfg.data.image_size), int(b.synthetic_images)
    if count < batch:
        raise PipelineError(
            f"bench.synthetic_images must be >= data.batch_size ({batch}), got {count}"
        )
    rng = np.random.default_rng(int(cfg.seed))
    x = rng.integers(0, 256, (count, size, size, 3)).astype("float32")
    y = np.eye(int(b.synthetic_classes), dtype="float32")[
        rng.integers(0, b.synthetic_classes, count)
    ]
    return x, y


def _jax_setup(cfg: DictConfig):
    """JAX's devices, the plan for them (``devices.plan``), the precision policy, seeds, strategy.

    Returns:
        ``(devices, plan, strategy)``; the strategy is a ``devices.JaxStrategy``.

    Raises:
        PipelineError: a choice that cannot work under JAX (``trainer.strategy=multi_worker``).
    """
    import keras

    t = cfg.trainer
    devices = devices_mod.jax_devices()
    plan = devices_mod.plan(
        strategy=t.strategy,
        precision=t.precision,
        jit_compile=t.jit_compile,
        devices=devices,
        backend="jax",
        deterministic=bool(t.deterministic),
    )
    keras.mixed_precision.set_global_policy(plan.precision)
    seed_without_tensorflow(int(cfg.seed))  # Keras's own would import TensorFlow where installed
    strategy = devices_mod.make_strategy(plan.strategy, devices)  # sets keras.distribution
    return devices, plan, strategy


def _jax_model(cfg: DictConfig, x: np.ndarray, plan):
    """The model for the random images ``x``: cross-entropy (label smoothing), accuracy.

    Raises:
        PipelineError: a bad ``model`` section.
    """
    import keras

    from pipeline import models

    batch, count = int(cfg.data.batch_size), len(x)
    pixels = x.reshape(-1, 3) / 255.0
    model = models.build_from_config(
        OmegaConf.to_container(cfg.model, resolve=True),
        num_classes=int(cfg.bench.synthetic_classes),
        input_shape=x.shape[1:],
        mean=pixels.mean(0).tolist(),
        std=pixels.std(0).tolist(),
    )
    build_optimizer, _ = optimizer_factory(
        cfg.optimizer,
        schedule_cfg=cfg.schedule,
        global_batch=batch,
        steps_per_epoch=max(count // batch, 1),
        epochs=int(cfg.trainer.epochs),
    )
    model.compile(
        optimizer=build_optimizer(),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=float(cfg.trainer.label_smoothing)
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=plan.jit_compile,
        steps_per_execution=int(cfg.trainer.steps_per_execution),
    )
    print(
        f"Building model={cfg.model.arch} (JAX {plan.strategy}, {plan.precision}, "
        f"XLA {plan.jit_compile})",
        flush=True,
    )
    return model


def seed_without_tensorflow(seed: int) -> None:
    """``keras.utils.set_random_seed`` without its ``tf.random.set_seed`` (imports TensorFlow)."""
    import random

    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)


def _setup(cfg: DictConfig):
    """Devices, plan and strategy, as ``pipeline.train`` sets them up."""
    devices, plan, strategy = setup_training(cfg)
    print(f"Plan: {'; '.join(plan.reasons) or 'as configured'}", flush=True)
    return strategy, plan, devices


def _load_bundle(cfg: DictConfig):
    """The training data as ``pipeline.train`` builds it, or random images; and seconds taken.

    The channel statistics are computed afresh (not read from the statistics
    cache): their pass over the training split fills its in-memory cache, so
    that every window measures the steady state of the epochs after the first.
    """
    from pipeline import data
    from pipeline.data.sources import source_options

    started = time.perf_counter()
    b = cfg.bench
    if b.synthetic_data:
        source = data.load_source(
            "synthetic",
            image_size=cfg.data.image_size,
            seed=cfg.seed,
            num_classes=b.synthetic_classes,
            count=b.synthetic_images,
        )
    else:
        print(f"Loading data.source={cfg.data.source} ...", flush=True)
        options = source_options(cfg.data)
        source = data.load_source(
            cfg.data.source, image_size=cfg.data.image_size, seed=cfg.seed, **options
        )
        source.details.pop("scan", None)  # pipeline.train and pipeline.data.scan report it
    bundle = data.make_datasets(
        source,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        stats_cache_dir=None,  # the statistics pass is what fills the decoded-image cache
        service=None if b.synthetic_data else cfg.data.get("service"),
        **OmegaConf.to_container(cfg.augment, resolve=True),
    )
    prepare_s = time.perf_counter() - started
    print(
        f"Data {source.name}: {bundle.counts['train']} training images, {bundle.num_classes} "
        f"classes, {bundle.image_shape} px; decoded and cached in {prepare_s:.1f} s",
        flush=True,
    )
    return bundle, prepare_s


def _build_model(cfg: DictConfig, bundle, strategy, plan):
    """The compiled model, built as ``pipeline.train`` builds it, without the pre-flight step."""
    from pipeline.training import loop

    build_model, build_optimizer, _ = model_factories(cfg, bundle)
    arch = cfg.model.arch
    print(
        f"Building model={arch} ({plan.strategy}, {plan.precision}, XLA {plan.jit_compile})",
        flush=True,
    )
    model, _ = loop.build_compiled(
        strategy=strategy,
        plan=plan,
        build_model=build_model,
        build_optimizer=build_optimizer,
        preflight_data=None,
        seed=cfg.seed,
        compile_kwargs={
            "label_smoothing": float(cfg.trainer.label_smoothing),
            "steps_per_execution": int(cfg.trainer.steps_per_execution),
            "num_classes": bundle.num_classes,
        },
        sync_batchnorm=sync_batchnorm(cfg, plan, strategy),
    )
    return model


def _measure_all(which, model, bundle, timing: dict, weights, plan, steps_per_execution) -> dict:
    """Each window's images/s of the measurements ``which`` names.

    Raises:
        PipelineError: a training step failed (no pre-flight step ran to fall back).
    """
    import tensorflow as tf

    from pipeline.training import loop

    try:
        return {name: _measure(name, model, bundle, timing, weights) for name in which}
    except tf.errors.OpError as err:
        raise PipelineError(
            f"the training step failed with strategy={plan.strategy}, precision={plan.precision}, "
            f"jit_compile={plan.jit_compile}, steps_per_execution="
            f"{steps_per_execution} ({loop._short(err)}). The bench tries no "
            "fallback: set what training fell back to (its metrics.json lists the fallbacks), "
            "e.g. trainer.jit_compile=false, trainer.precision=float32 or "
            "trainer.steps_per_execution=1."
        ) from err


def _measure(name: str, model, bundle, timing: dict, class_weight: dict | None) -> list[float]:
    """Each window's images/s of one of ``MEASUREMENTS``."""
    print(
        f"{name}: {timing['warmup_steps']} warm-up steps, then {timing['windows']} windows "
        f"of {timing['steps']} steps",
        flush=True,
    )
    if name == "pipeline":
        return measure_iteration(_served(bundle) or bundle.train, label=name, **timing)
    dataset, steps_per_epoch, count = _fit_input(name, bundle)
    return measure_fit(
        model,
        dataset,
        label=name,
        batch_size=bundle.batch_size,
        steps_per_epoch=steps_per_epoch,
        count=count,
        class_weight=class_weight,
        **timing,
    )


def _served(bundle):
    """With ``data.service``: the run's batches as its workers make them, without end."""
    if bundle.service_batches is None:
        return None
    return bundle.service_batches(start=0, stop=SERVICE_BATCHES)


def _in_memory_count(bundle) -> int:
    per_image = 4 * math.prod(bundle.image_shape)
    cap = max(bundle.batch_size, IN_MEMORY_BYTES // per_image)
    return min(bundle.counts["train"], cap)


def _fit_input(name: str, bundle):
    """The dataset ``fit`` runs on for a measurement: ``(dataset, steps_per_epoch, count)``.

    ``steps_per_epoch`` and ``count`` describe a finite dataset (its last batch
    may be short); an endless one gets ``(dataset, None, None)``.
    """
    import tensorflow as tf

    if name == "end_to_end":
        if _served(bundle) is not None:
            return _served(bundle), None, None
        return bundle.train, bundle.steps_per_epoch(), bundle.counts["train"]
    if name == "synthetic":
        rng = np.random.default_rng(0)
        shape = (bundle.batch_size, *bundle.image_shape)
        images = rng.uniform(0, 255, shape).astype(np.float32)
        labels = np.eye(bundle.num_classes, dtype=np.float32)[
            rng.integers(0, bundle.num_classes, bundle.batch_size)
        ]
        return tf.data.Dataset.from_tensors((images, labels)).repeat(), None, None
    # keras_fit: the training images as the pipeline yields them (float32, one-hot), in memory
    wanted = _in_memory_count(bundle)
    xs, ys, kept = [], [], 0
    for x, y in bundle.train:
        xs.append(x.numpy())
        ys.append(y.numpy())
        kept += len(xs[-1])
        if kept >= wanted:
            break
    images, labels = np.concatenate(xs)[:wanted], np.concatenate(ys)[:wanted]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    return dataset.batch(bundle.batch_size).prefetch(tf.data.AUTOTUNE), None, None


def measure_iteration(
    dataset, *, warmup_steps: int, steps: int, windows: int, label: str = "pipeline"
) -> list[float]:
    """Images/s of iterating ``dataset`` (batches of ``(images, labels)``), repeated.

    Args:
        dataset: batched ``tf.data.Dataset``; repeated so that it never runs out.
        warmup_steps: batches taken before timing.
        steps: batches per window.
        windows: windows timed.
        label: shown in the progress lines.

    Returns:
        Each window's images/s.
    """
    iterator = iter(dataset.repeat())
    for _ in range(warmup_steps):
        next(iterator)
    rates = []
    for k in range(1, windows + 1):
        images, start = 0, time.perf_counter()
        for _ in range(steps):
            images += int(next(iterator)[0].shape[0])
        rates.append(images / max(time.perf_counter() - start, 1e-9))
        _progress(label, k, windows, rates[-1])
    return rates


def measure_fit(
    model,
    dataset,
    *,
    warmup_steps: int,
    steps: int,
    windows: int,
    batch_size: int,
    steps_per_epoch: int | None = None,
    count: int | None = None,
    class_weight: dict | None = None,
    label: str = "fit",
) -> list[float]:
    """Images/s of ``model.fit`` on ``dataset``, timed per window by a callback.

    Args:
        model: a compiled Keras model.
        dataset: batched ``tf.data.Dataset``: finite (epochs follow one
            another, as in training) or endless.
        warmup_steps: training steps before timing.
        steps: training steps per window.
        windows: windows timed.
        batch_size: global batch size.
        steps_per_epoch: batches in one pass of a finite ``dataset``, else None.
        count: examples in one pass of a finite ``dataset`` (sizes its last batch).
        class_weight: per-class loss weights, as training passes them, or None.
        label: shown in the progress lines.

    Returns:
        Each window's images/s.
    """
    total = warmup_steps + steps * windows
    if steps_per_epoch:
        fit_args = {"epochs": -(-total // steps_per_epoch) + 1}  # stopped by the timer
    else:
        fit_args = {"epochs": 1, "steps_per_epoch": total}
    images_of = images_per_step(batch_size, steps_per_epoch, count)
    timer = _window_timer(
        warmup_steps=warmup_steps, steps=steps, windows=windows, images_of=images_of, label=label
    )
    model.fit(
        dataset,
        callbacks=[timer],
        verbose=0,
        shuffle=False,
        class_weight=class_weight,
        **fit_args,
    )
    if len(timer.rates) < windows:
        raise PipelineError(
            f"{label}: fit ended after {len(timer.rates)} of {windows} windows; lower "
            "bench.steps or bench.windows."
        )
    return timer.rates


def images_per_step(
    batch_size: int, steps_per_epoch: int | None, count: int | None
) -> Callable[[int], int]:
    """Images in step ``i`` of an epoch: a full batch, the short last one, or none past the end.

    Keras reports steps run ``steps_per_execution`` at a time, and an epoch's last
    execution may reach past its end.
    """
    if not steps_per_epoch:
        return lambda step: batch_size
    last = count - (steps_per_epoch - 1) * batch_size

    def images_of(step: int) -> int:
        if step >= steps_per_epoch:
            return 0
        return last if step == steps_per_epoch - 1 else batch_size

    return images_of


def _window_timer(*, warmup_steps, steps, windows, images_of: Callable[[int], int], label):
    """A Keras callback timing windows of training steps; it stops ``fit`` after the last.

    Keras turns each step's logs into Python numbers before ``on_train_batch_end``
    (the TensorFlow backend dispatches callbacks synchronously), so a timestamp
    taken there follows the step's completion.
    """
    import keras

    class WindowTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rates: list[float] = []
            self._done = 0  # steps finished, over all epochs
            self._images = 0  # since the window began
            self._start = None
            self._begin = 0

        def on_train_begin(self, logs=None):
            if warmup_steps == 0:
                self._start = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            self._begin = batch

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            ran = [images_of(s) for s in range(self._begin, batch + 1)]  # steps_per_execution
            self._done += sum(n > 0 for n in ran)
            if self._start is None:
                if self._done >= warmup_steps:
                    self._start = now
                return
            self._images += sum(ran)
            if self._done >= warmup_steps + steps * (len(self.rates) + 1):
                self.rates.append(self._images / max(now - self._start, 1e-9))
                _progress(label, len(self.rates), windows, self.rates[-1])
                self._start, self._images = now, 0
                if len(self.rates) == windows:
                    self.model.stop_training = True

    return WindowTimer()


def _progress(label: str, k: int, windows: int, rate: float) -> None:
    print(f"  {label}: window {k}/{windows}: {rate:,.0f} images/s", flush=True)


def summarize(windows: dict[str, list[float]]) -> dict:
    """Medians and ratios of per-window images/s.

    Args:
        windows: measurement name -> each window's images/s.

    Returns:
        ``{"images_per_sec": {name: median}, "windows": windows, "ratios":
        {"a/b": median a / median b or None when either is missing}}``.
    """
    medians = {name: statistics.median(rates) for name, rates in windows.items()}
    ratios = {}
    for name, (top, bottom, _) in RATIOS.items():
        ok = top in medians and bottom in medians and medians[bottom] > 0
        ratios[name] = medians[top] / medians[bottom] if ok else None
    return {"images_per_sec": medians, "windows": windows, "ratios": ratios}


def format_table(result: dict) -> str:
    """The console summary of ``bench``'s result."""
    rates, s, p = result["images_per_sec"], result["settings"], result["plan"]
    rows = [(name, f"{rate:>9,.0f} images/s") for name, rate in rates.items()]
    for name, value in result["ratios"].items():
        if value is not None:
            rows.append((name, f"{value:>9.2f}  ({RATIOS[name][2]})"))
    rows += [
        ("strategy / replicas", f"{p['strategy']} / {p['num_replicas']}"),
        ("precision / XLA", f"{p['precision']} / {p['jit_compile']}"),
        ("batch", f"{s['batch_size']} global, steps_per_execution {s['steps_per_execution']}"),
        ("windows", f"median of {s['windows']} x {s['steps']} steps after {s['warmup_steps']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows) + "\n"


@hydra_main("bench")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (see ``conf/bench.yaml``)."""
    if cfg.get("backend", "tensorflow") != "jax":  # JAX's bench imports no TensorFlow
        quiet_tensorflow()
    with user_errors(log):
        bench(cfg)


if __name__ == "__main__":
    main()
