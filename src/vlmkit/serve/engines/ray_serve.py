"""``vlmkit serve MODEL --replicas N``: N replicas of vlmkit's worker on Ray Serve, behind one vlmkit front.

One Ray Serve application, ``vlmkit``::

    Ray Serve's HTTP proxy (--host, --port)
      -> Front   1 replica, no CPU: vlmkit's app (validation, media policy, limits, error bodies,
                 /metrics, the page): the same API and page as one ``vlmkit serve``
      -> Worker  N replicas (--num-cpus-per-replica / --num-gpus-per-replica each): one model and
                 vlmkit's dynamic batching (``serve.scheduler.Scheduler``) per replica

Ray's router sends each request to a worker with room (each takes ``--max-batch-size`` at once,
the batch it generates together; the rest wait in the router); the front bounds what is in
flight overall (replicas x ``--max-batch-size`` + ``--max-queue``; 429 past it). A worker
that dies is restarted by Ray Serve; the front retries what it had in flight elsewhere
(``front.RemoteScheduler``): at once when nothing was sent yet, replayed and checked when the
request is greedy or seeded, else it fails with a 500 that says so. Nothing is answered twice.

Ray is started on this machine by vlmkit (and stopped at exit), or joined with
``--ray-address`` (``ray start --head`` on one host, ``ray start --address HEAD:6379`` on the
others: the README has the recipe); the model path must be readable on every node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time

import ray
from ray import serve

from ...errors import VlmkitError
from ...runtime.generation import ContextError, SamplingParams
from ..scheduler import DeadlineError, Job, Scheduler
from .front import EngineError, EngineFailed, EngineRefused, EngineReply, RemoteScheduler

APP = "vlmkit"
LOAD_TIMEOUT = 600.0  # seconds for every worker to load its model
# the front's router asks each worker for its queue length before it sends a request, and skips a worker
# that does not answer within 0.1 s; a worker decoding on a busy CPU answers late, so the router would pile
# every request on one worker. These deadlines suit CPU-bound workers.
ROUTER_ENV = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
              "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0"}
# Ray Serve's own defaults give its HTTP proxy 5 s to get ready; on a busy machine (the model loading beside it,
# a few cores) it needs more, or the controller kills it and nothing serves
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}
log = logging.getLogger("vlmkit.serve")


class ReplicaBusy(Exception):
    """A worker's own queue was full (another replica may have room: retried)."""


# a worker's error, sent as {"kind", "message"} (exceptions do not cross processes reliably) -> the front's
ERRORS = {"context": ContextError, "deadline": DeadlineError, "refused": EngineRefused, "busy": ReplicaBusy,
          "failed": EngineFailed}


def _error_kind(error: BaseException) -> str:
    kinds = ((ContextError, "context"), (DeadlineError, "deadline"), (VlmkitError, "refused"))
    return next((kind for cls, kind in kinds if isinstance(error, cls)), "failed")


def _message(error: BaseException) -> str:
    return getattr(error, "message", None) or f"{type(error).__name__}: {error}"


@serve.deployment(name="Worker")
class Worker:
    """One model and its dynamic batching; ``generate`` streams a job's events."""

    def __init__(self, model: str, options, settings):
        from ...runtime.model import load

        loaded = load(model, options=options)
        loaded.backend.image_max_pixels = settings.max_image_pixels
        loaded.prefix_cache.max_bytes = settings.prefix_cache_size
        self.scheduler = Scheduler(loaded, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)
        context = serve.get_replica_context()
        replica = getattr(context, "replica_tag", None) or context.replica_id.unique_id
        self.identity = {"replica": str(replica), "pid": os.getpid(),
                         "node": ray.get_runtime_context().get_node_id()}

    def ready(self) -> dict:
        return self.identity

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose generation thread died."""
        if not self.scheduler.thread.is_alive():
            raise RuntimeError("the generation thread died")

    async def generate(self, messages: list[dict], params: SamplingParams, timeout: float):
        job = Job(messages, params, asyncio.get_running_loop(), deadline=time.monotonic() + timeout)
        if not self.scheduler.submit(job):
            yield "error", {"kind": "busy", "message": "the replica's queue is full"}
            return
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "start":
                    yield "start", self.identity
                elif kind == "delta":
                    yield "delta", payload
                elif kind == "done":
                    yield "done", {"text": payload.text, "prompt_tokens": payload.prompt_tokens,
                                   "completion_tokens": payload.completion_tokens,
                                   "finish_reason": payload.finish_reason}
                    return
                elif kind == "cancelled":
                    yield "error", {"kind": "failed", "message": "cancelled"}
                    return
                else:
                    yield "error", {"kind": _error_kind(payload), "message": _message(payload)}
                    return
        finally:
            if not job.finished:  # the front went away (client disconnect, deadline): free the slot
                job.cancelled.set()


class RayBackend:
    """``front.Backend`` over the Worker deployment's handle; a lost or busy replica is retryable."""

    name = "ray serve"

    def __init__(self, handle):
        self.handle = handle
        self.replicas = None  # a Counter per replica, once the app has its metrics

    def attach(self, metrics) -> None:
        from prometheus_client import Counter

        self.replicas = Counter("vlmkit_replica_requests", "requests answered by each worker replica",
                                ["replica", "node", "pid"], registry=metrics.registry)

    async def stream(self, messages: list[dict], params: SamplingParams, timeout: float):
        response = self.handle.options(stream=True).generate.remote(messages, params, timeout)
        done, identity = False, None
        try:
            async for kind, payload in response:
                if kind == "start":
                    identity = payload
                    yield "start", payload
                elif kind == "delta":
                    yield "delta", payload
                elif kind == "done":
                    done = True
                    if self.replicas is not None and identity:
                        self.replicas.labels(identity["replica"], identity["node"], str(identity["pid"])).inc()
                    yield "done", EngineReply(**payload)
                    return
                else:
                    done = True
                    raise ERRORS.get(payload["kind"], EngineFailed)(payload["message"])
        finally:
            if not done:
                response.cancel()

    def retryable(self, error: BaseException) -> bool:
        from ray.exceptions import ActorUnavailableError, RayActorError

        return isinstance(error, (RayActorError, ActorUnavailableError, ReplicaBusy))

    def problem(self) -> str | None:
        return None  # Ray Serve replaces dead replicas itself


