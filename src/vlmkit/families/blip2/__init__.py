"""BLIP-2 with OPT or Flan-T5, as Salesforce LAVIS writes it (``blip2_opt``, ``blip2_t5``).

Recognised by its key names: a ``.pth`` (``{"model": state_dict}`` or a bare state dict) with
``query_tokens``, ``Qformer.bert.*`` and ``opt_proj`` / ``t5_proj``. Covers the released
``pretrain_opt2.7b/6.7b``, ``caption_coco_opt2.7b/6.7b``, ``pretrain_flant5xl/xxl`` and
``caption_coco_flant5xl`` models. The pieces:

* ``checkpoint`` — the input forms (full state dict; release ``.pth`` + ``--vision`` EVA ViT-g +
  ``--language-model`` OPT/T5 folder), presented as LAVIS's one namespace;
* ``convert``    — the rule table to transformers' ``Blip2ForConditionalGeneration``;
* ``hf_output``  — ``Blip2Config``, generation config and ``Blip2Processor`` of the output;
* ``reference``  — LAVIS's forward pass (EVA ViT-g, Q-Former, projection, LM), for ``verify``;
* ``tiny``       — tiny random checkpoints in the real layouts (tests, benchmarks).

Example:
    vlmkit convert blip2_pretrained_opt2.7b.pth blip2-opt-2.7b/ --vision eva_vit_g.pth --language-model opt-2.7b/
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import form_of, open_original

NAME = "blip2"

_LAVIS = ("describe", "conversion", "verify", "chat_backend")
FORMS: dict[str, tuple[str, ...]] = {
    "full": _LAVIS,    # one LAVIS .pth with the vision encoder and the language model inside
    "parts": _LAVIS,   # a release .pth + --vision EVA ViT-g + --language-model folder
}

__all__ = ["NAME", "FORMS", "recognise", "describe", "conversion", "open_original", "verify"]


def recognise(path: Path, config: dict | None) -> str | None:
    return form_of(path)


def conversion(found, options: LoadOptions):
    """``--to hf``: the rule table to transformers' Blip2ForConditionalGeneration (see ``convert.py``)."""
    from .convert import conversion as plan

    return plan(found.path, options)


def describe(found) -> dict:
    from ...tensors.safe_pickle import peek_state_dict
    from .checkpoint import _lavis_file, lm_kind

    path = found.path
    tensors = peek_state_dict(_lavis_file(path))
    kind = lm_kind(tensors)
    layers = {n.split(".")[4] for n in tensors if n.startswith("Qformer.bert.encoder.layer.")}
    return {"blip2 form": form_of(path), "language model": {"opt": "OPT", "t5": "Flan-T5"}[kind],
            "query tokens": tensors["query_tokens"].shape[1], "q-former layers": len(layers),
            "visual encoder inside": any(n.startswith("visual_encoder.") for n in tensors),
            "language model inside": any(n.startswith(f"{kind}_model.") for n in tensors)}


def verify(found, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of the original against its conversion ``converted`` (see ``parity.py``)."""
    from .parity import verify as run

    return run(found.path, converted, options, [(Path(i), p) for i, p in probes], max_new_tokens=max_new_tokens)
