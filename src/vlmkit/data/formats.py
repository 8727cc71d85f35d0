"""The chat-dataset formats users bring, as a table of decoders and encoders.

=========  ==========================================================================  =========================
format     one entry                                                                   read by
=========  ==========================================================================  =========================
llava      ``{"id", "image": str | [str], "conversations": [{"from": "human"|"gpt",     LLaVA's ``train.py``
           "value"}]}``
sharegpt   ``{"conversations": [{"from", "value"}], "system"?, "images": [str]}``      LLaMA-Factory (sharegpt)
messages   ``{"messages": [{"role", "content": str}], "images": [str]}``               ms-swift, LLaMA-Factory
openai     ``{"messages": [{"role", "content": [{"type": "text", "text"} |             OpenAI chat API
           {"type": "image_url", "image_url": {"url"}}]}]}``
=========  ==========================================================================  =========================

In all of them an image sits in the text as ``<image>``; OpenAI content parts put it
where its part is (an image part followed by a text part reads ``"<image>\\ntext"``).
Reading is lenient about spelling (``human``/``user``, ``image``/``images``, string or
parts content), writing is exact. Fields a format does not know are kept in
``Record.extra`` and written back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .records import ASSISTANT, IMAGE_TOKEN, ROLE_NAMES, SYSTEM, USER, DataError, Record, Turn

# Record fields of each format (everything else goes to Record.extra).
_CONVERSATION_KEYS = {"id", "image", "images", "conversations", "system"}
_MESSAGES_KEYS = {"id", "messages", "images", "system"}
LLAVA_ROLE = {USER: "human", ASSISTANT: "gpt"}


def _text(where: str, value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is a {type(value).__name__}, not text",
                        hint="each turn's text must be a string")
    return value


def _image_list(where: str, value) -> list[str]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):  # HF datasets Image feature / ms-swift {"path": ...}
            item = item.get("path") or item.get("url")
        if not isinstance(item, str):
            raise DataError(f"{where}: an image is {type(item).__name__}; vlmkit reads image paths or URLs",
                            hint="save embedded images as files and put their paths in the data")
        out.append(item)
    return out


def _record_id(where: str, row: dict, index: int) -> str:
    value = row.get("id")
    return str(value) if value is not None and value != "" else f"{index:09d}"


# ------------------------------------------------------------------------------ decoders
def decode_conversations(where: str, row: dict, index: int) -> Record:
    """LLaVA / ShareGPT: ``conversations`` of ``{"from", "value"}`` (a leading "system" turn is the system prompt)."""
    conversations = row.get("conversations")
    if not isinstance(conversations, list):
        raise DataError(f"{where}: 'conversations' is missing or not a list",
                        hint="a LLaVA / ShareGPT record has conversations: [{from, value}, ...]")
    system = row.get("system")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise DataError(f"{where}: conversations[{i}] is not an object")
        raw = message.get("from", message.get("role"))
        role = ROLE_NAMES.get(str(raw).lower(), str(raw))
        text = _text(where, message.get("value", message.get("content")), f"conversations[{i}].value")
        if role == SYSTEM and i == 0:
            system = text
            continue
        turns.append(Turn(role, text))
    images = _image_list(where, row.get("images", row.get("image")))
    extra = {k: v for k, v in row.items() if k not in _CONVERSATION_KEYS}
    return Record(_record_id(where, row, index), images, turns, system, extra, where)


def _content_parts(where: str, i: int, content) -> tuple[str, list[str]]:
    """OpenAI / transformers content parts -> text with ``<image>`` where each image part is, and the images."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise DataError(f"{where}: messages[{i}].content is a {type(content).__name__}",
                        hint="content is a string or a list of {type: text|image_url|image} parts")
    pieces, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(_text(where, part.get("text"), f"messages[{i}].content[{j}].text"))
        elif kind in ("image_url", "image"):
            source = part.get(kind)
            source = source.get("url") if isinstance(source, dict) else source
            source = source or part.get("path") or part.get("url")
            if not isinstance(source, str):
                raise DataError(f"{where}: messages[{i}].content[{j}] is an image part without a path or URL",
                                hint='write {"type": "image_url", "image_url": {"url": "images/1.jpg"}}')
            pieces.append(IMAGE_TOKEN)
            images.append(source)
        else:
            raise DataError(f"{where}: messages[{i}].content[{j}] has type {kind!r}",
                            hint="known part types: text, image_url, image")
    return "\n".join(pieces), images


