"""Real servers (uvicorn, started by the tests on free loopback ports) over the tiny converted LLaVA."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Forker:
    """``fork_server.py`` for this test process, started on first use: forks a ``vlmkit serve`` per server."""

    process: subprocess.Popen | None = None

    @classmethod
    def start(cls, argv: list[str], env: dict, log: Path) -> int:
        if cls.process is None or cls.process.poll() is not None:
            cls.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_server.py"))],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            atexit.register(cls.process.stdin.close)  # the fork server ends when its input does
        cls.process.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        cls.process.stdin.flush()
        return int(cls.process.stdout.readline())


class Server:
    """``vlmkit serve MODEL --port <free> --served-model-name tiny-llava FLAGS``, healthy, until ``stop()``.

    The process is a fork of ``fork_server.py`` running ``vlmkit.cli.main``: the same command as
    ``python -m vlmkit.cli serve``, without importing torch and transformers again for each server.
    """

    def __init__(self, model: Path, *flags: str, env: dict | None = None):
        import httpx2 as httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="vlmkit-serve-", suffix=".log")[1])
        argv = ["serve", str(model), "--port", str(self.port), "--served-model-name", "tiny-llava", *map(str, flags)]
        self.pid = Forker.start(argv, {**os.environ, **(env or {})}, self.log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"the server exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not become healthy within 120 s")

    def running(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self):
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.running():
                break
        self.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "cat.png").write_bytes((PHOTOS / "chelsea.png").read_bytes())
    return folder


@pytest.fixture(scope="session")
def server(models, media_dir):
    s = Server(models["v15-hf"], "--max-batch-size", "4", "--max-tokens", "64", "--max-body-size", "4MB",
               "--max-image-pixels", "1000000", "--allowed-local-media-path", str(media_dir))
    yield s
    s.stop()


def post_and_hang_up(port: int, body: dict, *, until, headers: dict | None = None, wait: float = 30) -> None:
    """POST a chat request on a raw loopback socket, wait until ``until()`` says it is being answered, then
    close the socket without reading anything: a client that went away."""
    import json

    raw = json.dumps(body).encode()
    head = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(raw)),
            **(headers or {})}
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n"
                  + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + raw)
        deadline = time.monotonic() + wait
        while not until():
            assert time.monotonic() < deadline, "the request was never being answered"
            time.sleep(0.05)


def join_running_batch(model, long: tuple, short: tuple) -> tuple[list[str], object, object]:
    """Continuous batching's scenario: ``long`` (messages, SamplingParams) submitted to a ``Scheduler`` over
    ``model``, ``short`` submitted once the long answer is being generated.

    Returns the order the two finished in (``["short", "long"]`` when the short one joined the running
    batch) and their replies (long, short).
    """
    import asyncio

    from vlmkit.serve.scheduler import Job, Scheduler

    scheduler = Scheduler(model, max_batch_size=4)

    async def scenario():
        loop = asyncio.get_running_loop()
        finished: list[str] = []

        async def answer(name, job):
            while True:
                kind, payload = await job.events.get()
                if kind in ("done", "error", "cancelled"):
                    finished.append(name)
                    return payload

        first = Job(*long, loop, deadline=time.monotonic() + 120)
        scheduler.submit(first)
        while (await first.events.get())[0] != "delta":  # the long answer is being generated
            pass
        second = Job(*short, loop, deadline=time.monotonic() + 120)
        scheduler.submit(second)
        return finished, await asyncio.gather(answer("long", first), answer("short", second))

    finished, (long_reply, short_reply) = asyncio.run(scenario())
    return finished, long_reply, short_reply
