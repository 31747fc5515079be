"""Devices and the plan: what this machine has, and the strategy, precision and XLA to use.

``setup_devices`` must run before TensorFlow touches a device; ``plan`` turns the
``auto`` choices into concrete ones for the devices found (train, doctor and bench
all ask it); ``make_strategy`` creates the tf.distribute strategy (or, under
Keras-JAX, a :class:`JaxStrategy`). TensorFlow is imported only where a function
needs it, so planning works where only JAX is installed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device", "default")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", True, False)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo: bfloat16 dot products in hardware


def cpu_bfloat16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """This CPU's bfloat16 instruction sets (AVX512_BF16, AMX-BF16) that oneDNN uses.

    With one of them a CPU multiplies bfloat16 at twice float32's rate or more
    (``mixed_bfloat16`` pays on a CPU); without, oneDNN emulates it, usually
    slower than float32. Empty where ``/proc/cpuinfo`` cannot be read (not Linux).
    """
    try:
        with open(cpuinfo) as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except (OSError, IndexError):
        return []
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


@dataclass
class Devices:
    """What TensorFlow sees: GPUs with compute capability, and CPU devices."""

    gpus: list[dict]
    cpus: list[str]

    @property
    def min_compute_capability(self) -> tuple[int, int] | None:
        caps = [tuple(g["compute_capability"]) for g in self.gpus if g.get("compute_capability")]
        return min(caps) if caps else None


@dataclass
class Plan:
    """The resolved strategy, precision and XLA choice, and why."""

    strategy: str
    precision: str
    jit_compile: bool
    reasons: list[str] = field(default_factory=list)


def setup_devices(
    *, logical_cpus: int | None, deterministic: bool, seed: int, backend: str = "tensorflow"
) -> Devices:
    """Configures devices, determinism and seeds; call before any TensorFlow op.

    Args:
        logical_cpus: split the CPU into this many logical devices (to run
            MirroredStrategy without GPUs), or None. TensorFlow backend only.
        deterministic: turn on TensorFlow's op determinism (the tf.data input
            pipeline too under the JAX backend).
        seed: seeds Python, NumPy, TensorFlow and Keras.
        backend: ``tensorflow``, or ``jax``: the devices are JAX's local ones.

    Returns:
        The devices found.
    """
    import keras
    import tensorflow as tf

    if backend == "jax":
        return _setup_jax_devices(deterministic=deterministic, seed=seed)
    if logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        configs = [tf.config.LogicalDeviceConfiguration() for _ in range(int(logical_cpus))]
        try:
            tf.config.set_logical_device_configuration(cpu, configs)
        except RuntimeError as err:
            current = len(tf.config.list_logical_devices("CPU"))
            if current != logical_cpus:
                raise PipelineError(
                    f"trainer.logical_cpus={logical_cpus} cannot be applied: TensorFlow "
                    f"already started with {current} CPU device(s) in this process ({err})."
                ) from err
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(
            {
                "name": gpu.name,
                "device_name": details.get("device_name", ""),
                "compute_capability": list(details.get("compute_capability", ()) or ()),
            }
        )
    # Named from the configuration, not listed: listing starts TensorFlow's runtime, and
    # MultiWorkerMirroredStrategy must configure its collective ops before that happens.
    cpu = tf.config.list_physical_devices("CPU")[0]
    n_cpus = len(tf.config.get_logical_device_configuration(cpu) or [cpu])
    cpus = [f"/device:CPU:{i}" for i in range(n_cpus)]
    return Devices(gpus=gpus, cpus=cpus)


def _setup_jax_devices(*, deterministic: bool, seed: int) -> Devices:
    import keras

    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # the tf.data pipeline feeding Keras
    keras.utils.set_random_seed(seed)
    return jax_devices()


def jax_devices() -> Devices:
    """This host's JAX devices, described as for TensorFlow; imports no TensorFlow."""
    import jax

    local = jax.local_devices()
    gpus = [
        {
            "name": str(d),
            "device_name": getattr(d, "device_kind", ""),
            "compute_capability": [
                int(p) for p in str(getattr(d, "compute_capability", "") or "").split(".") if p
            ],
        }
        for d in local
        if d.platform == "gpu"
    ]
    return Devices(gpus=gpus, cpus=[str(d) for d in local if d.platform == "cpu"])