def decode_messages(where: str, row: dict, index: int) -> Record:
    """messages / OpenAI: ``{"role", "content"}``, content a string with ``<image>`` or a list of parts."""
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' is missing or not a list",
                        hint="a messages record has messages: [{role, content}, ...]")
    system = row.get("system")
    turns, part_images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] is not an object")
        raw = message.get("role", message.get("from"))
        role = ROLE_NAMES.get(str(raw).lower(), str(raw))
        text, images = _content_parts(where, i, message.get("content", message.get("value")))
        part_images += images
        if role == SYSTEM and i == 0:
            system = text
            continue
        turns.append(Turn(role, text))
    images = _image_list(where, row.get("images")) + part_images
    extra = {k: v for k, v in row.items() if k not in _MESSAGES_KEYS}
    return Record(_record_id(where, row, index), images, turns, system, extra, where)


# ------------------------------------------------------------------------------ encoders
def encode_llava(record: Record) -> dict:
    """LLaVA's own layout: ``image`` is a string for one image (what the original reads), a list for several."""
    out: dict = {"id": record.id}
    if len(record.images) == 1:
        out["image"] = record.images[0]
    elif record.images:
        out["image"] = list(record.images)
    out["conversations"] = [{"from": LLAVA_ROLE.get(t.role, t.role), "value": t.text} for t in record.turns]
    if record.system is not None:
        out["system"] = record.system  # not read by LLaVA's training: the template's system prompt is used
    out.update(record.extra)
    return out


def encode_sharegpt(record: Record) -> dict:
    """LLaMA-Factory's ShareGPT layout (``conversations`` with human/gpt, ``images`` list, ``system``)."""
    out: dict = {"id": record.id,
                 "conversations": [{"from": LLAVA_ROLE.get(t.role, t.role), "value": t.text} for t in record.turns]}
    if record.system is not None:
        out["system"] = record.system
    if record.images:
        out["images"] = list(record.images)
    out.update(record.extra)
    return out


def _messages(record: Record, content: Callable[[str, list[str]], object]) -> list[dict]:
    out = [{"role": SYSTEM, "content": record.system}] if record.system is not None else []
    images = iter(record.images)
    for turn in record.turns:
        own = [next(images, None) for _ in range(turn.text.count(IMAGE_TOKEN))]
        out.append({"role": turn.role, "content": content(turn.text, own)})
    return out


def encode_messages(record: Record) -> dict:
    """ms-swift / LLaMA-Factory messages: string content with ``<image>``, paths in ``images``."""
    out: dict = {"id": record.id, "messages": _messages(record, lambda text, _: text)}
    if record.images:
        out["images"] = list(record.images)
    out.update(record.extra)
    return out


def _parts(text: str, images: list[str | None]) -> list[dict]:
    """Split ``text`` at ``<image>`` into OpenAI parts; the newline next to an image belongs to the image."""
    chunks = text.split(IMAGE_TOKEN)
    parts: list[dict] = []
    for k, chunk in enumerate(chunks):
        if k:
            parts.append({"type": "image_url", "image_url": {"url": images[k - 1]}})
            chunk = chunk[1:] if chunk.startswith("\n") else chunk
        if k + 1 < len(chunks) and chunk.endswith("\n"):
            chunk = chunk[:-1]
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def encode_openai(record: Record) -> dict:
    """OpenAI chat messages: user content as parts, each image an ``image_url`` part at its place."""
    def content(text: str, images: list[str | None]):
        return _parts(text, images) if images else text

    out: dict = {"id": record.id, "messages": _messages(record, content)}
    out.update(record.extra)
    return out


@dataclass(frozen=True)
class Format:
    """One chat format: how to read an entry and how to write a record."""

    name: str
    decode: Callable[[str, dict, int], Record]
    encode: Callable[[Record], dict]
    key: str  # the field that identifies it


FORMATS: dict[str, Format] = {
    "llava": Format("llava", decode_conversations, encode_llava, "conversations"),
    "sharegpt": Format("sharegpt", decode_conversations, encode_sharegpt, "conversations"),
    "messages": Format("messages", decode_messages, encode_messages, "messages"),
    "openai": Format("openai", decode_messages, encode_openai, "messages"),
}


def detect(row: dict) -> str:
    """The format of an entry from its keys: "llava" / "sharegpt" (conversations), "messages", or "table"."""
    if "conversations" in row:
        return "sharegpt" if "images" in row and "image" not in row else "llava"
    if "messages" in row:
        return "messages"
    return "table"


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"unknown record format {name!r}", hint=f"use one of: {', '.join(FORMATS)}") from None
