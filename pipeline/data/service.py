"""A tf.data service's parts, one per process: ``python -m pipeline.data.service``.

    python -m pipeline.data.service dispatcher --port 5050 --work-dir /shared/dispatcher
    python -m pipeline.data.service worker --dispatcher host:5050        # on each CPU machine
    python -m pipeline.train data=folder data.path=/shared/images data.service=grpc://host:5050

The dispatcher coordinates; each worker runs the pipelines trainers send
(``pipeline.data.remote``: decoding, flipping, cropping of whole batches).
"""

from __future__ import annotations

import argparse
import socket
import sys

from pipeline.data.remote import address, check_reachable
from pipeline.errors import PipelineError

DEFAULT_PORT = 5050


def run_dispatcher(port: int, work_dir: str | None) -> None:
    """Starts a dispatcher on ``port`` and serves until killed.

    With ``work_dir`` it journals its state there (fault-tolerant mode), so a
    restarted dispatcher with the same work dir carries on with its workers.
    """
    import tensorflow as tf

    service = tf.data.experimental.service
    config = service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir)
    )
    server = service.DispatchServer(config)
    journal = (
        f", state journalled in {work_dir}" if work_dir else " (no --work-dir: not restartable)"
    )
    print(f"tf.data dispatcher listening on grpc://{socket.getfqdn()}:{port}{journal}", flush=True)
    print(f"train with: data.service=grpc://{socket.getfqdn()}:{port}", flush=True)
    server.join()


def run_worker(dispatcher: str, port: int, host: str | None = None) -> None:
    """Starts a worker of the dispatcher at ``host:port`` and serves until killed.

    ``host`` is the name or IP the trainer reaches this worker at (default:
    this machine's host name); the dispatcher passes it on to the trainer.
    """
    import tensorflow as tf

    dispatcher_host, dispatcher_port = address(dispatcher)
    check_reachable(f"grpc://{dispatcher_host}:{dispatcher_port}")
    service = tf.data.experimental.service
    reached_at = host or socket.gethostname()
    server = service.WorkerServer(
        service.WorkerConfig(
            dispatcher_address=f"{dispatcher_host}:{dispatcher_port}",
            port=port,
            worker_address=f"{reached_at}:%port%",
        )
    )
    print(
        f"tf.data worker of {dispatcher_host}:{dispatcher_port} serving at "
        f"{reached_at}:{port or '(a free port)'}",
        flush=True,
    )
    server.join()


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.data.service dispatcher|worker ...``."""
    from pipeline.terminal import quiet_tensorflow

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.data.service",
        description="Run a tf.data service dispatcher or worker that decodes and augments "
        "training batches for `pipeline.train data.service=grpc://host:port`.",
    )
    parts = parser.add_subparsers(dest="part", required=True)
    dispatcher = parts.add_parser("dispatcher", help="the coordinator (one per fleet)")
    dispatcher.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    dispatcher.add_argument(
        "--work-dir",
        default=None,
        help="where the dispatcher journals its state, so that a restart carries on",
    )
    worker = parts.add_parser("worker", help="a CPU process that runs the pipelines")
    worker.add_argument("--dispatcher", required=True, help="host:port of the dispatcher")
    worker.add_argument("--port", type=int, default=0, help="this worker's port (0: any free)")
    worker.add_argument(
        "--address",
        default=None,
        help="host name or IP the trainer reaches this worker at (default: this host's name)",
    )
    args = parser.parse_args(argv)
    quiet_tensorflow()
    try:
        if args.part == "dispatcher":
            run_dispatcher(args.port, args.work_dir)
        else:
            run_worker(args.dispatcher, args.port, args.address)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