def plan(
    *,
    strategy: str,
    precision: str,
    jit_compile,
    devices: Devices,
    backend: str = "tensorflow",
    deterministic: bool = False,
) -> Plan:
    """Resolves ``auto`` choices for the devices found (XLA stays off when ``deterministic``).

    The one answer for ``pipeline.train``, ``pipeline.doctor`` and ``pipeline.bench``.

    Raises:
        PipelineError: an unknown choice.
    """
    if strategy not in STRATEGIES:
        raise PipelineError(f"trainer.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if precision not in PRECISIONS:
        raise PipelineError(f"trainer.precision must be one of {PRECISIONS}, got {precision!r}")
    if jit_compile not in JIT_CHOICES:
        raise PipelineError(f"trainer.jit_compile must be auto, true or false, got {jit_compile!r}")
    reasons: list[str] = []
    strategy = _plan_strategy(strategy, devices, backend, reasons)
    precision = _plan_precision(precision, devices, reasons)
    jit_compile = _plan_jit(jit_compile, devices, backend, deterministic, reasons)
    return Plan(
        strategy=strategy, precision=precision, jit_compile=bool(jit_compile), reasons=reasons
    )


def _plan_strategy(strategy: str, devices: Devices, backend: str, reasons: list[str]) -> str:
    n_gpus = len(devices.gpus)
    if backend == "jax":
        if strategy == "multi_worker":
            raise PipelineError(
                "trainer.strategy=multi_worker needs backend=tensorflow; under JAX use "
                "trainer.strategy=auto (data parallel over this host's devices)"
            )
        n_local = len(devices.gpus) or len(devices.cpus)
        single = strategy in ("one_device", "default") or n_local < 2  # as one TF device
        resolved = "jax_single" if single else "jax_data_parallel"
        reasons.append(f"strategy {strategy} -> {resolved} (JAX, {n_local} local device(s))")
        return resolved
    if strategy != "auto":
        return strategy
    from pipeline.training import distributed

    cluster = distributed.cluster_source()
    if cluster == "TF_CONFIG":
        strategy, why = "multi_worker", "TF_CONFIG is set"
    elif cluster == "SLURM":
        strategy, why = "multi_worker", f"a SLURM step of {distributed.slurm_tasks()} tasks"
    elif n_gpus > 1:
        strategy, why = "mirrored", f"{n_gpus} GPUs"
    else:
        strategy, why = "default", f"{n_gpus or 'no'} GPU{'s' if n_gpus != 1 else ''}"
    reasons.append(f"strategy auto -> {strategy} ({why})")
    return strategy


def _plan_precision(precision: str, devices: Devices, reasons: list[str]) -> str:
    if precision == "mixed_bfloat16" and not devices.gpus:
        flags = cpu_bfloat16_flags()
        reasons.append(
            f"precision mixed_bfloat16 (set explicitly; the CPU has {', '.join(flags)}: "
            "bfloat16 in hardware)"
            if flags
            else "precision mixed_bfloat16 (set explicitly; the CPU has no bfloat16 instructions, "
            "AVX512_BF16 or AMX: emulated, usually slower than float32)"
        )
    if precision != "auto":
        return precision
    cap = devices.min_compute_capability
    if cap is None:
        precision, why = "float32", "no GPU"
    elif cap >= (8, 0):
        precision, why = "mixed_bfloat16", f"compute capability {cap[0]}.{cap[1]}"
    elif cap >= (7, 0):
        precision, why = "mixed_float16", f"compute capability {cap[0]}.{cap[1]}"
    else:
        precision, why = "float32", f"compute capability {cap[0]}.{cap[1]} < 7.0"
    reasons.append(f"precision auto -> {precision} ({why})")
    return precision


def _plan_jit(jit_compile, devices: Devices, backend: str, deterministic: bool, reasons) -> bool:
    if jit_compile != "auto":
        return bool(jit_compile)
    if backend == "jax":
        reasons.append("jit_compile auto -> True (JAX)")
        return True  # un-jitted JAX runs op by op, far slower than XLA even on a CPU
    if deterministic:
        reasons.append("jit_compile auto -> False (trainer.deterministic)")
        return False  # XLA's GPU kernels are not all deterministic
    on = bool(devices.gpus)
    reasons.append(f"jit_compile auto -> {on} ({'GPU' if on else 'CPU only'})")
    return on


class JaxStrategy:
    """What ``fit`` needs of a strategy under the JAX backend.

    Keras distributes through ``keras.distribution`` there: ``jax_data_parallel``
    sets a global ``DataParallel`` over the local devices, so the scope is a no-op.
    """

    def __init__(self, name: str):
        import keras

        self.name = name
        self.num_replicas_in_sync = 1
        keras.distribution.set_distribution(None)
        if name == "jax_data_parallel":
            distribution = keras.distribution.DataParallel()
            keras.distribution.set_distribution(distribution)
            self.num_replicas_in_sync = len(distribution.device_mesh.devices.flatten())

    def scope(self):
        return contextlib.nullcontext()


def make_strategy(name: str, devices: Devices):
    """Creates the tf.distribute strategy ``name`` (already resolved from auto).

    ``jax_single`` and ``jax_data_parallel`` (the JAX backend) give a :class:`JaxStrategy`.
    """
    if name in ("jax_single", "jax_data_parallel"):
        return JaxStrategy(name)
    import tensorflow as tf

    from pipeline.training import compat, distributed

    gpu_names = [g["name"].replace("physical_device:", "") for g in devices.gpus]
    if name in ("mirrored", "multi_worker"):
        compat.patch_symbolic_build()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=gpu_names or devices.cpus)
    if name == "multi_worker":
        compat.patch_multi_worker_reduce()
        resolver = distributed.cluster_resolver()  # None: one worker, this machine's devices
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpu_names[0] if gpu_names else devices.cpus[0])
    if name == "default":
        return tf.distribute.get_strategy()
    raise PipelineError(f"trainer.strategy must be one of {STRATEGIES}, got {name!r}")
