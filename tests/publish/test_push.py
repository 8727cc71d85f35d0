"""`vlmkit push` against a local Hub (HF_ENDPOINT) that records what the real huggingface_hub client sends."""

from __future__ import annotations

import base64
import hashlib
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
    remote: list[str] = []  # the files the repository holds already (the tree listing)

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
        if self.path.split("?")[0].startswith(f"/api/models/{REPO}/tree/"):
            self._json([{"type": "file", "path": p, "size": 1, "oid": "0" * 40} for p in self.remote])
        else:
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
def remote():
    """What the repository holds before the push (empty: a new one)."""
    return []


@pytest.fixture
def hub(remote):
    handler = type("RecordingHub", (Hub,), {"requests": [], "remote": remote})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
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


def deletions_of(requests) -> set[str]:
    (commit,) = [r for r in requests if "/commit/" in r["path"]]
    lines = [json.loads(line) for line in commit["body"].splitlines() if line.strip()]
    return {item["value"]["path"] for item in lines if item["key"] == "deletedFile"}


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



EARLIER_PUSH = [".gitattributes", "README.md", "model-00001-of-00009.safetensors", "model.safetensors.index.json",
                "old/notes.txt"]


@pytest.mark.parametrize("remote", [EARLIER_PUSH])
def test_a_second_push_deletes_what_an_earlier_one_left(folder, hub, tmp_path):
    """The repository holds an earlier push (other shards): the commit deletes every file not in the manifest,
    but the Hub's own .gitattributes."""
    endpoint, requests = hub
    r = vlmkit("push", folder, REPO, endpoint=endpoint, home=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((folder / "vlmkit-manifest.json").read_text())
    _, files = commit_of(requests)
    assert set(files) == set(manifest["files"]) | {"vlmkit-manifest.json"}
    assert "model-00001-of-00009.safetensors" not in manifest["files"]
    stale = {p for p in EARLIER_PUSH if p != ".gitattributes" and p not in manifest["files"]}
    assert "old/notes.txt" in stale and deletions_of(requests) == stale


def test_a_file_name_with_glob_characters_is_uploaded(folder, hub, tmp_path):
    """Names go to upload_folder as patterns: a "[" must match itself, not a character class."""
    endpoint, requests = hub
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    manifest = json.loads((odd / "vlmkit-manifest.json").read_text())
    data = b"extra file with an odd name\n"
    (odd / "notes[1].txt").write_bytes(data)
    manifest["files"]["notes[1].txt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (odd / "vlmkit-manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    r = vlmkit("push", odd, REPO, endpoint=endpoint, home=tmp_path)
    assert r.returncode == 0, r.stderr
    _, files = commit_of(requests)
    assert files["notes[1].txt"] == data


@pytest.mark.parametrize("repo_id", ["not a repo", "a/b/c", "owner/name--x"])
def test_a_bad_repo_id_is_one_error_before_the_folder_is_read(folder, hub, tmp_path, repo_id):
    endpoint, requests = hub
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "config.json").write_text("{}")  # the folder would fail its check: the repo id is named first
    r = vlmkit("push", broken, repo_id, endpoint=endpoint, home=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: {repo_id!r} is not a Hub repository id" in r.stderr and "OWNER/NAME" in r.stderr
    assert "config.json" not in r.stderr and requests == []


def test_no_token_is_named_before_the_folder_is_hashed(folder, hub, tmp_path):
    endpoint, requests = hub
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "config.json").write_text("{}")
    r = vlmkit("push", broken, REPO, endpoint=endpoint, token=None, home=tmp_path)
    assert r.returncode == 1 and "needs a Hugging Face token" in r.stderr and "config.json" not in r.stderr


@pytest.mark.parametrize("token", [None, "hf_test_token"])
def test_convert_push_to_hub_checks_the_target_before_converting(originals, hub, tmp_path, token):
    endpoint, requests = hub
    dst = tmp_path / "out"
    repo = REPO if token is None else "not a repo"
    r = vlmkit("convert", originals["v15"], dst, "--quiet", "--push-to-hub", repo, endpoint=endpoint, token=token,
               home=tmp_path)
    assert r.returncode == 1 and ("needs a Hugging Face token" if token is None else "is not a Hub repository id") \
        in r.stderr
    assert not dst.exists() and requests == []


def test_pushed_folder_downloaded_with_gitattributes_still_verifies(folder, tmp_path):
    """create_repo's first commit adds .gitattributes; `hf download --local-dir` brings it (and its own cache)."""
    downloaded = tmp_path / "downloaded"
    shutil.copytree(folder, downloaded)
    (downloaded / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (downloaded / ".cache" / "huggingface").mkdir(parents=True)
    (downloaded / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
    r = run_cli("verify-files", downloaded)
    assert r.code == 0, r.err
    (downloaded / "sub").mkdir()
    (downloaded / "sub" / ".gitattributes").write_text("x\n")  # only the Hub's own, at the top, is bookkeeping
    r = run_cli("verify-files", downloaded)
    assert r.code == 1 and "sub/.gitattributes: not in the manifest" in r.err


def test_ctrl_c_during_a_push_says_what_may_exist(folder, tmp_path, monkeypatch):
    import huggingface_hub

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", interrupted)
    r = run_cli("push", folder, REPO)
    assert r.code == 130
    assert "nothing was written" not in r.err
    assert f"interrupted while pushing to {REPO}: the repository" in r.err and "may exist on the Hub" in r.err
