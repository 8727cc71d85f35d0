"""Generation from spliced embeddings: sampling, streaming, a reused KV cache, padded batches.

A prompt is a list of positions; each is a text token or one feature vector of an image.
Positions carry a key (the token id, or the image digest and index) so that a prompt can
reuse the KV cache of the longest prefix it shares with what was computed before
(``PrefixCache``): a second turn about the same image re-reads neither the image nor the
first turn, and a server's requests about the same image share its positions. Reused or
not, the positions computed are the same, so a cached prompt gives the tokens a cold run
gives.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Protocol

import torch

from .. import limits
from ..errors import VlmkitError


@functools.cache
def cache_argument() -> str:
    """The name transformers gives a model's KV cache, as a forward argument and an output field.

    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works, with a
    deprecation warning on every run); vlmkit uses whichever name the installed version declares.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def with_cache(model, past, **inputs):
    """``model(**inputs, use_cache=True)`` continuing from the KV cache ``past``; returns (output, its cache)."""
    name = cache_argument()
    out = model(**inputs, **({name: past} if past is not None else {}), use_cache=True)
    return out, getattr(out, name)


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

    def __post_init__(self):  # the ranges the command line and the server check too (vlmkit.limits)
        for limit in (limits.MAX_NEW_TOKENS, limits.TEMPERATURE, limits.TOP_P):
            object.__setattr__(self, limit.name, limit.check(getattr(self, limit.name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", limits.SEED.check(self.seed))


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
    """What generation needs from a backend.

    An encoder-decoder backend (BLIP-2 Flan-T5) sets ``encoder_decoder = True`` and gives
    ``encode`` / ``decoder_forward`` instead of ``forward`` (see ``Seq2SeqBatch``).
    """

    eos_token_ids: set[int]
    max_context: int | None
    encoder_decoder: bool  # absent means False
    min_new_tokens: int  # EOS cannot come before this many tokens (absent means 0)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def forward(self, embeds: torch.Tensor, attention_mask, position_ids, past) -> tuple[torch.Tensor, object]:
        """Logits of the last position ``[B, 1, V]`` (the only ones generation reads) and the KV cache."""

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


def embed(lm: LanguageModel, prompt: Prompt, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Input embeddings ``[1, end - start, H]`` of positions ``start:end``, image features spliced in."""
    end = len(prompt) if end is None else end
    embeds = lm.embed_tokens(torch.tensor([prompt.ids[start:end]]))[0].clone()
    for begin, features in prompt.images:
        lo, hi = max(begin, start), min(begin + features.shape[0], end)
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
    """Next token per row of ``logits [B, V]``: argmax, or temperature + nucleus (top-p) sampling.

    Picked on the CPU (a row of logits is small), where the seeded ``generator`` lives: a CPU
    generator cannot drive sampling on a GPU.
    """
    logits = logits.to("cpu", torch.float32)
    if params.temperature <= 0:
        return logits.argmax(-1)
    # Shifted so the best logit is 0: a temperature too small for float32 (5e-324 becomes 0) gives
    # 0/0 there, read as 0, and -inf elsewhere, i.e. the greedy token, never a NaN.
    scaled = (logits - logits.max(-1, keepdim=True).values) / params.temperature
    probs = torch.softmax(scaled.nan_to_num(nan=0.0), -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p
        keep[..., 0] = True  # the most likely token always stays (a top_p below float32's range keeps it alone)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


def _early_eos_ruled_out(lm: LanguageModel, logits: torch.Tensor, generated: int) -> torch.Tensor:
    """``logits`` with EOS ruled out while ``generated`` is under the backend's ``min_new_tokens``."""
    if generated >= getattr(lm, "min_new_tokens", 0):
        return logits
    logits = logits.clone()
    logits[..., sorted(lm.eos_token_ids)] = -torch.inf
    return logits


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


Layers = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) [1, heads, positions, head_dim] per layer
DEFAULT_PREFIX_CACHE_BYTES = 2_000_000_000


class PrefixCache:
    """KV caches of recent prompts and conversations, looked up by their longest shared prefix.

    ``stream_tokens`` keeps each conversation it finished (prompt and answer), so the next
    turn computes only the new question; ``batch_stream`` keeps each prompt it read, so a
    request about an image that another request brought computes only its own words.
    Entries are dropped least recently used once their tensors exceed ``max_bytes``, and an
    entry that a newer one extends is dropped at once. The cached tensors are never written
    to: a reuse slices them, and the model's cache appends by concatenation (new tensors).

    An entry added with ``exact=True`` (an encoder's output, which only the very same prompt can
    reuse) is found only by ``exact`` with the same keys: ``longest`` skips it, and no newer
    entry drops it for extending it.
    """

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[list[Hashable], Layers, int, bool]] = OrderedDict()  # last: exact
        self._bytes = 0
        self._ids = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def longest(self, keys: list[Hashable]) -> tuple[int, Layers | None]:
        """(positions shared, that entry's layers) for the entry sharing the longest prefix with ``keys``."""
        best, found, at = 0, None, None
        for entry_id, (entry_keys, layers, _, exact) in self._entries.items():
            n = 0 if exact else _common_prefix(entry_keys, keys)
            if n > best:
                best, found, at = n, layers, entry_id
        if at is not None:
            self._entries.move_to_end(at)
        return best, found

    def exact(self, keys: list[Hashable]) -> Layers | None:
        """The layers of the ``exact=True`` entry whose keys are ``keys``, or None."""
        for entry_id, (entry_keys, layers, _, exact) in self._entries.items():
            if exact and entry_keys == keys:
                self._entries.move_to_end(entry_id)
                return layers
        return None

    def add(self, keys: list[Hashable], layers: Layers, *, exact: bool = False) -> None:
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.max_bytes or not keys:
            return
        for entry_id, (entry_keys, _, entry_size, entry_exact) in list(self._entries.items()):
            # a prefix entry the new one holds all of goes; an exact entry is replaced only by the same keys
            if entry_exact == exact and (entry_keys == keys if exact
                                         else _common_prefix(entry_keys, keys) == len(entry_keys)):
                del self._entries[entry_id]
                self._bytes -= entry_size
        self._entries[self._ids] = (list(keys), layers, size, exact)
        self._ids += 1
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, _, old, _) = self._entries.popitem(last=False)
            self._bytes -= old


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _kv_cache(layers: Layers):
    """A transformers ``DynamicCache`` holding ``layers`` as they are (no copy; plain layers: every position kept).

    Safe for tensors the prefix cache shares: a ``DynamicLayer`` only ever replaces its tensors
    (``torch.cat`` on update, slicing on crop), it never writes into them.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k[:, :, :0], v[:, :, :0], i)  # creates the layer (dtype, device)
        cache.layers[i].keys, cache.layers[i].values = k, v
    return cache


def _layers(cache) -> Layers:
    return [(layer.keys, layer.values) for layer in cache.layers]


class Prefill:
    """Reading one prompt (the positions ``cache`` does not already hold), ``chunk`` positions per ``step``.

    A long prompt read in chunks lets a server decode its running requests between the
    chunks; each chunk attends to the KV cache of those before it, so the positions computed
    are the ones a whole read computes.
    """

    def __init__(self, lm: LanguageModel, prompt: Prompt, cache: PrefixCache | None, chunk: int | None = None):
        reuse, layers = cache.longest(prompt.keys) if cache is not None else (0, None)
        reuse = min(reuse, len(prompt) - 1)  # the last position is always read: its logits give the first token
        self.lm, self.prompt, self.chunk, self.read = lm, prompt, chunk, reuse
        self.past = _kv_cache([(k[:, :, :reuse], v[:, :, :reuse]) for k, v in layers] if reuse > 0 else [])
        self.logits: torch.Tensor | None = None  # [1, V], once the last position is read

    @property
    def done(self) -> bool:
        return self.read == len(self.prompt)

    def step(self) -> None:
        end = len(self.prompt) if self.chunk is None else min(self.read + self.chunk, len(self.prompt))
        with torch.no_grad():
            logits, self.past = self.lm.forward(embed(self.lm, self.prompt, self.read, end), None, None, self.past)
        self.read, self.logits = end, logits[:, -1]


def prefill(lm: LanguageModel, prompt: Prompt, cache: PrefixCache | None) -> tuple[torch.Tensor, object]:
    """Read ``prompt`` whole (what ``cache`` does not already hold): last logits ``[1, V]`` and the KV cache."""
    reading = Prefill(lm, prompt, cache)
    reading.step()
    return reading.logits, reading.past


def stream_tokens(lm: LanguageModel, prompt: Prompt, params: SamplingParams, cache: PrefixCache | None = None
                  ) -> Iterator[int]:
    """Yield generated token ids one by one (EOS included, then stop).

    With a ``cache``, the longest cached prefix is reused, and the conversation computed
    (prompt and answer) is kept there when the generator ends, however it ends.
    """
    if getattr(lm, "encoder_decoder", False):  # nothing of a conversation carries over: a batch of one
        for step in batch_stream(lm, [prompt], [params], cache=cache):
            yield step[0]
        return
    check_context(lm, prompt, params)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    keys = list(prompt.keys)
    with torch.no_grad():  # not held across the yields: the caller's grad mode stays its own
        logits, past = prefill(lm, prompt, cache)
    try:
        for generated in range(params.max_new_tokens):
            token = int(pick(_early_eos_ruled_out(lm, logits, generated), params, generator)[0])
            yield token
            if token in lm.eos_token_ids:
                return
            with torch.no_grad():
                step, past = lm.forward(lm.embed_tokens(torch.tensor([[token]])), None, None, past)
            logits = step[:, -1]
            keys.append(token)
    finally:
        if cache is not None:
            cache.add(keys, _layers(past))


@dataclass(eq=False)  # compared and hashed by identity: a row is a key of its request
class Row:
    """One sequence of a ``DecodeBatch``: how it samples, and its positions so far."""

    params: SamplingParams
    generator: torch.Generator | None
    left: int  # tokens it may still generate
    length: int  # positions in the KV cache


BLOCK = 128  # free positions a batch's KV cache is allocated with, each time it runs out


@functools.cache
def _window_layer() -> type:
    """A transformers cache layer over a window of a ``BatchCache``'s tensors (transformers imported when needed).

    Where a ``DynamicLayer`` concatenates a step's keys and values to its own (a new tensor
    each step), this one writes them in place into the columns after its window, and widens it.
    """
    from transformers.cache_utils import DynamicLayer

    class WindowLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, start: int, end: int):
            super().__init__()
            self.buffers, self.rows, self.start = (keys, values), rows, start
            self.keys, self.values = keys[:rows, :, start:end], values[:rows, :, start:end]
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            (keys, values), n = self.buffers, self.rows
            end = self.start + self.keys.shape[2] + key_states.shape[2]
            keys[:n, :, end - key_states.shape[2]:end] = key_states
            values[:n, :, end - value_states.shape[2]:end] = value_states
            self.keys, self.values = keys[:n, :, self.start:end], values[:n, :, self.start:end]
            return self.keys, self.values

    return WindowLayer


class BatchCache:
    """The KV cache of a batch's rows, in tensors allocated ahead and written in place.

    Per layer, keys and values ``[slots, heads, capacity, dim]``: row i holds slot i, every
    row's positions end at column ``end`` (a shorter row is padded on the left, which ``mask``
    hides), and columns ``start:end`` are those some row uses. A decode step writes its keys
    and values at column ``end`` (``step``); a joining row's are copied into the next slot; the
    rows after a leaving one move down a slot (a copy of those rows only). Only when the slots or
    the columns run out are the tensors allocated again, ``BLOCK`` columns wider than needed: one
    copy of the cache per ``BLOCK`` steps instead of one per step.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [slots, capacity]: 1 where a row has a position
        self.rows = self.start = self.end = 0

    def layers(self) -> Layers:
        """The rows' keys and values ``[rows, heads, end - start, dim]`` per layer (views)."""
        return [(k[:self.rows, :, self.start:self.end], v[:self.rows, :, self.start:self.end])
                for k, v in zip(self.keys, self.values)]

    def join(self, layers: Layers) -> None:
        """Copy a new row's keys and values ``[1, heads, L, dim]`` into the next slot, ending at ``end``."""
        length = layers[0][0].shape[2]
        if not self.rows:
            self.start = self.end = length
        if not self.keys:
            self.keys = [k.new_zeros(1, k.shape[1], 0, k.shape[3]) for k, _ in layers]
            self.values = [v.new_zeros(1, v.shape[1], 0, v.shape[3]) for _, v in layers]
            self.mask = torch.zeros(1, 0, dtype=torch.long, device=layers[0][0].device)
            self.start = self.end = 0
        slots = self.mask.shape[0]
        if self.rows == slots or length > self.end or self.end >= self.mask.shape[1]:
            self._allocate(slots if self.rows < slots else 2 * slots, max(0, length - (self.end - self.start)))
        first, n = self.end - length, self.rows
        if first < self.start:  # columns no row used: whatever a row that left wrote there is masked
            self.mask[:n, first:self.start] = 0
            self.start = first
        for (k, v), (new_k, new_v) in zip(zip(self.keys, self.values), layers):
            k[n, :, first:self.end], v[n, :, first:self.end] = new_k[0], new_v[0]
        self.mask[n, self.start:first] = 0
        self.mask[n, first:self.end] = 1
        self.rows += 1

    def step(self):
        """(a transformers cache over the rows' columns, the attention mask) for a decode step.

        The model writes the step's keys and values at column ``end``, which this step adds.
        """
        from transformers import DynamicCache

        if self.end == self.mask.shape[1]:
            self._allocate(self.mask.shape[0], 0)
        cache = DynamicCache()
        cache.layers = [_window_layer()(k, v, self.rows, self.start, self.end) for k, v in zip(self.keys, self.values)]
        self.mask[:self.rows, self.end] = 1
        self.end += 1
        return cache, self.mask[:self.rows, self.start:self.end]

    def remove(self, keep: list[int]) -> None:
        """Keep the rows ``keep`` (indices, ascending): the rows after a freed slot move down, in order."""
        n = len(keep)
        moved = next((i for i, row in enumerate(keep) if row != i), n)  # the first slot that changes hands
        if moved < n:
            source = torch.tensor(keep[moved:], device=self.mask.device)
            for t in self.keys + self.values:
                t[moved:n, :, self.start:self.end] = t[source, :, self.start:self.end]
            self.mask[moved:n, self.start:self.end] = self.mask[source, self.start:self.end]
        self.rows = n
        if n:  # columns before the first one a row uses are padding in every row left
            self.start += int(self.mask[:n, self.start:self.end].any(0).nonzero()[0])

    def _allocate(self, slots: int, left: int) -> None:
        """New tensors of ``slots`` slots: the columns in use moved to ``left:``, ``BLOCK`` free ones after them."""
        width, n = self.end - self.start, self.rows
        capacity = left + width + BLOCK

        def moved(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[0], shape[dim] = slots, capacity
            new = t.new_zeros(shape)
            new[:n].narrow(dim, left, width).copy_(t[:n].narrow(dim, self.start, width))
            return new

        self.keys = [moved(k, 2) for k in self.keys]
        self.values = [moved(v, 2) for v in self.values]
        self.mask = moved(self.mask, 1)
        self.start, self.end = left, left + width


@dataclass
class _Reading:
    """A prompt queued to join a batch, and how far it is read."""

    row: Row
    prompt: Prompt
    chunk: int | None
    prefill: Prefill | None = None  # made at the first read: the prefix cache is looked up then


class DecodeBatch:
    """Sequences decoded together, one token each per step (continuous batching).

    A row joins at any step, once its prompt is read on its own (``Prefill``, through the
    prefix cache; ``begin`` and ``read`` read a long prompt in chunks between steps); the
    rows' KV caches are kept as one (``BatchCache``), each row padded on the left, with an
    attention mask and per-row positions. A row leaves at any step. A server admits waiting
    requests between steps instead of waiting for the whole batch to finish.
    """

    def __init__(self, lm: LanguageModel, cache: PrefixCache | None = None):
        self.lm, self.cache = lm, cache
        self.rows: list[Row] = []
        self.reading: list[_Reading] = []  # prompts queued to join, first read first
        self.logits: torch.Tensor | None = None  # [rows, vocab]: each row's next-token logits
        self.kv = BatchCache()

    def begin(self, prompt: Prompt, params: SamplingParams, chunk: int | None = None) -> Row:
        """Queue ``prompt``'s row; ``read`` reads it, ``chunk`` positions a call (all at once without one).

        Raises:
            ContextError: the prompt and ``params.max_new_tokens`` do not fit the context.
        """
        check_context(self.lm, prompt, params)
        row = Row(params, torch.Generator().manual_seed(params.seed) if params.seed is not None else None,
                  params.max_new_tokens, len(prompt))
        self.reading.append(_Reading(row, prompt, chunk))
        return row

    def read(self) -> None:
        """Read the next chunk of the first prompt queued; once it is read whole, its row joins ``rows``.

        If reading fails, that prompt leaves the queue (the batch is otherwise unchanged).
        """
        reading = self.reading[0]
        try:
            if reading.prefill is None:
                reading.prefill = Prefill(self.lm, reading.prompt, self.cache, reading.chunk)
            reading.prefill.step()
        except BaseException:
            self.reading.remove(reading)
            raise
        if reading.prefill.done:
            self.reading.remove(reading)
            layers = _layers(reading.prefill.past)
            if self.cache is not None:
                self.cache.add(reading.prompt.keys, layers)
            self._join(reading.row, layers, reading.prefill.logits)

    def add(self, prompt: Prompt, params: SamplingParams) -> Row:
        """Read ``prompt`` whole and add its row (``begin``, then ``read``)."""
        row = self.begin(prompt, params)
        while row not in self.rows:
            self.read()
        return row

    def _join(self, row: Row, layers: Layers, logits: torch.Tensor) -> None:
        self.kv.join(layers)
        self.rows.append(row)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def pick(self) -> list[int]:
        """Each row's next token, by its own sampling parameters."""
        return [int(pick(_early_eos_ruled_out(self.lm, self.logits[i:i + 1], r.params.max_new_tokens - r.left),
                         r.params, r.generator)[0]) for i, r in enumerate(self.rows)]

    def remove(self, rows: list[Row]) -> None:
        """Take ``rows`` out (finished, or their client went away), queued ones too."""
        gone = set(rows)
        self.reading = [r for r in self.reading if r.row not in gone]
        keep = [i for i, r in enumerate(self.rows) if r not in gone]
        if len(keep) == len(self.rows):
            return
        self.kv.remove(keep)
        self.rows = [self.rows[i] for i in keep]
        self.logits = self.logits[keep] if self.rows else None

    def advance(self, tokens: list[int]) -> None:
        """Feed each row the token it was given (``pick``) and compute the next logits."""
        for row in self.rows:
            row.left -= 1
            row.length += 1
        past, mask = self.kv.step()
        positions = torch.tensor([[r.length - 1] for r in self.rows], device=mask.device)
        with torch.no_grad():
            out, _ = self.lm.forward(self.lm.embed_tokens(torch.tensor(tokens)[:, None]), mask, positions, past)
        self.logits = out[:, -1]


class Seq2SeqBatch(DecodeBatch):
    """Encoder-decoder sequences (BLIP-2 Flan-T5) decoded together: ``DecodeBatch``'s interface.

    A row joins with its prompt (queries and text) read by the encoder once, whole, and its
    decoder's first step (the start token) computed on its own. The encoder reads the whole
    prompt both ways, so no prefix of it can be reused: the prefix cache keeps each prompt's
    cross-attention keys and values whole, and a prompt uses an entry only when the keys are
    the same (the same question about the same image: no encoder run at all). In the batch,
    the decoders' self-attention caches are ``DecodeBatch``'s (padded on the left, which T5's
    relative position bias allows: it depends on distances only); the cross-attention keys
    and values are padded on the right, and each padding is hidden by its mask.
    """

    def __init__(self, lm: LanguageModel, cache: PrefixCache | None = None):
        super().__init__(lm, cache)
        self.cross: Layers = []  # [rows, heads, encoder width, dim] per layer
        self.encoder_mask: torch.Tensor | None = None  # [rows, encoder width]: 0 over each row's right padding

    def _cross(self, prompt: Prompt) -> Layers | None:
        """The cross-attention keys and values the cache holds for exactly this prompt, or None."""
        return None if self.cache is None else self.cache.exact(prompt.keys)

    def read(self) -> None:
        reading = self.reading.pop(0)
        prompt, row = reading.prompt, reading.row
        cross = self._cross(prompt)
        with torch.no_grad():
            states = self.lm.encode(embed(self.lm, prompt)) if cross is None else None
            start = torch.tensor([[self.lm.decoder_start_token_id]])
            logits, past = self._decode(start, torch.ones(1, 1, dtype=torch.long), _kv_cache([]), cross or [],
                                        torch.ones(1, len(prompt), dtype=torch.long), states)
        layers, cross = _layers(past.self_attention_cache), _layers(past.cross_attention_cache)
        if self.cache is not None:
            self.cache.add(prompt.keys, cross, exact=True)  # encoder outputs: only this very prompt reuses them
        row.length = 1  # the decoder's positions
        encoder_mask = torch.ones(1, len(prompt), dtype=torch.long, device=logits.device)
        if not self.rows:
            self.cross, self.encoder_mask = cross, encoder_mask
        else:
            width = max(self.encoder_mask.shape[1], len(prompt))
            self.cross = [tuple(torch.cat([_pad_right(mine, width, 2), _pad_right(new, width, 2)])
                                for mine, new in zip(a, b)) for a, b in zip(self.cross, cross)]
            self.encoder_mask = torch.cat([_pad_right(self.encoder_mask, width, 1), _pad_right(encoder_mask, width, 1)])
        self._join(row, layers, logits[:, -1])

    def remove(self, rows: list[Row]) -> None:
        gone = set(rows)
        keep = [i for i, r in enumerate(self.rows) if r not in gone]
        super().remove(rows)  # the rows, their logits and decoder caches
        if not self.rows:
            self.cross, self.encoder_mask = [], None
            return
        index = torch.tensor(keep, device=self.encoder_mask.device)
        encoder_mask = self.encoder_mask[index]
        end = int(encoder_mask.any(0).nonzero()[-1]) + 1  # columns from here on are padding in every row left
        self.encoder_mask = encoder_mask[:, :end]
        self.cross = [(k[index, :, :end], v[index, :, :end]) for k, v in self.cross]

    def advance(self, tokens: list[int]) -> None:
        for row in self.rows:
            row.left -= 1
            row.length += 1
        past, mask = self.kv.step()
        with torch.no_grad():
            out, _ = self._decode(torch.tensor(tokens)[:, None], mask, past, self.cross, self.encoder_mask, None)
        self.logits = out[:, -1]

    def _decode(self, ids, mask, past, cross: Layers, encoder_mask, states):
        """One decoder step over the self-attention cache ``past``. Without ``states`` (the encoder's output),
        the cached ``cross`` keys and values are all the decoder reads of it: a zero-width stand-in gives
        their batch and length."""
        from transformers import EncoderDecoderCache

        if states is None:
            states = cross[0][0].new_zeros(encoder_mask.shape[0], encoder_mask.shape[1], 0)
        device = states.device
        past = EncoderDecoderCache(past, _kv_cache(cross))
        return self.lm.decoder_forward(ids.to(device), mask.to(device), states, encoder_mask.to(device), past)


def new_batch(lm: LanguageModel, cache: PrefixCache | None = None) -> DecodeBatch:
    """The batch that decodes ``lm``'s sequences: a ``Seq2SeqBatch`` for an encoder-decoder."""
    return (Seq2SeqBatch if getattr(lm, "encoder_decoder", False) else DecodeBatch)(lm, cache)


def batch_stream(lm: LanguageModel, prompts: list[Prompt], params: list[SamplingParams],
                 active: Callable[[int], bool] = lambda i: True, cache: PrefixCache | None = None
                 ) -> Iterator[list[int | None]]:
    """Generate for several prompts at once (a ``DecodeBatch``), each with its own sampling parameters.

    Yields, per step, one token per prompt (None for prompts that are finished or no longer
    ``active``); stops when none is left.
    """
    for p, ps in zip(prompts, params):  # every prompt checked before any is read
        check_context(lm, p, ps)
    batch = new_batch(lm, cache)
    index = {batch.add(p, ps): i for i, (p, ps) in enumerate(zip(prompts, params))}
    batch.remove([r for r, i in index.items() if r.left <= 0 or not active(i)])
    while batch.rows:
        picked = dict(zip(batch.rows, batch.pick()))
        step: list[int | None] = [None] * len(prompts)
        done = []
        for row, token in picked.items():
            step[index[row]] = token
            if token in lm.eos_token_ids or row.left <= 1:
                done.append(row)
        yield step
        batch.remove(done + [r for r in batch.rows if not active(index[r])])
        if batch.rows:
            batch.advance([picked[r] for r in batch.rows])


def _pad_right(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` made ``width`` long along ``dim`` by zeros behind (padding the encoder mask hides)."""
    pad = width - t.shape[dim]
    if pad <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim)
