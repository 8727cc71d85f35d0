"""An engine's own server as a child process: on a free loopback port, logged to a file, watched, stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable

from .front import EngineError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the engine gets SIGTERM if vlmkit dies without stopping it (no orphaned engines)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EngineProcess:
    """``argv`` started in its own process group, its output in ``log``; ``stop`` ends the whole group.

    Args:
        name: the engine's name in messages ("vllm", "llama.cpp").
        argv: the command line.
        port: the loopback port it serves on.
        env: extra environment variables.
        health: the route that answers 200 once the engine is ready.
    """

    def __init__(self, name: str, argv: list[str], port: int, *, env: dict | None = None, health: str = "/health"):
        self.name, self.argv, self.port, self.health = name, argv, port, health
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkdtemp(prefix=f"vlmkit-{name.replace('.', '')}-")) / "engine.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after: float | None = None
        self.stopping = False
        self.on_stop: list[Callable[[], object]] = []  # run once, after the engine stopped (temporary folders)

    def start(self) -> "EngineProcess":
        with open(self.log, "wb") as log:
            self.started_at = time.monotonic()
            try:
                self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            except OSError as e:
                raise EngineError(f"cannot start {self.name}: {self.argv[0]}: {e.strerror}") from None
        return self

    def wait_ready(self, timeout: float) -> float:
        """Block until the health route answers 200; returns the start-up time in seconds.

        Raises:
            EngineError: the engine exited or did not get ready in ``timeout`` s (quoting its log).
        """
        import httpx2 as httpx

        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(f"{self.name} exited with code {self.process.returncode} while starting; the end "
                                  f"of its log ({self.log}):\n{self.tail()}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    return self.ready_after
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise EngineError(f"{self.name} was not ready after {timeout:.0f} s; the end of its log ({self.log}):\n"
                          f"{self.tail()}")

    def problem(self) -> str | None:
        """Why the engine cannot answer (it exited), or None."""
        if self.process is not None and self.process.poll() is not None and not self.stopping:
            return f"{self.name} exited with code {self.process.returncode}; see {self.log}"
        return None

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, "rb") as f:
                return "\n".join(deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=lines))
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the engine's process group, SIGKILL what is left after ``grace`` seconds; then ``on_stop``."""
        self.stopping = True
        try:
            self._stop(grace)
        finally:
            while self.on_stop:
                self.on_stop.pop()()

    def _stop(self, grace: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = self.process.pid  # its own session: the group id is its pid
        try:
            os.killpg(group, signal.SIGTERM)
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
