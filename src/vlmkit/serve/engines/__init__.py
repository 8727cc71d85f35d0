"""Serving beyond one process: other engines, and replicas on Ray Serve, behind vlmkit's own front.

``vlmkit serve MODEL`` runs vlmkit's runtime in the server process (``--engine vlmkit``).
This package hands the model vlmkit converted to existing engines, and keeps the front —
the API, limits, media policy, error bodies, ``/metrics`` and the page of ``serve.app`` — the
same whatever generates (``front.RemoteScheduler``):

==============  ======================================  ==========================================
``--engine``    what generates                          model
==============  ======================================  ==========================================
``vlmkit``      vlmkit's runtime, in process            anything ``vlmkit.load`` runs
``vllm``        vLLM's OpenAI server (``vllm.py``)      a transformers folder written by vlmkit
``llama.cpp``   llama.cpp's ``llama-server``            a GGUF pair (``convert --to gguf``)
``--replicas``  N vlmkit workers on Ray Serve           anything ``vlmkit.load`` runs
==============  ======================================  ==========================================
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
import time

from ...errors import ConfigError
from .front import EngineError

ENGINES = {"vllm": "vllm", "llama.cpp": "llamacpp"}  # --engine -> module (``start`` and ``START_TIMEOUT``)
NAMES = ("vlmkit", *ENGINES)
log = logging.getLogger("vlmkit.serve")

# flags that only mean something with some engines: (flag, applies when, why not otherwise)
FLAG_RULES = (
    ("--replicas", lambda a: a.replicas is None or a.engine == "vlmkit",
     "--replicas runs vlmkit's worker on Ray Serve; for vLLM use --data-parallel-size N (vLLM's own data "
     "parallelism), for llama.cpp use --max-batch-size (its slots) or llama.cpp RPC (README)"),
    ("--ray-address", lambda a: a.ray_address is None or a.engine == "vlmkit",
     "--ray-address places vlmkit's workers on a Ray cluster (--engine vlmkit)"),
    ("--data-parallel-size", lambda a: a.data_parallel_size == 1 or a.engine == "vllm",
     "--data-parallel-size is passed to vLLM (--engine vllm)"),
    ("--mmproj", lambda a: a.mmproj is None or a.engine == "llama.cpp",
     "--mmproj names llama.cpp's vision file (--engine llama.cpp)"),
    ("--rpc", lambda a: a.rpc is None or a.engine == "llama.cpp",
     "--rpc names llama.cpp ggml-rpc-server hosts (--engine llama.cpp)"),
    ("--num-cpus-per-replica", lambda a: a.num_cpus_per_replica == 1 or a.replicas is not None,
     "--num-cpus-per-replica sizes Ray Serve replicas (--replicas N)"),
    ("--num-gpus-per-replica", lambda a: a.num_gpus_per_replica == 0 or a.replicas is not None,
     "--num-gpus-per-replica sizes Ray Serve replicas (--replicas N)"),
)


def check_flags(args) -> None:
    """Refuse flags the chosen engine ignores, naming the flag and what to use instead."""
    for flag, fine, why in FLAG_RULES:
        if not fine(args):
            raise ConfigError(f"{flag} does not apply to --engine {args.engine}: {why}")


def uses_front(args) -> bool:
    """True when ``vlmkit serve`` runs through this package (another engine, or Ray Serve)."""
    return args.engine != "vlmkit" or args.replicas is not None or args.ray_address is not None


def run(args, settings, options) -> int:
    """``vlmkit serve`` with ``--engine vllm|llama.cpp`` or ``--replicas``: serve until interrupted."""
    check_flags(args)
    if args.replicas is not None or args.ray_address is not None:
        from .ray_serve import run as run_ray

        return run_ray(str(args.model), settings, options, replicas=args.replicas or 1, address=args.ray_address,
                       num_cpus=args.num_cpus_per_replica, num_gpus=args.num_gpus_per_replica, host=args.host,
                       port=args.port)
    engine = importlib.import_module(f"{__name__}.{ENGINES[args.engine]}")
    process, backend = engine.start_from_args(args, settings, options)
    print(f"vlmkit serve: {settings.model_name} on http://{args.host}:{args.port}: starting {args.engine} "
          f"(log: {process.log})", file=sys.stderr, flush=True)
    return serve_engine(process, backend, settings, host=args.host, port=args.port, timeout=engine.START_TIMEOUT)


class EngineMetrics:
    """A Prometheus collector re-exporting an engine's own ``/metrics`` (``vllm:*``, ``llamacpp:*``)."""

    def __init__(self, url: str):
        self.url = url

    def describe(self):
        return []

    def collect(self):
        import httpx2 as httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = httpx.get(self.url, timeout=2).text
        except httpx.HTTPError:
            return
        yield from text_string_to_metric_families(text)


def serve_engine(process, backend, settings, *, host: str, port: int, timeout: float) -> int:
    """vlmkit's app over ``backend`` on ``host:port`` until interrupted or until the engine exits.

    Raises:
        EngineError: the engine exited (or never got ready), quoting the end of its log.
    """
    import uvicorn

    from ..app import create_app
    from .front import RemoteScheduler

    failure: list[BaseException] = []

    def load():
        try:
            return process.wait_ready(timeout)
        except Exception as e:
            failure.append(e)
            raise

    def scheduler(_ready, settings, metrics):
        metrics.registry.register(EngineMetrics(process.url + "/metrics"))
        return RemoteScheduler(backend, max_pending=settings.max_batch_size + settings.max_queue, metrics=metrics)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn re-raises SIGTERM/SIGINT on the way out: stop the engine first
            with super().capture_signals():
                try:
                    yield
                finally:
                    stopped.append(process.problem())
                    process.stop()

    stopped: list = []
    server = Server(uvicorn.Config(create_app(load, settings, scheduler_factory=scheduler), host=host, port=port,
                                   log_level="warning"))

    def watch():
        while not server.should_exit:
            problem = process.problem()
            if failure or problem:
                log.error("%s", failure[0] if failure else problem)
                server.should_exit = True
                return
            time.sleep(0.5)

    threading.Thread(target=watch, name="vlmkit-engine-watch", daemon=True).start()
    try:
        server.run()
    finally:
        died = stopped[0] if stopped else process.problem()
        process.stop()
    if failure:
        raise failure[0] if isinstance(failure[0], EngineError) else EngineError(str(failure[0]))
    if died:
        raise EngineError(f"{died}; the end of its log:\n{process.tail()}")
    return 0
