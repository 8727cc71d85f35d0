"""``vlmkit serve`` as a command: flags checked while parsing, loading errors end it, warnings on exposure."""

from __future__ import annotations

import shutil

import pytest

from vlmkit.cli import build_parser

from ..conftest import run_cli, run_cli_process
from .conftest import free_port


@pytest.mark.parametrize("flag, value, words", [
    ("--port", "99999", "at least 1 and at most 65535"),
    ("--port", "0", "at least 1 and at most 65535"),
    ("--port", "-1", "at least 1 and at most 65535"),
    ("--max-batch-size", "0", "at least 1"),
    ("--max-queue", "0", "at least 1"),
    ("--max-tokens", "-5", "at least 1"),
    ("--max-images", "-1", "at least 0"),
    ("--max-image-pixels", "0", "at least 1"),
    ("--request-timeout", "0", "greater than 0"),
    ("--request-timeout", "nan", "greater than 0"),
    ("--request-timeout", "inf", "greater than 0"),
    ("--replicas", "0", "at least 1"),
    ("--data-parallel-size", "0", "at least 1"),
    ("--num-cpus-per-replica", "-1", "at least 0"),
    ("--max-body-size", "0", "at least 1"),
])
def test_numeric_flags_out_of_range_are_refused_while_parsing(capsys, flag, value, words):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["serve", "model/", flag, value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"argument {flag}: " in err and words in err, err


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("error:", "hint:"))]


@pytest.fixture
def truncated(models, tmp_path):
    folder = shutil.copytree(models["v15-hf"], tmp_path / "truncated-hf")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


@pytest.mark.parametrize("which", ["missing", "truncated"])
def test_a_model_that_cannot_load_ends_serve_with_chat_s_error(which, truncated, tmp_path):
    model = truncated if which == "truncated" else tmp_path / "no-such-model"
    chat = run_cli_process("chat", model, "--prompt", "hi", timeout=60)
    serve = run_cli_process("serve", model, "--port", free_port(), timeout=60)  # never ended before
    assert chat.returncode == 1 and _error_lines(chat.stderr), chat.stderr
    assert serve.returncode == 1 and _error_lines(serve.stderr) == _error_lines(chat.stderr), serve.stderr
    assert "Traceback" not in serve.stderr and "still loading" not in serve.stderr


@pytest.mark.parametrize("flags", [["--replicas", "2"], ["--ray-address", "head-node:6379"]])
def test_ray_replicas_of_a_missing_model_end_serve_with_chat_s_error_before_ray_starts(monkeypatch, tmp_path, flags):
    import vlmkit.serve.engines

    started = []  # the Ray route is never reached: no cluster starts, whatever the outcome
    monkeypatch.setattr(vlmkit.serve.engines, "run", lambda *args: started.append(args) or 0)
    model = tmp_path / "no-such-model"
    chat = run_cli("chat", model, "--prompt", "hi")
    serve = run_cli("serve", model, *flags)
    assert chat.code == 1 and _error_lines(chat.err), chat.err
    assert serve.code == 1 and _error_lines(serve.err) == _error_lines(chat.err), serve.err
    assert started == []


@pytest.fixture
def not_served(monkeypatch):
    """``vlmkit serve`` up to the point where it would bind (nothing listens: the tests bind loopback only)."""
    import vlmkit.serve.app

    calls = []
    monkeypatch.setattr(vlmkit.serve.app, "serve", lambda app, host, port: calls.append((host, port)))
    monkeypatch.delenv("VLMKIT_API_KEY", raising=False)
    return calls


@pytest.mark.parametrize("host, key, warned", [
    ("0.0.0.0", None, True),
    ("::", None, True),
    ("my-host.example", None, True),
    ("0.0.0.0", "--api-key", False),
    ("0.0.0.0", "env", False),
    ("127.0.0.1", None, False),
    ("::1", None, False),
    ("localhost", None, False),
])
def test_binding_beyond_this_machine_without_a_key_warns(not_served, monkeypatch, tmp_path, host, key, warned):
    flags = ["--api-key", "k"] if key == "--api-key" else []
    if key == "env":
        monkeypatch.setenv("VLMKIT_API_KEY", "k")
    result = run_cli("serve", tmp_path / "model", "--host", host, *flags)
    assert result.code == 0 and not_served == [(host, 8000)]
    assert ("warning:" in result.err and "no API key" in result.err) == warned, result.err
