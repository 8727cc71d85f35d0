"""Chat messages as users write them, normalised once.

Accepted forms (the transformers / OpenAI shape, or plain strings):

    [{"role": "user", "content": "What is this?", "images": ["cat.png"]}]
    [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                  {"type": "text", "text": "What is this?"}]}]

An image is a path, ``bytes`` or a PIL image. A video is the list of its frames (each an image), in
order, as a ``{"type": "video", "video": [frames]}`` part or under ``"videos"``: the model reads it as one
visual input with one placeholder, as LLaVA-OneVision / LLaVA-Video do (vlmkit decodes no video files):

    [{"role": "user", "content": "What happens?", "videos": [["f1.png", "f2.png", "f3.png"]]}]

Roles are ``system``, ``user`` and ``assistant``; a system message may only come first.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import VlmkitError
from .images import file_error
from .templates import with_image

ImageInput = "str | os.PathLike | bytes | Image.Image"
ROLES = ("system", "user", "assistant")


class MessageError(VlmkitError):
    """A message is malformed (unknown role, misplaced system message, bad content part)."""


@dataclass(frozen=True)
class Video:
    """One video as its frames, in order; in a turn's ``images`` it takes one placeholder like an image."""

    frames: tuple


def video(frames, where: str) -> Video:
    """``frames`` (a list of images) as a :class:`Video`.

    Raises:
        MessageError: naming ``where``: not a non-empty list of frames (e.g. a video file's path).
    """
    if isinstance(frames, Video):
        return frames
    if not isinstance(frames, (list, tuple)) or not frames:
        raise MessageError(f"{where}: a video is a non-empty list of its frames (paths, bytes or PIL images), not "
                           f"{type(frames).__name__}",
                           hint="vlmkit reads no video files: extract frames first, e.g. "
                                "ffmpeg -i clip.mp4 -vf fps=1 frame%03d.png")
    return Video(tuple(frames))


@dataclass
class Turn:
    role: str
    text: str
    images: list = field(default_factory=list)


def image_digest(image) -> str:
    """A key for the image's content (bytes of a file, or pixels of a PIL image)."""
    h = hashlib.sha256()
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    elif isinstance(image, (bytes, bytearray)):
        h.update(image)
    else:
        try:
            with open(image, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:
            raise file_error(str(image), e) from None
    return h.hexdigest()


def _parts(index: int, content) -> tuple[str, list]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise MessageError(f"messages[{index}].content must be a string or a list of parts, "
                           f"not {type(content).__name__}")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind == "image":
            image = part.get("image", part.get("path", part.get("url")))
            if image is None:
                raise MessageError(f"messages[{index}].content[{j}]: an image part needs 'image' (a path, bytes or "
                                   "a PIL image)")
            images.append(image)
        elif kind == "video":
            images.append(video(part.get("video", part.get("frames")), f"messages[{index}].content[{j}]"))
        else:
            raise MessageError(f"messages[{index}].content[{j}]: unknown part type {kind!r}; use 'text', 'image' "
                               "or 'video'")
    return " ".join(t for t in texts if t), images


def normalise(messages) -> list[Turn]:
    """Validate messages and return them as ``Turn``s (text, images in order).

    Raises:
        MessageError: naming the message and the field.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not messages:
        raise MessageError("no messages: give at least one user message")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise MessageError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise MessageError(f"messages[{i}].role {role!r} is unknown; use system, user or assistant")
        if role == "system" and i != 0:
            raise MessageError(f"messages[{i}]: a system message may only come first")
        text, images = _parts(i, message.get("content", ""))
        images += list(message.get("images") or [])
        images += [video(v, f"messages[{i}].videos[{k}]") for k, v in enumerate(message.get("videos") or [])]
        if images and role != "user":
            raise MessageError(f"messages[{i}]: only user messages may carry images")
        turns.append(Turn(role, text, images))
    if turns[-1].role != "user":
        raise MessageError("the last message must be the user's: the model answers it")
    return turns


def image_bytes_or_path(image):
    """Keep images as paths/bytes/PIL (``runtime.images.load_image`` accepts all three)."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image)
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "read"):
        return image.read() if not isinstance(image, io.TextIOBase) else image
    raise MessageError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")


def template_messages(turns: list[Turn]) -> list[tuple[str, str | None]]:
    """(role, text) pairs for ``templates.render``, with ``<image>\\n`` before a user text per image (and per
    video: LLaVA-Video's one ``<image>`` for all frames) as the original LLaVA cli does, and the open assistant
    turn last."""
    out = []
    for t in turns:
        text = with_image(t.text, len(t.images)) if t.images else t.text
        out.append((t.role, text))
    return out + [("assistant", None)]
