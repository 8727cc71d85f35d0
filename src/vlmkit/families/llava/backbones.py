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
        gguf_vocab: how the GGUF vocabulary is written ("llama": SentencePiece; "gpt2": byte-level BPE), the key
            of ``conversion.gguf_vocab.KINDS`` that ``--to gguf`` writes it with; None with ``gguf_arch`` None.
        gguf_pre: llama.cpp's pre-tokenizer name of a gpt2 vocabulary ("qwen2", "llama-bpe").
        name_rule: haotian-liu/LLaVA's cli picks the template from the model's name (``templates.AUTO_SELECT``);
            False for LLaVA-NeXT-repository checkpoints, whose tutorials name the template (``conv_template``).
        tiny: the tiny random model (``tiny.py``): ``text`` (its config fields beyond the common
            toy sizes), ``tokenizer`` (the folder under ``assets/tokenizers``), ``name_or_path``
            (the ``_name_or_path`` the training run records), ``release`` (a LLaVA-NeXT-repository release:
            its tiny model is a NeXT checkpoint in that release's layout); empty: no tiny model.
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
    gguf_pre: str | None = None
    name_rule: bool = True
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
    # Qwen2 / Qwen1.5 (LLaVA-NeXT's llava_qwen.py: lmms-lab/llava-next-72b/110b, the OneVision and Video releases):
    # byte-level BPE without BOS, template qwen_1_5 (conversation.py conv_templates "qwen_1_5"); llama.cpp's
    # converter writes Qwen2ForCausalLM as "qwen2" without the q/k permutation, its vocabulary as gpt2 / "qwen2".
    # The tiny config is Qwen1.5-7B-Chat's vocabulary and special ids (151,936 rows: the list is padded past the
    # tokenizer's 151,646 tokens).
    Backbone("qwen2", ("LlavaQwenForCausalLM",), ("llava_qwen",), "Qwen2ForCausalLM", "qwen2",
             "bpe", "qwen_1_5", gguf_arch="qwen2", permute_qk=False, gguf_vocab="gpt2", gguf_pre="qwen2", name_rule=False,
             tiny={"text": {"vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
                            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                            "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 2},
                   "tokenizer": "qwen2-bpe", "name_or_path": "Qwen/Qwen1.5-72B-Chat",
                   "release": "llava-next-qwen"}),
    # Llama 3 (lmms-lab/llama3-llava-next-8b): the same class and model_type as LLaVA-1.5's LLaMA (llava_llama.py),
    # told apart only by its tokenizer (a byte-level BPE tokenizer.json, no tokenizer.model). Template
    # llava_llama_3; llama.cpp writes it as "llama" (q/k permuted) with a gpt2 / "llama-bpe" vocabulary.
    Backbone("llama3", ("LlavaLlamaForCausalLM",), ("llava_llama",), "LlamaForCausalLM", "llama",
             "bpe", "llava_llama_3", gguf_arch="llama", permute_qk=True, gguf_vocab="gpt2", gguf_pre="llama-bpe", name_rule=False,
             tiny={"text": {"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128009,
                            "rope_theta": 500000.0, "max_position_embeddings": 8192, "pretraining_tp": 1,
                            "rope_scaling": None},
                   "tokenizer": "llama3-bpe", "name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
                   "release": "llama3-llava-next"}),
)}

ARCHITECTURES: tuple[str, ...] = tuple(dict.fromkeys(a for row in ROWS.values() for a in row.original_architectures))


def backbone_of(config: dict, folder: Path, tokenizer_folder: Path | None = None) -> Backbone:
    """The backbone of an original checkpoint, from its ``config.json``: ``architectures``, else ``model_type``;
    where several rows share them (LLaVA-1.5's LLaMA and llama3-llava-next: both ``LlavaLlamaForCausalLM``), the
    kind of the tokenizer decides: a ``tokenizer.model`` is SentencePiece, a byte-level ``tokenizer.json`` BPE.

    Args:
        config: the original ``config.json``.
        folder: where it was read (named in the error).
        tokenizer_folder: where the tokenizer is (the base model's for a LoRA or projector run); default ``folder``.

    Raises:
        ConfigError: neither field names a known backbone; the message names both fields and the rows.
    """
    rows = [row for row in ROWS.values() if set(config.get("architectures") or []) & set(row.original_architectures)]
    if not rows:
        rows = [row for row in ROWS.values() if config.get("model_type") in row.original_model_types]
    if not rows:
        raise ConfigError(f"{folder}/config.json: cannot tell the language model from architectures "
                          f"{config.get('architectures')} / model_type {config.get('model_type')!r}",
                          hint=f"known: {', '.join(ARCHITECTURES)} (model_type "
                               f"{', '.join(t for row in ROWS.values() for t in row.original_model_types)})")
    return _by_tokenizer(rows, tokenizer_folder or folder)


def of_model_type(hf_model_type: str | None, folder: Path | None = None) -> Backbone | None:
    """The row of a transformers folder's language model (``text_config.model_type``), if any; rows sharing the
    model type (llama: LLaMA/Vicuna and Llama 3) are told apart by the kind of the tokenizer in ``folder``."""
    return _by_tokenizer([row for row in ROWS.values() if row.hf_model_type == hf_model_type], folder)


def of_plain(config: dict, folder: Path | None = None) -> Backbone | None:
    """The row of a plain language model's ``config.json`` (``plain_architecture``: ``train`` from a Vicuna), if any;
    rows sharing the architecture (LlamaForCausalLM: Vicuna and Llama 3) are told apart by ``folder``'s tokenizer."""
    return _by_tokenizer([row for row in ROWS.values() if row.plain_architecture in (config.get("architectures") or [])],
                         folder)


def _by_tokenizer(rows: list[Backbone], folder: Path | None) -> Backbone | None:
    """The one of ``rows`` whose tokenizer kind is that of ``folder``'s files; the first row when they do not tell
    (no folder, no tokenizer files: the released LLaVA-1.5 layout of a LoRA run)."""
    from ...runtime.vocab import kind_of

    if len(rows) > 1 and folder is not None:
        kind = kind_of(folder)
        rows = [row for row in rows if row.tokenizer == kind] or rows
    return rows[0] if rows else None
