"""LLaVA-1.5 and LLaVA-NeXT (1.6) as the original code (haotian-liu/LLaVA) writes them.

Recognised by ``config.json`` (``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``, the
``mm_*`` fields) or by the files of its training stages (``mm_projector.bin``;
``adapter_config.json`` + ``non_lora_trainables.bin``). The pieces:

* ``backbones``   — one row per language model (LLaMA/Vicuna, Mistral, ...): everything that differs by backbone;
* ``checkpoint``  — the input forms, presented as one namespace;
* ``convert``     — the conversion rules to transformers' Llava / LlavaNext;
* ``hf_output``   — config, tokenizer, image processor and chat template of the output;
* ``reference``   — the original forward pass, for ``vlmkit verify`` and for running originals;
* ``backend``     — chat and serve: the original through ``reference``, a transformers folder through transformers;
* ``data``        — what ``vlmkit data`` needs of an original checkpoint (tokenizer, template, image features);
* ``templates``   — the original cli's template choice by model name, else the backbone's default;
* ``tiny``        — tiny random checkpoints in the real layouts (tests, demo, benchmarks).
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import form_of, open_original

NAME = "llava"
ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaQwenForCausalLM")
# transformers' own LLaVA classes: what ``--to hf`` writes, read back by chat, serve and ``--to gguf``
TRANSFORMERS_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

_ORIGINAL = ("describe", "conversion", "gguf", "verify", "chat_backend", "data_model", "training", "card_kind")
FORMS: dict[str, tuple[str, ...]] = {
    "full": _ORIGINAL,                    # a trained checkpoint: config.json with mm_* fields
    "lora": _ORIGINAL,                    # adapter_config.json + non_lora_trainables.bin (+ the base)
    "projector": _ORIGINAL,               # mm_projector.bin of a pre-training stage (+ the language model)
    "transformers": ("gguf", "chat_backend", "vllm_view", "card_kind"),
    "projector_file": ("gguf",),          # llava_surgery.py's llava.projector (+ --vision-tower): the mmproj
}

__all__ = ["NAME", "ARCHITECTURES", "FORMS", "recognise", "describe", "conversion", "open_original", "verify",
           "chat_backend", "data_model"]


def recognise(path: Path, config: dict | None) -> str | None:
    if path.is_file() and path.suffix == ".projector":
        return "projector_file"
    form = form_of(path)
    if form is not None:
        return form
    if any(a in TRANSFORMERS_ARCHITECTURES for a in (config or {}).get("architectures") or []):
        return "transformers"
    return None


def conversion(found, options: LoadOptions):
    """``--to hf``: the rule table to transformers' Llava / LlavaNext (see ``convert.py``)."""
    from .convert import conversion as plan

    return plan(found.path, options)


def verify(found, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of the original against its conversion ``converted`` (see ``parity.py``)."""
    from .parity import Probe, verify as run

    return run(found.path, converted, options, [Probe(Path(i), p) for i, p in probes], max_new_tokens=max_new_tokens)


def chat_backend(found, options: LoadOptions):
    """Chat and serve: an original checkpoint through vlmkit's reference of the original forward, a
    transformers folder through transformers (``backend.py``)."""
    from .backend import OriginalBackend, TransformersBackend

    if found.form == "transformers":
        from ...tensors import open_source

        open_source(found.path).close()  # vlmkit's readers check the weights (headers, sizes) as inspect does
        return TransformersBackend(found.path, options)
    return OriginalBackend(found.path, options)


def data_model(found, options: LoadOptions, *, max_length: int | None):
    """``vlmkit data tokenize/check --model``: tokenizer, template, length, image features (``data.py``)."""
    from .data import data_model as original

    return original(found, options, max_length=max_length)


def describe(found) -> dict:
    from .backbones import backbone_of
    from .templates import template_of

    path, config = found.path, found.config
    info = {"llava form": found.form}
    if config:
        info["llava version"] = "NeXT (anyres)" if config.get("image_aspect_ratio") == "anyres" else "1.5"
        info["vision tower"] = config.get("mm_vision_tower")
        info["template"] = template_of(path, backbone_of(config, path)) or "none known (pass --template)"
    return info
