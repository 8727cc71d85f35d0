"""``vlmkit push FOLDER REPO_ID``: upload a checked folder to the Hugging Face Hub with ``huggingface_hub``.

The token and the repository id are checked first, then the folder is re-hashed against its
manifest, all before any request: a folder that changed since vlmkit wrote it (and proved it) is
refused. Exactly the manifest's files and the manifest go up (``upload_folder``; huggingface_hub
sends big files through its LFS / Xet path), and every other file of the revision is deleted in the
same commit (a shard of an earlier push would otherwise stay beside the new ones); the Hub's own
``.gitattributes`` stays.
The token is huggingface_hub's own: ``HF_TOKEN`` or ``hf auth login``, never a command-line
flag that other users could read in ``ps``; ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import glob
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the first request: says what may exist on the Hub (the CLI prints ``message``)."""

    def __init__(self, repo_id: str, revision: str | None):
        branch = f", the branch {revision}" if revision else ""
        self.message = (f"interrupted while pushing to {repo_id}: the repository{branch} and part of the upload "
                        "may exist on the Hub; run the same `vlmkit push` again to finish it (it replaces the files)")
        super().__init__(self.message)


def check_target(repo_id: str, *, token: bool = True) -> None:
    """Refuse a malformed repository id and (with ``token``) a missing token; no request, no file read.

    Raises:
        HubError: naming what is wrong and how to fix it.
    """
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a Hub repository id: {str(e).splitlines()[0]}",
                       hint="use OWNER/NAME: letters, digits, '-', '_' and '.', at most 96 characters each") from None
    if token and huggingface_hub.get_token() is None:
        raise HubError(f"pushing to {repo_id} needs a Hugging Face token, and none is set",
                       hint="set HF_TOKEN (a write token) or run `hf auth login`")


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False, manifest: dict | None = None) -> Pushed:
    """Upload ``folder`` to the model repository ``repo_id`` (created if missing).

    Args:
        folder: a folder written by vlmkit (it carries ``vlmkit-manifest.json``).
        repo_id: ``owner/name`` on the Hub.
        private: create the repository private (an existing one keeps its visibility).
        revision: the branch to commit to (created from the default branch if missing).
        commit_message: default: "Upload FOLDER with vlmkit VERSION".
        dry_run: check the folder and list what would be uploaded; no request is made.
        manifest: the folder's manifest when the caller has just written or checked the folder
            (``convert --push-to-hub``): it is not hashed again.

    Raises:
        HubError: a malformed repository id or no token (first), the Hub refuses, or it cannot be reached.
        ManifestError: the folder does not match its manifest (before any request).
        Interrupted: Ctrl-C once requests were made.
    """
    check_target(repo_id, token=not dry_run)
    folder = Path(folder)
    if manifest is None:
        output.verify_files(folder)
        manifest = output.read_manifest(folder)
    files = {rel: entry["bytes"] for rel, entry in manifest["files"].items()}
    files[output.MANIFEST] = (folder / output.MANIFEST).stat().st_size
    if dry_run:
        return Pushed(repo_id, files)
    import huggingface_hub
    from huggingface_hub import constants

    api = huggingface_hub.HfApi()
    message = commit_message or f"Upload {folder.name} with vlmkit {manifest.get('vlmkit_version')}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        # the patterns are globs: escaped, each matches its own file name only (a "[" in a name included)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message, allow_patterns=[glob.escape(f) for f in sorted(files)],
                                 delete_patterns="*")
    except KeyboardInterrupt:
        raise Interrupted(repo_id, revision) from None
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
