"""``vlmkit push FOLDER REPO_ID``: upload a checked folder to the Hugging Face Hub with ``huggingface_hub``.

The folder is re-hashed against its manifest before any request: a folder that changed since
vlmkit wrote it (and proved it) is refused. Exactly the manifest's files and the manifest go up,
in one commit (``upload_folder``; huggingface_hub sends big files through its LFS / Xet path).
The token is huggingface_hub's own: ``HF_TOKEN`` or ``hf auth login``, never a command-line
flag that other users could read in ``ps``; ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..conversion import output
from ..errors import HubError


@dataclass
class Pushed:
    repo_id: str
    files: dict[str, int]  # path in the repository -> bytes
    url: str | None = None  # the commit, None for a dry run

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False) -> Pushed:
    """Upload ``folder`` to the model repository ``repo_id`` (created if missing).

    Args:
        folder: a folder written by vlmkit (it carries ``vlmkit-manifest.json``).
        repo_id: ``owner/name`` on the Hub.
        private: create the repository private (an existing one keeps its visibility).
        revision: the branch to commit to (created from the default branch if missing).
        commit_message: default: "Upload FOLDER with vlmkit VERSION".
        dry_run: check the folder and list what would be uploaded; no request is made.

    Raises:
        ManifestError: the folder does not match its manifest (before any request).
        HubError: not logged in, the Hub refuses, or it cannot be reached.
    """
    folder = Path(folder)
    output.verify_files(folder)
    manifest = output.read_manifest(folder)
    files = {rel: entry["bytes"] for rel, entry in manifest["files"].items()}
    files[output.MANIFEST] = (folder / output.MANIFEST).stat().st_size
    if dry_run:
        return Pushed(repo_id, files)
    import huggingface_hub
    from huggingface_hub import constants

    if huggingface_hub.get_token() is None:
        raise HubError(f"pushing to {repo_id} needs a Hugging Face token, and none is set",
                       hint="set HF_TOKEN (a write token) or run `hf auth login`")
    api = huggingface_hub.HfApi()
    message = commit_message or f"Upload {folder.name} with vlmkit {manifest.get('vlmkit_version')}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message, allow_patterns=sorted(files))
    except huggingface_hub.errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        what = {401: "the token was refused", 403: "the token may not write to this repository",
                404: "the repository or revision was not found"}.get(status, f"the Hub answered {status}")
        raise HubError(f"pushing {folder} to {repo_id}: {what} ({str(e).splitlines()[0]})",
                       hint="check HF_TOKEN / `hf auth whoami` and the repository id") from None
    except _unreachable() as e:
        raise HubError(f"pushing {folder} to {repo_id}: cannot reach {constants.ENDPOINT} ({_reason(e)})",
                       hint="push from a machine with network access (and HF_HUB_OFFLINE unset)") from None
    return Pushed(repo_id, files, str(info.commit_url))


def _unreachable() -> tuple[type[BaseException], ...]:
    """The errors that mean "no network": OSError, offline mode, and the HTTP client's transport errors
    (huggingface_hub 1.x+ uses httpx / httpx2, whose errors are not OSErrors)."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    found: list[type[BaseException]] = [OSError, OfflineModeIsEnabled]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
