"""Training across machines: the cluster this process belongs to, and who writes the run.

MultiWorkerMirroredStrategy learns the cluster from a resolver: ``TF_CONFIG``
(set by hand, by Kubeflow's TFJob or another launcher) or, without it, a SLURM
job step of more than one task (``srun``). Every worker runs the same program
on its shard of each global batch; the chief (task ``chief``, else worker 0)
writes the run, the others write to a temporary directory that is removed when
they exit (TensorFlow's multi-worker idiom: they still run every callback,
whose collective ops need all workers).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from pipeline.errors import PipelineError

SLURM_PORT_BASE = 20_000  # + job id mod 10,000: jobs sharing a node use different ports
SLURM_PORT_SPAN = 10_000


def slurm_tasks() -> int:
    """The number of tasks in this process's SLURM job step, 0 outside one.

    ``srun`` sets ``SLURM_STEP_NUM_TASKS``; a batch script run without ``srun``
    has none, so it trains as one process.
    """
    if not (os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_PROCID")):
        return 0
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", "0"))
    except ValueError:
        return 0


def cluster_source() -> str | None:
    """``TF_CONFIG``, ``SLURM`` (a step of several tasks) or None: where the cluster comes from."""
    if os.environ.get("TF_CONFIG"):
        return "TF_CONFIG"
    if slurm_tasks() > 1:
        return "SLURM"
    return None


def _check_tf_config(raw: str) -> None:
    try:
        parsed = json.loads(raw)
    except ValueError as err:
        raise PipelineError(f"TF_CONFIG is not valid JSON ({err}): {raw[:200]!r}") from err
    task = parsed.get("task") if isinstance(parsed, dict) else None
    cluster = parsed.get("cluster") if isinstance(parsed, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise PipelineError(
            'TF_CONFIG needs {"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
            f'"worker", "index": N}}}}, got {raw[:200]!r}'
        )
    members = cluster.get(task.get("type"), [])
    if not isinstance(task.get("index"), int) or not 0 <= task["index"] < len(members):
        raise PipelineError(
            f"TF_CONFIG's task {task} is not in its cluster {cluster}: task.type must name "
            "one of the cluster's jobs and task.index one of its addresses (from 0)"
        )


class _SlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
    """SLURM's resolver, with the GPUs this task already sees.

    TensorFlow's resolver would ask ``nvidia-smi`` for the node's GPUs (failing
    where there is none) and set ``CUDA_VISIBLE_DEVICES`` by rank, too late once
    TensorFlow has listed its GPUs. Here SLURM binds GPUs to tasks
    (``--gpus-per-task``), or one task per node uses all of its node's.
    """

    def __init__(self):
        port_base = SLURM_PORT_BASE + int(os.environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
        # Placeholder GPU counts: with auto_set_gpu off they only lay out one port per
        # task (the resolver pairs tasks with GPU slots); num_accelerators is the real count.
        slots = slurm_tasks()
        super().__init__(
            port_base=port_base, gpus_per_node=slots, gpus_per_task=1, auto_set_gpu=False
        )

    def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
        return {"GPU": len(tf.config.list_physical_devices("GPU"))}


def cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver | None:
    """The resolver for this process's cluster (see :func:`cluster_source`), or None.

    Raises:
        PipelineError: TF_CONFIG or the SLURM variables cannot describe a cluster.
    """
    source = cluster_source()
    if source == "TF_CONFIG":
        _check_tf_config(os.environ["TF_CONFIG"])
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if source == "SLURM":
        try:
            return _SlurmResolver()
        except (RuntimeError, ValueError) as err:
            raise PipelineError(f"this SLURM step cannot be read as a cluster: {err}") from err
    return None


def is_chief(resolver: tf.distribute.cluster_resolver.ClusterResolver | None = None) -> bool:
    """Whether this process writes the run: task ``chief``, or worker 0 when there is none.

    Args:
        resolver: the cluster; by default :func:`cluster_resolver` (one process: the chief).
    """
    resolver = resolver or cluster_resolver()
    if resolver is None:
        return True
    jobs = resolver.cluster_spec().jobs  # a SLURM resolver assigns its task here
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in jobs


def worker_run_dir(run_dir: str | os.PathLike) -> Path:
    """Where this worker writes: ``run_dir`` on the chief, else a temporary directory.

    The temporary directory is removed when the process exits (also on an error).
    """
    if is_chief():
        return Path(run_dir)
    scratch = tempfile.mkdtemp(prefix="pipeline-worker-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return Path(scratch)


def sum_over_workers(strategy: tf.distribute.Strategy, value: float) -> float:
    """``value`` summed over every replica of every worker (a collective: all must call it).

    Used between steps, where Keras's train function is not running, so the
    workers agree on whether to stop and on the backup they resumed from.
    """
    return float(_summed(strategy)(tf.constant(float(value), tf.float32)))


def _summed(strategy: tf.distribute.Strategy):
    """A tensor summed over every replica of every worker: one traced function per strategy."""
    summed = _SUMS.get(id(strategy))
    if summed is None:

        @tf.function  # eager collectives under this strategy are slow and warn at every call
        def summed(x):
            per_replica = strategy.run(lambda: tf.identity(x))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        _SUMS[id(strategy)] = summed
    return summed


_SUMS: dict = {}  # one traced sum per strategy


def all_equal(strategy: tf.distribute.Strategy, value: float) -> bool:
    """Whether every worker holds the same ``value`` (all must call it).

    Equal values are exactly those where n * sum(x^2) == sum(x)^2, which every
    worker can check from two sums.
    """
    n = sum_over_workers(strategy, 1.0)
    total = sum_over_workers(strategy, value)
    squares = sum_over_workers(strategy, float(value) ** 2)
    return abs(n * squares - total**2) <= 1e-6 * max(1.0, total**2)


def worker_place(strategy: tf.distribute.Strategy) -> tuple[int, int, int]:
    """``(input pipeline index, workers, replicas per worker)`` of this process under ``strategy``.

    The same numbers ``distribute_datasets_from_function`` hands its dataset
    function (the chief, else worker 0, is pipeline 0).
    """
    context = strategy.extended._make_input_context()  # the InputContext of this worker
    workers = context.num_input_pipelines
    return context.input_pipeline_id, workers, strategy.num_replicas_in_sync // workers


def sum_array_over_workers(strategy: tf.distribute.Strategy, values):
    """A float64 NumPy array summed over the workers (each counted once; all must call it)."""
    import numpy as np

    _, _, replicas = worker_place(strategy)
    total = _summed(strategy)(tf.constant(np.asarray(values, np.float64)))
    return np.asarray(total, np.float64) / replicas  # every replica of a worker adds its copy
