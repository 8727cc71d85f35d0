"""Real servers (uvicorn, started by the tests on free loopback ports) over the tiny converted LLaVA."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *flags: str, env: dict | None = None):
        import httpx2 as httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", str(model), "--port",
                                         str(self.port), "--served-model-name", "tiny-llava", *flags],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not become healthy within 120 s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


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
