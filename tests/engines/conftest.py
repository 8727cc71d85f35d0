"""``vlmkit serve`` with other engines and on Ray Serve, started by the tests as real processes."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import pytest

from vlmkit.serve.engines.process import free_port

from ..conftest import built_once, run_cli

PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"
CAT, ROCKET, COFFEE, ASTRONAUT = (PHOTOS / n for n in ("chelsea.png", "rocket.png", "coffee.png", "astronaut.png"))


def data_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def ask(text: str, image: Path = CAT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}},
                                         {"type": "text", "text": text}]}]


BROKEN_IMAGE = data_url(CAT.read_bytes()[:4000])  # a PNG cut short


def assert_image_refused(server, url: str, words: str) -> None:
    """The front answers an image question with ``url`` by a 400 naming the image field and saying ``words``."""
    import httpx2 as httpx

    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": content}]})
    error = response.json()["error"]
    assert response.status_code == 400 and words in error["message"], error
    assert error["param"] == "messages.0.content.0.image_url"


class Served:
    """``vlmkit serve MODEL FLAGS`` on a free port, its output in a file; ready once ``/health`` says 200.

    Stopped with SIGTERM (vlmkit then stops its engine or its Ray), SIGKILL for what is left.
    """

    def __init__(self, model, *flags: str, timeout: float = 240, env: dict | None = None):
        import httpx2 as httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="vlmkit-serve-", suffix=".log")[1])
        self.started = time.monotonic()
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vlmkit.cli", "serve", str(model), "--port", str(self.port),
                 "--served-model-name", "tiny-llava", *flags], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vlmkit serve exited ({self.process.returncode}):\n{self.tail(40)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vlmkit serve was not ready within {timeout:.0f} s:\n{self.tail(40)}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(deque(self.log.read_text(errors="replace").splitlines(), maxlen=lines))

    def stop(self, grace: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@pytest.fixture(scope="session")
def gguf_folder(models, tmp_path_factory):
    """The GGUF pair ``vlmkit convert --to gguf`` writes of the tiny LLaVA-1.5, built once per run (read-only)."""
    def build(root: Path) -> Path:
        assert run_cli("convert", models["v15"], root / "v15-gguf", "--to", "gguf", "--quiet").code == 0
        return root / "v15-gguf"

    return built_once(tmp_path_factory, "v15-gguf", build)


@pytest.fixture(scope="session")
def reference(models):
    """vlmkit's runtime in this process: what the single-process server answers (tests/serve proves it)."""
    import vlmkit

    return vlmkit.load(models["v15-hf"])


def expected(reference, question: str, image: Path, max_tokens: int):
    return reference.chat([{"role": "user", "content": question, "images": [image]}], temperature=0,
                          max_new_tokens=max_tokens)
