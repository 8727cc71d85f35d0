"""llama.cpp itself, through llama-cpp-python's C API (``llama_cpp`` + ``llama_cpp.mtmd_cpp``).

The proof that a GGUF pair works is llama.cpp running it: ``LlamaCpp`` loads a language
model GGUF and its mmproj the way ``llama-mtmd-cli`` does, tokenizes a prompt with an
image (``mtmd_tokenize``), encodes the image (``mtmd_encode_chunk``: the image embeddings
llama.cpp feeds its language model), decodes the prompt and generates greedily, keeping
the logits at the last prompt position and at every generated token. It can also decode
given ids and embeddings, to measure the language model alone.

llama.cpp's log goes to a buffer; an error quotes its last lines.
"""

from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VlmkitError

# The llama.cpp defect a LLaVA GGUF pair meets (named by verify and by the model card of every GGUF pair)
DEFECT = ("ggml-org/llama.cpp#25814 (fix: PR #25844): the LLaVA graph concatenates the CLS embedding after the "
          "patches, so each patch gets its neighbour's position embedding, the first patch is dropped and the "
          "projected CLS reaches the language model")

INSTALL_HINT = "install it with: pip install 'vlmkit[gguf]'   (llama-cpp-python; pip builds llama.cpp from source)"


class LlamaCppError(VlmkitError):
    """llama.cpp refused a file or failed to run it."""


def load_bindings():
    """``(llama_cpp, mtmd_cpp)``, or a clear error naming the missing package."""
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError as e:
        raise LlamaCppError(f"llama.cpp is not available: {e}", hint=INSTALL_HINT) from None
    return llama_cpp, mtmd_cpp


_LOG: deque[str] = deque(maxlen=40)
_CALLBACK = None


def _install_log(llama_cpp, mtmd_cpp) -> None:
    global _CALLBACK
    if _CALLBACK is None:
        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):  # noqa: ARG001 - the C signature
            _LOG.append(text.decode("utf-8", "replace").rstrip())

        _CALLBACK = collect
        llama_cpp.llama_log_set(_CALLBACK, None)
        mtmd_cpp.mtmd_helper_log_set(_CALLBACK, None)
        if hasattr(mtmd_cpp, "mtmd_log_set"):
            mtmd_cpp.mtmd_log_set(_CALLBACK, None)


def recent_log(n: int = 8) -> str:
    return "\n".join(line for line in list(_LOG)[-n:] if line)


@dataclass
class Chunk:
    """One part of a tokenized prompt: text ids, or an image with its embeddings ``[n_tokens, n_embd]``."""

    kind: str  # "text" | "image"
    ids: list[int] = field(default_factory=list)
    embeddings: np.ndarray | None = None


@dataclass
class Run:
    """A prompt run through llama.cpp: its chunks, the greedy tokens, and the logits before each of them."""

    chunks: list[Chunk]
    tokens: list[int]
    logits: np.ndarray  # [len(tokens), n_vocab]: at the last prompt position, then after each generated token

    @property
    def image_embeddings(self) -> list[np.ndarray]:
        return [c.embeddings for c in self.chunks if c.kind == "image"]


def _rgb(image):
    from ..runtime.images import load_image

    return load_image(image).convert("RGB")


