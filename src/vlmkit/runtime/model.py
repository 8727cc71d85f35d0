"""``vlmkit.load``: one object to chat with any LLaVA or BLIP-2, original or converted.

Example:
    >>> model = vlmkit.load("llava-v1.5-7b", vision_tower="clip-vit-large-patch14-336")   # doctest: +SKIP
    >>> model.chat([{"role": "user", "content": "What is this?", "images": ["cat.png"]}]).text
    >>> video = vlmkit.load("LLaVA-Video-7B-Qwen2")                                        # doctest: +SKIP
    >>> video.chat("What happens?", videos=[["f1.png", "f2.png", "f3.png"]]).text        # frames of one video
    >>> for piece in model.stream("Describe it.", images=["cat.png"]):
    ...     print(piece, end="")
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .. import families
from ..options import LoadOptions, check_device
from ..tensors import resolve
from .generation import PrefixCache, Prompt, SamplingParams, TextStream, assemble, batch_stream, stream_tokens
from .messages import MessageError, Turn, Video, image_bytes_or_path, image_digest, normalise, video

IMAGE_CACHE_SIZE = 32


@dataclass
class Reply:
    """One answer: its text, token ids, why it stopped, and the token counts (image features included)."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    image_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class ChatModel:
    """A loaded vision-language model with the original template and preprocessing.

    Projected image features are cached by image content (and preprocessing), and the KV
    caches of recent prompts and conversations are kept (``prefix_cache``, bounded in bytes),
    so a follow-up turn, or another question about the same image, computes only what is new.
    """

    def __init__(self, backend):
        self.backend = backend
        self.template = backend.template
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.prefix_cache = PrefixCache()

    # ------------------------------------------------------------------ prompts

    def _image_features(self, image) -> tuple[str, torch.Tensor]:
        """An image's (or a ``Video``'s) cache key and features."""
        if isinstance(image, Video):
            read = getattr(self.backend, "video_features", None)
            if read is None:
                raise MessageError("video frames were given, but this model reads images only",
                                   hint="give the frames as images, or use an original LLaVA-OneVision / "
                                        "LLaVA-Video checkpoint or a converted OneVision folder")
            frames = [image_bytes_or_path(f) for f in image.frames]
            key, compute = "video:" + ":".join(image_digest(f) for f in frames), lambda: read(frames)
        else:
            image = image_bytes_or_path(image)
            key, compute = image_digest(image), lambda: self.backend.image_features(image)
        key += self.backend.preprocessing
        if key in self._features:
            self._features.move_to_end(key)
        else:
            self._features[key] = compute()
            if len(self._features) > IMAGE_CACHE_SIZE:
                self._features.popitem(last=False)
        return key, self._features[key]

    def prompt(self, messages, images=None, videos=None) -> Prompt:
        """The positions the model will read for ``messages`` (text ids and image features)."""
        turns = normalise(messages)
        extra = list(images or []) + [video(v, f"videos[{k}]") for k, v in enumerate(videos or [])]
        if extra:
            turns[-1] = Turn(turns[-1].role, turns[-1].text, list(turns[-1].images) + extra)
        ids = self.backend.prompt_ids(turns)
        pairs = [self._image_features(image) for t in turns for image in t.images]
        return assemble(ids, self.backend.marker, [f for _, f in pairs], [k for k, _ in pairs], self.backend.filler)

    # ------------------------------------------------------------------ generation

    def _params(self, **kwargs) -> SamplingParams:
        stop = kwargs.pop("stop", None) or ()
        return SamplingParams(stop=(stop,) if isinstance(stop, str) else tuple(stop), **kwargs)

    def stream_reply(self, messages, *, images=None, videos=None, **sampling) -> Iterator[str | Reply]:
        """Yield text pieces as they come, then the final ``Reply``."""
        params = self._params(**sampling)
        prompt = self.prompt(messages, images, videos)
        reply = ReplyBuilder(self.backend, prompt, params)
        for token in stream_tokens(self.backend, prompt, params, self.prefix_cache):
            delta = reply.push(token)
            if delta:
                yield delta
            if reply.finish_reason:
                break
        tail = reply.flush()
        if tail:
            yield tail
        yield reply.result()

    def stream(self, messages, *, images=None, videos=None, **sampling) -> Iterator[str]:
        """Yield the answer's text pieces as they are generated."""
        for item in self.stream_reply(messages, images=images, videos=videos, **sampling):
            if isinstance(item, str):
                yield item

    def chat(self, messages, *, images=None, videos=None, **sampling) -> Reply:
        """Answer the conversation ``messages`` (see ``runtime.messages`` for the accepted forms).

        Args:
            messages: a string, or a list of {"role", "content"[, "images", "videos"]} messages.
            images: images added to the last message (paths, bytes or PIL images).
            videos: videos added to the last message after its images, each the list of its frames (images), read
                as one visual input (LLaVA-OneVision / LLaVA-Video originals, converted OneVision folders).
            **sampling: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stop``.
        """
        *_, reply = self.stream_reply(messages, images=images, videos=videos, **sampling)
        return reply

    def generate(self, conversations: list, **sampling) -> list[Reply]:
        """Answer several conversations in one padded batch (same tokens as one by one)."""
        params = self._params(**sampling)
        prompts = [self.prompt(c) for c in conversations]
        replies = [ReplyBuilder(self.backend, p, params) for p in prompts]
        for step in batch_stream(self.backend, prompts, [params] * len(prompts),
                                 active=lambda i: not replies[i].finish_reason, cache=self.prefix_cache):
            for reply, token in zip(replies, step):
                if token is not None:
                    reply.push(token)
        for reply in replies:
            reply.flush()
        return [r.result() for r in replies]


