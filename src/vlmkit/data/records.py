"""One training record, whatever file format it came from.

A :class:`Record` is what LLaVA's training code reads from one entry of its data file
(``{"id", "image", "conversations": [{"from": "human" | "gpt", "value"}]}``), held in a
form every format converts to and from: the images in order, the turns with roles
"user" / "assistant" (LLaVA's "human" / "gpt"), an optional system prompt, and any other
fields of the entry kept as they were. ``<image>`` placeholders stay inside the text,
where the data put them.

Example:
    >>> r = Record("1", ["cat.jpg"], [Turn("user", "<image>\\nWhat is it?"), Turn("assistant", "A cat.")])
    >>> r.placeholders()
    1
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import VlmkitError

IMAGE_TOKEN = "<image>"
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"

# How the formats spell a role -> vlmkit's role. LLaVA and ShareGPT write human/gpt; LLaMA-Factory's
# ShareGPT and the messages format write user/assistant. Unknown spellings are kept as they are so
# that `data check` can name them (the original training code raises KeyError on them).
ROLE_NAMES: dict[str, str] = {
    "human": USER, "user": USER,
    "gpt": ASSISTANT, "assistant": ASSISTANT, "bot": ASSISTANT, "model": ASSISTANT,
    "system": SYSTEM,
}


class DataError(VlmkitError):
    """A data file or one of its records cannot be read or written (names the file and the record)."""


@dataclass(slots=True)
class Turn:
    """One message: ``role`` is "user" or "assistant" (or an unknown spelling, kept for `data check`)."""

    role: str
    text: str


@dataclass(slots=True)
class Record:
    """One training record.

    Attributes:
        id: the record's id (from the data, or its position when the data has none).
        images: image paths (relative to the image folder) or URLs, in placeholder order.
        turns: the conversation, starting with the user's turn.
        system: a per-record system prompt (ShareGPT / messages); LLaVA's training ignores it.
        extra: every other field of the entry, written back unchanged.
        where: "file:line" (or "file:#index") for messages that name the record's origin.
    """

    id: str
    images: list[str]
    turns: list[Turn]
    system: str | None = None
    extra: dict = field(default_factory=dict)
    where: str = ""

    def placeholders(self) -> int:
        """How many ``<image>`` placeholders the turns hold."""
        return sum(t.text.count(IMAGE_TOKEN) for t in self.turns)

    def name(self) -> str:
        """``record 'ID' (file:line)``: how messages refer to this record."""
        return f"record {self.id!r}" + (f" ({self.where})" if self.where else "")
