"""LLaVA-1.5 and LLaVA-NeXT (1.6) as the original code (haotian-liu/LLaVA) writes them.

Recognised by ``config.json`` (``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``, the
``mm_*`` fields) or by the files of its training stages (``mm_projector.bin``;
``adapter_config.json`` + ``non_lora_trainables.bin``). The pieces:

* ``checkpoint``  — the input forms, presented as one namespace;
* ``convert``     — the conversion rules to transformers' Llava / LlavaNext;
* ``hf_output``   — config, tokenizer, image processor and chat template of the output;
* ``reference``   — the original forward pass, for ``vlmkit verify`` and for running originals;
* ``image_path``  — tower, projector, anyres and splice: the one image path of the reference and training;
* ``train_model`` — the model ``vlmkit train`` trains and its start (+ ``train_outputs``, ``train_merge``);
* ``tiny``        — tiny random checkpoints in the real layouts (tests, demo, benchmarks).
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import form_of, is_plain_llm, open_original

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
    "plain_llm": ("training",),           # a Vicuna / Mistral folder: `vlmkit train --vision-tower` makes a LLaVA of it
}

__all__ = ["NAME", "ARCHITECTURES", "FORMS", "recognise", "describe", "conversion", "open_original", "verify",
           "training"]


def recognise(path: Path, config: dict | None) -> str | None:
    if path.is_file() and path.suffix == ".projector":
        return "projector_file"
    form = form_of(path)
    if form is not None:
        return form
    if any(a in TRANSFORMERS_ARCHITECTURES for a in (config or {}).get("architectures") or []):
        return "transformers"
    if path.is_dir() and is_plain_llm(config):
        return "plain_llm"
    return None


def conversion(found, options: LoadOptions):
    """``--to hf``: the rule table to transformers' Llava / LlavaNext (see ``convert.py``)."""
    from .convert import conversion as plan

    return plan(found.path, options)


def verify(found, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of the original against its conversion ``converted`` (see ``parity.py``)."""
    from .parity import Probe, verify as run

    return run(found.path, converted, options, [Probe(Path(i), p) for i, p in probes], max_new_tokens=max_new_tokens)


def training(found, options: LoadOptions, config=None):
    """``vlmkit train`` / ``merge-lora``: the composition of a LLaVA to train from ``found`` (see ``train_model.py``).

    Args:
        config: the run (``vlmkit.train.TrainConfig``); None for ``merge-lora``.
    """
    # not a module named training.py: importing it would replace this function on the package
    from .train_model import Composition

    return Composition(found, options, config)


def describe(found) -> dict:
    from ...runtime.templates import choose_template, get_model_name_from_path

    path, config = found.path, found.config
    info = {"llava form": found.form}
    if config:
        info["llava version"] = "NeXT (anyres)" if config.get("image_aspect_ratio") == "anyres" else "1.5"
        info["vision tower"] = config.get("mm_vision_tower")
        chosen = choose_template(get_model_name_from_path(str(path)))
        if chosen == "llava_v0":  # the original's fallback fits no released 1.5/1.6 model (see hf_output)
            chosen = "mistral_instruct" if "mistral" in str(config.get("model_type")) else "llava_v1"
        info["template"] = chosen
    return info
