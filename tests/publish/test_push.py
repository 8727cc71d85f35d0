"""`vlmkit push` against a local Hub (HF_ENDPOINT) that records what the real huggingface_hub client sends."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ..conftest import run_cli, run_cli_process

REPO = "someone/llava-tiny-hf"


class Hub(BaseHTTPRequestHandler):
    """The Hub endpoints create_repo, create_branch and upload_folder use; anything else answers 404."""

    requests: list[dict]

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        path = self.path.split("?")[0]
        base = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            data = json.loads(body)
            self._json({"url": f"{base}/{data['organization']}/{data['name']}", "name": data["name"]})
        elif path == "/api/validate-yaml":
            self._json({"errors": [], "warnings": []})
        elif path.startswith(f"/api/models/{REPO}/preupload/"):
            files = json.loads(body)["files"]
            self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif path.startswith(f"/api/models/{REPO}/commit/"):
            self._json({"commitUrl": f"{base}/{REPO}/commit/{'a' * 40}", "commitOid": "a" * 40})
        elif path.startswith(f"/api/models/{REPO}/branch/"):
            self._json({})
        else:
            self._json({"error": f"not implemented: {path}"}, 404)

    def do_GET(self):  # noqa: N802
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": b""})
        self._json({"error": "not implemented"}, 404)

    def _json(self, data, status=200):
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    handler = type("RecordingHub", (Hub,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def folder(originals, tmp_path_factory):
    dst = tmp_path_factory.mktemp("push") / "llava-v1.5-tiny-hf"
    assert run_cli("convert", originals["v15"], dst, "--quiet").code == 0
    return dst


def vlmkit(*args, endpoint: str, token: str | None = "hf_test_token", home: Path, cwd: Path | None = None):
    """The CLI in its own process: huggingface_hub reads HF_ENDPOINT when it is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return run_cli_process(*args, env=env, cwd=cwd, timeout=300)


def commit_of(requests) -> tuple[dict, dict[str, bytes]]:
    (commit,) = [r for r in requests if "/commit/" in r["path"]]
    lines = [json.loads(line) for line in commit["body"].splitlines() if line.strip()]
    header = next(item["value"] for item in lines if item["key"] == "header")
    files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
             for item in lines if item["key"] == "file"}
    return header, files


def test_push_commits_exactly_the_manifests_files(folder, hub, tmp_path):
    endpoint, requests = hub
    r = vlmkit("push", folder, REPO, "--private", "--commit-message", "tiny LLaVA", endpoint=endpoint, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert requests[0]["path"] == "/api/repos/create"
    assert json.loads(requests[0]["body"]) == {"name": "llava-tiny-hf", "organization": "someone",
                                               "visibility": "private", "type": "model"}
    assert all(req["auth"] == "Bearer hf_test_token" for req in requests)
    header, files = commit_of(requests)
    assert header["summary"] == "tiny LLaVA"
    manifest = json.loads((folder / "vlmkit-manifest.json").read_text())
    assert set(files) == set(manifest["files"]) | {"vlmkit-manifest.json"} and "README.md" in files
    for name, content in files.items():
        assert content == (folder / name).read_bytes(), name
    assert f"pushed {folder} to {REPO}" in r.stdout


def test_push_to_a_revision_creates_the_branch(folder, hub, tmp_path):
    endpoint, requests = hub
    r = vlmkit("push", folder, REPO, "--revision", "v1", endpoint=endpoint, home=tmp_path)
    assert r.returncode == 0, r.stderr
    paths = [req["path"].split("?")[0] for req in requests]
    assert f"/api/models/{REPO}/branch/v1" in paths and f"/api/models/{REPO}/commit/v1" in paths


def test_push_refuses_a_tampered_folder_before_any_request(folder, hub, tmp_path):
    endpoint, requests = hub
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    (tampered / "extra.txt").write_text("not converted by vlmkit\n")
    with open(tampered / "config.json", "a") as f:
        f.write(" ")
    r = vlmkit("push", tampered, REPO, endpoint=endpoint, home=tmp_path)
    assert r.returncode == 1
    assert "config.json: " in r.stderr and "extra.txt: not in the manifest" in r.stderr
    assert requests == []


def test_dry_run_lists_the_files_and_sends_nothing(folder, hub, tmp_path):
    endpoint, requests = hub
    r = vlmkit("push", folder, REPO, "--dry-run", endpoint=endpoint, token=None, home=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((folder / "vlmkit-manifest.json").read_text())
    for name in [*manifest["files"], "vlmkit-manifest.json"]:
        assert name in r.stdout
    assert f"would go to {REPO}; nothing sent" in r.stdout
    assert requests == []


def test_no_token_and_no_network_are_one_clear_error(folder, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = vlmkit("push", folder, REPO, endpoint=closed, token=None, home=tmp_path)
    assert r.returncode == 1 and "needs a Hugging Face token" in r.stderr and "HF_TOKEN" in r.stderr
    r = vlmkit("push", folder, REPO, endpoint=closed, home=tmp_path)
    assert r.returncode == 1 and f"cannot reach {closed}" in r.stderr and "Traceback" not in r.stderr


def test_convert_push_to_hub_converts_then_pushes(originals, hub, tmp_path):
    endpoint, requests = hub
    dst = tmp_path / "out"
    r = vlmkit("convert", originals["v15"], dst, "--quiet", "--push-to-hub", REPO, endpoint=endpoint, home=tmp_path)
    assert r.returncode == 0, r.stderr
    _, files = commit_of(requests)
    assert files["README.md"] == (dst / "README.md").read_bytes()
    assert "--push-to-hub" in files["README.md"].decode()  # the card names the exact command

