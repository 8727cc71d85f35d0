"""LLaVA's language-model backbones as a table: one frozen row per backbone.

The original code (``llava/model/language_model/llava_<backbone>.py``) makes one class per
language model (``LlavaLlamaForCausalLM``, ``LlavaMistralForCausalLM``, ...). Everything
vlmkit does differently per backbone reads the row here; ``backbone_of`` is the one function
that picks a row. Adding a backbone is adding a row (and, for tests and the demo, its tiny
config): nothing else branches on the backbone's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ConfigError


@dataclass(frozen=True)
class Backbone:
    """One language model LLaVA was trained with.

    Attributes:
        name: the row's key (also the tiny model's variant name).
        original_architectures: ``config.architectures`` of the original checkpoint.
        original_model_types: ``config.model_type`` values original checkpoints carry: the released
            ones' first, then what the repository's current training code writes.
        plain_architecture: ``architectures`` of the language model alone (``--model-base``, ``train --from-llm``).
        hf_model_type: transformers' ``model_type`` of the language model (``text_config.model_type``).
        tokenizer: "sentencepiece" (``tokenizer.model``) or "bpe" (byte-level, ``tokenizer.json``).
        default_template: the conversation template when ``--template`` and the original cli's name
            rule give none; None: no template is known, ``--template`` is required.
        gguf_arch: llama.cpp's ``general.architecture``; None: ``--to gguf`` refuses this backbone.
        permute_qk: whether llama.cpp's converter permutes q/k rows into its RoPE order.
        gguf_vocab: how the GGUF vocabulary is written ("llama": SentencePiece); None with ``gguf_arch`` None.
        tiny: the tiny random model (``tiny.py``): ``text`` (its config fields beyond the common
            toy sizes), ``tokenizer`` (the folder under ``assets/tokenizers``), ``name_or_path``
            (the ``_name_or_path`` the training run records); empty: no tiny model.
    """

    name: str
    original_architectures: tuple[str, ...]
    original_model_types: tuple[str, ...]
    plain_architecture: str
    hf_model_type: str
    tokenizer: str
    default_template: str | None
    gguf_arch: str | None
    permute_qk: bool
    gguf_vocab: str | None
    tiny: dict = field(default_factory=dict, hash=False, compare=False)


ROWS: dict[str, Backbone] = {row.name: row for row in (
    # LLaMA / Vicuna: LLaVA-1.5, LLaVA-1.6-vicuna (liuhaotian/llava-v1.5-7b says model_type "llava";
    # llava_llama.py's LlavaConfig writes "llava_llama")
    Backbone("llama", ("LlavaLlamaForCausalLM",), ("llava", "llava_llama"), "LlamaForCausalLM", "llama",
             "sentencepiece", "llava_v1", gguf_arch="llama", permute_qk=True, gguf_vocab="llama",
             tiny={"text": {"pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None},
                   "tokenizer": "llama-spm", "name_or_path": "./checkpoints/vicuna-7b-v1-5"}),
    # Mistral: LLaVA-1.6-mistral; llama.cpp's converter writes Mistral as "llama" too
    Backbone("mistral", ("LlavaMistralForCausalLM",), ("llava_mistral",), "MistralForCausalLM", "mistral",
             "sentencepiece", "mistral_instruct", gguf_arch="llama", permute_qk=True, gguf_vocab="llama",
             tiny={"text": {"rope_theta": 1000000.0, "sliding_window": None, "max_position_embeddings": 32768},
                   "tokenizer": "mistral-spm", "name_or_path": "mistralai/Mistral-7B-Instruct-v0.2"}),
    # Qwen2 (LLaVA-NeXT's llava_qwen.py): recognised and composed for training only. Its byte-level
    # tokenizer has no path through chat, convert or GGUF yet, and no default template is known.
    Backbone("qwen2", ("LlavaQwenForCausalLM",), ("llava_qwen",), "Qwen2ForCausalLM", "qwen2",
             "bpe", None, gguf_arch=None, permute_qk=False, gguf_vocab=None),
)}

ARCHITECTURES: tuple[str, ...] = tuple(a for row in ROWS.values() for a in row.original_architectures)


def backbone_of(config: dict, folder: Path) -> Backbone:
    """The backbone of an original checkpoint, from its ``config.json``: ``architectures``, else ``model_type``.

    Args:
        config: the original ``config.json``.
        folder: where it was read (named in the error).

    Raises:
        ConfigError: neither field names a known backbone; the message names both fields and the rows.
    """
    for arch in config.get("architectures") or []:
        for row in ROWS.values():
            if arch in row.original_architectures:
                return row
    model_type = config.get("model_type")
    for row in ROWS.values():
        if model_type in row.original_model_types:
            return row
    raise ConfigError(f"{folder}/config.json: cannot tell the language model from architectures "
                      f"{config.get('architectures')} / model_type {model_type!r}",
                      hint=f"known: {', '.join(ARCHITECTURES)} (model_type "
                           f"{', '.join(t for row in ROWS.values() for t in row.original_model_types)})")


def of_model_type(hf_model_type: str | None) -> Backbone | None:
    """The row of a transformers folder's language model (``text_config.model_type``), if any."""
    return next((row for row in ROWS.values() if row.hf_model_type == hf_model_type), None)


def of_plain(config: dict) -> Backbone | None:
    """The row of a plain language model's ``config.json`` (``plain_architecture``: ``train`` from a Vicuna), if any."""
    return next((row for row in ROWS.values() if row.plain_architecture in (config.get("architectures") or [])), None)