@serve.deployment(name="Front", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Front:
    """vlmkit's app in front of the workers (the page, the API, every limit and error body)."""

    def __init__(self, worker, settings, max_pending: int, replicas: int):
        self.worker, self.settings, self.max_pending, self.replicas = worker, settings, max_pending, replicas

    def __serve_build_asgi_app__(self):
        from ..app import create_app

        backend = RayBackend(self.worker)

        def load():  # /health says 200 once every worker has loaded its model (not at the first one)
            deadline = time.monotonic() + LOAD_TIMEOUT
            while self._running_workers() < self.replicas:
                if time.monotonic() > deadline:
                    raise EngineFailed(f"ray serve: {self._running_workers()} of {self.replicas} worker(s) loaded "
                                       f"the model in {LOAD_TIMEOUT:.0f} s; see Ray's logs")
                time.sleep(0.5)
            return self.worker.ready.remote().result(timeout_s=LOAD_TIMEOUT)

        def scheduler(_ready, settings, metrics):
            backend.attach(metrics)
            return RemoteScheduler(backend, max_pending=self.max_pending, metrics=metrics, retries=3)

        return create_app(load, self.settings, scheduler_factory=scheduler)

    @staticmethod
    def _running_workers() -> int:
        application = serve.status().applications.get(APP)
        worker = application.deployments.get("Worker") if application else None
        return worker.replica_states.get("RUNNING", 0) if worker else 0


def application(model: str, settings, options, *, replicas: int, num_cpus: float, num_gpus: float):
    """The bound Ray Serve application: the front over ``replicas`` workers."""
    # a replica takes what it can batch; the rest waits in Ray's router for the first replica with room
    # (were a replica to take its whole --max-queue, the router could pile a burst on one replica)
    worker = Worker.options(num_replicas=replicas, max_ongoing_requests=settings.max_batch_size,
                            max_queued_requests=-1, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                            health_check_period_s=5, graceful_shutdown_timeout_s=5)
    pending = replicas * settings.max_batch_size + settings.max_queue
    front = Front.options(max_ongoing_requests=pending + 64,
                          ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": ROUTER_ENV}})
    return front.bind(worker.bind(model, options, settings), settings, pending, replicas)


def run(model: str, settings, options, *, replicas: int, address: str | None, num_cpus: float, num_gpus: float,
        host: str, port: int) -> int:
    """Serve on Ray until SIGINT / SIGTERM: start (or join) Ray, deploy, wait, clean up."""
    for name, value in RAY_ENV.items():  # inherited by the Ray that vlmkit starts (a cluster keeps its own)
        os.environ.setdefault(name, value)
    started = address is None
    if started:  # a local Ray with room for every replica (logical CPUs: N replicas may share few cores)
        ray.init(num_cpus=max(os.cpu_count() or 1, int(replicas * num_cpus + 0.999)), include_dashboard=False,
                 log_to_driver=False, object_store_memory=256 * 1024 * 1024)
    else:
        ray.init(address=address, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _deploy(model, settings, options, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus, host=host,
                port=port, where="local, started by vlmkit" if started else address)
        stop.wait()
    finally:
        try:
            serve.delete(APP)
            if started:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _deploy(model: str, settings, options, *, replicas: int, num_cpus: float, num_gpus: float, host: str, port: int,
            where: str) -> None:
    """Start Ray Serve's proxy and deploy the application; a Ray failure becomes an ``EngineError``."""
    from ray.exceptions import RayError

    try:
        # one HTTP proxy, on the head node: several nodes on one machine would race for the same port
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
        print(f"vlmkit serve: {settings.model_name}: {replicas} replica(s) on Ray ({where}; Ray address "
              f"{ray.get_runtime_context().gcs_address}); loading...", file=sys.stderr, flush=True)
        serve.run(application(model, settings, options, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus),
                  name=APP, route_prefix="/", blocking=False)
    except RayError as e:
        reason = str(e).strip().splitlines()
        raise EngineError(f"Ray Serve did not start: {type(e).__name__}: {reason[0] if reason else ''}",
                          hint="Ray's own logs are under /tmp/ray/session_latest/logs; on a busy machine raise "
                               "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S") from None
    print(f"vlmkit serve: {settings.model_name} on http://{host}:{port} (Ray Serve, {replicas} replica(s))",
          file=sys.stderr, flush=True)