class LlamaCpp:
    """A language-model GGUF (and optionally its mmproj) loaded in llama.cpp, on the CPU.

    Example:
        >>> with LlamaCpp("llava-f16.gguf", "mmproj-llava-f16.gguf") as llm:     # doctest: +SKIP
        ...     run = llm.generate("USER: <__media__>\\nWhat is it? ASSISTANT:", ["cat.png"], 8)
    """

    def __init__(self, model: str | Path, mmproj: str | Path | None = None, *, n_ctx: int = 2048,
                 threads: int = 2, exact: bool = True):
        """Load ``model`` (and ``mmproj``).

        Args:
            n_ctx: context length (prompt + image tokens + generated tokens).
            threads: CPU threads.
            exact: measure the file, not llama.cpp's runtime shortcuts: an F32 KV cache
                (``--cache-type-k/v f32``), no flash attention, and no extra CPU buffer types
                (the weight repacking behind ``ggml_backend_amx_mul_mat``, which crashes on Q8_0
                models on CPUs with AMX in this llama.cpp, whoever wrote the file).
        """
        self.lib, self.mtmd_lib = load_bindings()
        _install_log(self.lib, self.mtmd_lib)
        lib = self.lib
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        if exact:
            params.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(model).encode(), params)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {model}:\n{recent_log()}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_embd = lib.llama_model_n_embd(self.model)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(n_ctx, 2048)
        cparams.n_threads = cparams.n_threads_batch = threads
        if exact:
            cparams.type_k = cparams.type_v = lib.GGML_TYPE_F32
            cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.n_batch = cparams.n_batch
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise LlamaCppError(f"llama.cpp could not create a context for {model}:\n{recent_log()}")
        self.mtmd = None
        if mmproj is not None:
            mp = self.mtmd_lib.mtmd_context_params_default()
            mp.use_gpu = False
            mp.print_timings = False
            mp.n_threads = threads
            mp.warmup = False
            if exact:
                mp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            self.mtmd = self.mtmd_lib.mtmd_init_from_file(str(mmproj).encode(), self.model, mp)
            if not self.mtmd:
                self.close()
                raise LlamaCppError(f"llama.cpp (mtmd) could not load the mmproj {mmproj}:\n{recent_log()}")

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if getattr(self, "mtmd", None):
            self.mtmd_lib.mtmd_free(self.mtmd)
            self.mtmd = None
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------- inputs

    @property
    def marker(self) -> str:
        return self.mtmd_lib.mtmd_default_marker().decode()

    def tokenize(self, prompt: str, images: list) -> list[Chunk]:
        """``prompt`` with one media marker per image -> chunks, images encoded (embeddings kept).

        Images are paths or PIL images, decoded here (``runtime.images.load_image``, bounded) and
        handed to llama.cpp as RGB pixels, so both sides of a comparison see the same pixels.
        """
        if self.mtmd is None:
            raise LlamaCppError("no mmproj loaded: pass one to LlamaCpp(model, mmproj)")
        m = self.mtmd_lib
        bitmaps = []
        for image in images:
            rgb = np.ascontiguousarray(np.asarray(_rgb(image), dtype=np.uint8))
            data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
            bitmap = m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
            if not bitmap:
                raise LlamaCppError(f"llama.cpp could not take the image {image}:\n{recent_log()}")
            bitmaps.append(bitmap)
        text = m.mtmd_input_text()
        data = prompt.encode()
        text.text, text.text_len, text.add_special, text.parse_special = data, len(data), True, True
        chunks_p = m.mtmd_input_chunks_init()
        try:
            array = (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = m.mtmd_tokenize(self.mtmd, chunks_p, ctypes.byref(text), array, len(bitmaps))
            if rc != 0:
                raise LlamaCppError(f"mtmd_tokenize failed ({rc}): {recent_log()}",
                                    hint=f"put one {self.marker} in the prompt per image")
            chunks = []
            for i in range(m.mtmd_input_chunks_size(chunks_p)):
                chunk = m.mtmd_input_chunks_get(chunks_p, i)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    chunks.append(Chunk("text", [ptr[j] for j in range(n.value)]))
                else:
                    rc = m.mtmd_encode_chunk(self.mtmd, chunk)
                    if rc != 0:
                        raise LlamaCppError(f"mtmd_encode_chunk failed ({rc}): {recent_log()}")
                    n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
                    out = m.mtmd_get_output_embd(self.mtmd)
                    embd = np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,)).copy()
                    chunks.append(Chunk("image", embeddings=embd.reshape(n_tokens, self.n_embd)))
            return chunks
        finally:
            m.mtmd_input_chunks_free(chunks_p)
            for bitmap in bitmaps:
                m.mtmd_bitmap_free(bitmap)

    # -------------------------------------------------------------------- decode

    def _decode(self, pos: int, *, ids: list[int] | None = None, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Decode ids or embeddings at ``pos`` (in batches); returns the last position's logits."""
        lib = self.lib
        n = len(ids) if ids is not None else embeddings.shape[0]
        logits = None
        for start in range(0, n, self.n_batch):
            size = min(self.n_batch, n - start)
            batch = lib.llama_batch_init(size, 0 if ids is not None else self.n_embd, 1)
            try:
                for i in range(size):
                    if ids is not None:
                        batch.token[i] = ids[start + i]
                    batch.pos[i] = pos + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = start + i == n - 1
                if embeddings is not None:
                    flat = np.ascontiguousarray(embeddings[start:start + size], dtype=np.float32).reshape(-1)
                    ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
                batch.n_tokens = size
                rc = lib.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise LlamaCppError(f"llama_decode failed ({rc}) at position {pos + start}: {recent_log()}")
                if start + size == n:
                    ptr = lib.llama_get_logits_ith(self.ctx, size - 1)
                    logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
            finally:
                lib.llama_batch_free(batch)
        return logits

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def run_chunks(self, chunks: list[Chunk], max_new_tokens: int, *, stop: int | None = None) -> Run:
        """Decode ``chunks`` (image chunks from their embeddings) and generate greedily."""
        self._clear()
        pos, logits = 0, None
        for chunk in chunks:
            if chunk.kind == "text":
                logits = self._decode(pos, ids=chunk.ids)
                pos += len(chunk.ids)
            else:
                logits = self._decode(pos, embeddings=chunk.embeddings)
                pos += chunk.embeddings.shape[0]
        tokens, steps = [], []
        for _ in range(max_new_tokens):
            steps.append(logits)
            token = int(np.argmax(logits))
            tokens.append(token)
            if token == stop:
                break
            logits = self._decode(pos, ids=[token])
            pos += 1
        return Run(chunks, tokens, np.stack(steps) if steps else np.zeros((0, self.n_vocab), np.float32))

    def generate(self, prompt: str, images: list, max_new_tokens: int) -> Run:
        """Tokenize ``prompt`` with ``images``, encode them, decode, generate greedily (stops at EOS)."""
        return self.run_chunks(self.tokenize(prompt, images), max_new_tokens, stop=self.eos)

    @property
    def eos(self) -> int:
        return self.lib.llama_vocab_eos(self.vocab)
