"""Generation from spliced embeddings: sampling, streaming, a reused KV cache, padded batches.

A prompt is a list of positions; each is a text token or one feature vector of an image.
Positions carry a key (the token id, or the image digest and index) so that a follow-up
turn can reuse the KV cache of the longest prefix it shares with what was computed
before: a second turn about the same image re-reads neither the image nor the first turn.
Reused or not, the positions computed are the same, so a cached turn gives the tokens a
cold run gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Protocol

import torch

from ..errors import VlmkitError


class ContextError(VlmkitError):
    """The prompt (with the tokens asked for) does not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` 0 is greedy; ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Prompt:
    """Positions of one prompt: token ids (image positions hold a filler id), keys and image spans."""

    ids: list[int]
    keys: list[Hashable]
    images: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start position, features [T, H])

    @property
    def image_tokens(self) -> int:
        return sum(f.shape[0] for _, f in self.images)

    def __len__(self) -> int:
        return len(self.ids)


class LanguageModel(Protocol):
    """What generation needs from a backend."""

    eos_token_ids: set[int]
    max_context: int | None

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def forward(self, embeds: torch.Tensor, attention_mask, position_ids, past) -> tuple[torch.Tensor, object]: ...

    def decode(self, ids: list[int]) -> str: ...


def assemble(ids: list[int], marker: int, features: list[torch.Tensor], digests: list[str],
             filler: int) -> Prompt:
    """Expand each ``marker`` in ``ids`` into the positions of the next image's features."""
    marks = [i for i, t in enumerate(ids) if t == marker]
    if len(marks) != len(features):
        raise VlmkitError(f"the prompt has {len(marks)} image placeholder(s) but {len(features)} image(s) were "
                          "given", hint="give one image per <image> in the conversation (or none)")
    out_ids: list[int] = []
    keys: list[Hashable] = []
    spans = []
    start = 0
    for mark, feature, digest in zip(marks, features, digests):
        out_ids += ids[start:mark]
        keys += ids[start:mark]
        spans.append((len(out_ids), feature))
        out_ids += [filler] * feature.shape[0]
        keys += [(digest, j) for j in range(feature.shape[0])]
        start = mark + 1
    out_ids += ids[start:]
    keys += ids[start:]
    return Prompt(out_ids, keys, spans)


def embed(lm: LanguageModel, prompt: Prompt, start: int = 0) -> torch.Tensor:
    """Input embeddings ``[1, L - start, H]`` of positions ``start:``, image features spliced in."""
    embeds = lm.embed_tokens(torch.tensor([prompt.ids[start:]]))[0].clone()
    for begin, features in prompt.images:
        lo, hi = max(begin, start), min(begin + features.shape[0], len(prompt))
        if lo < hi:
            embeds[lo - start:hi - start] = features[lo - begin:hi - begin].to(embeds.dtype)
    return embeds[None]


def check_context(lm: LanguageModel, prompt: Prompt, params: SamplingParams) -> None:
    if lm.max_context and len(prompt) + params.max_new_tokens > lm.max_context:
        raise ContextError(
            f"the prompt is {len(prompt)} tokens ({prompt.image_tokens} of them image features); with "
            f"max_new_tokens={params.max_new_tokens} it exceeds the model's context of {lm.max_context}",
            hint="shorten the conversation or lower max_new_tokens")


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits [B, V]``: argmax, or temperature + nucleus (top-p) sampling."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


class TextStream:
    """Incremental detokenisation over a short window (cost independent of the answer's length).

    Decoding a window that starts a few tokens back gives SentencePiece its context (a
    leading space, a multi-byte character split over tokens); what lies beyond the text
    already emitted is new. An incomplete UTF-8 sequence is held back until it completes.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = max(self._read - 4, 0), len(self.ids)
        self.text += delta
        return delta


@dataclass
class Session:
    """The single conversation whose KV cache is kept (keys of the positions it holds)."""

    keys: list[Hashable] = field(default_factory=list)
    past: object = None


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def stream_tokens(lm: LanguageModel, prompt: Prompt, params: SamplingParams, session: Session | None = None
                  ) -> Iterator[int]:
    """Yield generated token ids one by one (EOS included, then stop).

    With a ``session``, the cached prefix shared with the previous call is reused and the
    session is left holding this call's positions.
    """
    check_context(lm, prompt, params)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    reuse = 0
    past = None
    if session is not None and session.past is not None:
        reuse = min(_common_prefix(session.keys, prompt.keys), len(prompt) - 1)  # recompute at least one position
        if reuse > 0:
            past = session.past
            extra = past.get_seq_length() - reuse
            if extra > 0:
                past.crop(-extra)  # transformers 5: a negative count removes that many positions
    with torch.no_grad():
        logits, past = lm.forward(embed(lm, prompt, reuse), None, None, past)
        keys = list(prompt.keys)
        for _ in range(params.max_new_tokens):
            token = int(pick(logits[:, -1], params, generator)[0])
            if session is not None:
                session.keys, session.past = keys, past
            yield token
            if token in lm.eos_token_ids:
                return
            logits, past = lm.forward(lm.embed_tokens(torch.tensor([[token]])), None, None, past)
            keys = keys + [token]
        if session is not None:
            session.keys, session.past = keys, past


def batch_stream(lm: LanguageModel, prompts: list[Prompt], params: list[SamplingParams],
                 active: Callable[[int], bool] = lambda i: True) -> Iterator[list[int | None]]:
    """Generate for several prompts at once: left padding, attention masks, per-row positions.

    Each row has its own sampling parameters. Yields, per step, one token per row (None
    for rows that are finished or no longer ``active``, e.g. a client that went away);
    stops when no row is left.
    """
    for p, ps in zip(prompts, params):
        check_context(lm, p, ps)
    generators = [torch.Generator().manual_seed(ps.seed) if ps.seed is not None else None for ps in params]
    width = max(len(p) for p in prompts)
    rows, masks = [], []
    for p in prompts:
        e = embed(lm, p)[0]
        pad = width - e.shape[0]
        rows.append(torch.cat([e.new_zeros(pad, e.shape[1]), e]))
        masks.append([0] * pad + [1] * e.shape[0])
    mask = torch.tensor(masks)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    left = [ps.max_new_tokens for ps in params]
    done = [n <= 0 for n in left]
    with torch.no_grad():
        logits, past = lm.forward(torch.stack(rows), mask, positions, None)
        while True:
            done = [d or not active(i) for i, d in enumerate(done)]
            if all(done):
                return
            tokens = [int(pick(logits[i:i + 1, -1], params[i], generators[i])[0]) for i in range(len(prompts))]
            step: list[int | None] = []
            for i, t in enumerate(tokens):
                if done[i]:
                    step.append(None)
                    continue
                step.append(t)
                left[i] -= 1
                done[i] = t in lm.eos_token_ids or left[i] <= 0
            yield step
            if all(done):
                return
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
            positions = positions[:, -1:] + 1
            logits, past = lm.forward(lm.embed_tokens(torch.tensor(tokens)[:, None]), mask, positions, past)
