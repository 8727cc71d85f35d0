"""One error hierarchy for everything a user can get wrong.

Every message names the file, the tensor or the field, and says what to do next.
The CLI prints ``VlmkitError`` as one sentence plus its hint; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class VlmkitError(Exception):
    """Base class of every error vlmkit raises for bad input or a bad environment.

    Args:
        message: what went wrong, naming the file / tensor / field.
        hint: the next step for the user (a command, a flag), printed on its own line.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # the hint is shown by the CLI, and by str() for library users
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class CheckpointError(VlmkitError):
    """A checkpoint file is missing, truncated, corrupted or unsafe to load."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint asks for code that the restricted unpickler refuses to run."""


class PlanError(VlmkitError):
    """A conversion plan does not check out. ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str], *, hint: str | None = None):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{message} ({len(self.problems)} problem(s)):\n{shown}{more}", hint=hint)


class OutputError(VlmkitError):
    """The destination cannot be written (exists, is the source, disk full, permission)."""


class ConfigError(VlmkitError):
    """A config field is missing or inconsistent with the weights."""


class HubError(VlmkitError):
    """A hub id cannot be resolved (offline, unknown repository, missing files)."""


class ManifestError(VlmkitError):
    """An output folder does not match its ``vlmkit-manifest.json``."""


class ImageError(VlmkitError):
    """An image cannot be used: unreadable, not an image, truncated, or too large to decode safely."""


class TemplateError(VlmkitError):
    """A conversation does not fit its chat template (unknown template, role order, empty turn)."""