class ReplyBuilder:
    """Tokens -> text for one answer: incremental, cut at EOS or a stop string, held back while
    the text could be the start of a stop string."""

    def __init__(self, backend, prompt: Prompt, params: SamplingParams):
        self.eos = backend.eos_token_ids
        self.prompt = prompt
        self.stop = params.stop
        self.text = TextStream(backend.decode)
        self.tokens: list[int] = []
        self.emitted = ""
        self.finish_reason: str | None = None
        self.limit = params.max_new_tokens

    def push(self, token: int) -> str:
        """Add a generated token; return the text that can be shown now."""
        self.tokens.append(token)
        if token in self.eos:
            self.finish_reason = "stop"
            return ""
        self.text.push(token)
        cut = _stop_position(self.text.text, self.stop)
        visible = self.text.text if cut is None else self.text.text[:cut]
        if cut is not None:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.limit:
            self.finish_reason = "length"
        if len(visible) > len(self.emitted) and (cut is not None or not _may_start_stop(visible, self.stop)):
            delta, self.emitted = visible[len(self.emitted):], visible
            return delta
        return ""

    def flush(self) -> str:
        """What is still held back once generation has ended."""
        cut = _stop_position(self.text.text, self.stop)
        final = self.text.text if cut is None else self.text.text[:cut]
        delta, self.emitted = final[len(self.emitted):], final
        self.finish_reason = self.finish_reason or "length"
        return delta

    def result(self) -> Reply:
        return Reply(self.emitted, self.tokens, self.finish_reason or "length", len(self.prompt),
                     self.prompt.image_tokens)


def _stop_position(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _may_start_stop(text: str, stops: tuple[str, ...]) -> bool:
    """Hold back output while its end could be the beginning of a stop string."""
    return any(text.endswith(s[:k]) for s in stops for k in range(1, len(s)))


def load(path: str | Path, *, options: LoadOptions | None = None, **load_options) -> ChatModel:
    """Load a model to chat with: an original LLaVA or BLIP-2 checkpoint (any form) or a transformers folder.

    Args:
        path: a local folder or a hub id.
        options: loading options, or pass them as keywords (``vision_tower=``, ``model_base=``,
            ``template=``, ``dtype="float16"`` (any spelling of ``vlmkit.dtypes``), ``device="cuda"``).
    """
    options = options or LoadOptions(**load_options)  # checks the dtype's spelling and the device
    check_device(options.device)
    found = families.require(resolve(path), "chat_backend")
    return ChatModel(found.family.chat_backend(found, options))
