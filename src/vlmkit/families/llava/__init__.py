"""LLaVA-1.5 and LLaVA-NeXT (1.6) as the original code (haotian-liu/LLaVA) writes them.

Recognised by ``config.json`` (``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``, the
``mm_*`` fields) or by the files of its training stages (``mm_projector.bin``;
``adapter_config.json`` + ``non_lora_trainables.bin``). The pieces:

* ``checkpoint``  — the input forms, presented as one namespace;
* ``convert``     — the conversion rules to transformers' Llava / LlavaNext;
* ``hf_output``   — config, tokenizer, image processor and chat template of the output;
* ``reference``   — the original forward pass, for ``vlmkit verify`` and for running originals;
* ``tiny``        — tiny random checkpoints in the real layouts (tests, demo, benchmarks).
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import form_of, open_original
from .convert import conversion

NAME = "llava"
ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaQwenForCausalLM")

__all__ = ["NAME", "ARCHITECTURES", "recognise", "describe", "conversion", "open_original", "verify"]


def verify(original: Path, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of ``original`` against its conversion ``converted`` (see ``parity.py``)."""
    from .parity import Probe, verify as run

    return run(original, converted, options, [Probe(Path(i), p) for i, p in probes], max_new_tokens=max_new_tokens)


def recognise(path: Path, config: dict | None) -> bool:
    return form_of(path) is not None


def describe(path: Path, config: dict | None) -> dict:
    from .backbones import backbone_of
    from .templates import template_of

    form = form_of(path)
    info = {"llava form": form}
    if config:
        info["llava version"] = "NeXT (anyres)" if config.get("image_aspect_ratio") == "anyres" else "1.5"
        info["vision tower"] = config.get("mm_vision_tower")
        info["template"] = template_of(path, backbone_of(config, path)) or "none known (pass --template)"
    return info
