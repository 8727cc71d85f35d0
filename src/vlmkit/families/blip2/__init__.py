"""BLIP-2 with OPT or Flan-T5, as Salesforce LAVIS writes it (``blip2_opt``, ``blip2_t5``).

Recognised by its key names: a ``.pth`` (``{"model": state_dict}`` or a bare state dict) with
``query_tokens``, ``Qformer.bert.*`` and ``opt_proj`` / ``t5_proj``. Covers the released
``pretrain_opt2.7b/6.7b``, ``caption_coco_opt2.7b/6.7b``, ``pretrain_flant5xl/xxl`` and
``caption_coco_flant5xl`` models. The pieces:

* ``language_models`` — one row per language model (OPT, Flan-T5): everything that differs between them;
* ``checkpoint`` — the input forms (full state dict; release ``.pth`` + ``--vision`` EVA ViT-g +
  ``--language-model`` OPT/T5 folder), presented as LAVIS's one namespace;
* ``convert``    — the rule table to transformers' ``Blip2ForConditionalGeneration``;
* ``hf_output``  — ``Blip2Config``, generation config and ``Blip2Processor`` of the output;
* ``reference``  — LAVIS's forward pass (EVA ViT-g, Q-Former, projection, LM), for ``verify``;
* ``backend``    — the chat backend (the LAVIS checkpoint, or a transformers ``Blip2`` folder: form "transformers");
* ``tiny``       — tiny random checkpoints in the real layouts (tests, benchmarks).

Example:
    vlmkit convert blip2_pretrained_opt2.7b.pth blip2-opt-2.7b/ --vision eva_vit_g.pth --language-model opt-2.7b/
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import form_of, open_original

NAME = "blip2"

# transformers' own BLIP-2 class: what ``--to hf`` writes (and Salesforce/blip2-* publish), read back by chat and serve
TRANSFORMERS_ARCHITECTURES = ("Blip2ForConditionalGeneration",)

_LAVIS = ("describe", "conversion", "verify", "chat_backend")
FORMS: dict[str, tuple[str, ...]] = {
    "full": _LAVIS,    # one LAVIS .pth with the vision encoder and the language model inside
    "parts": _LAVIS,   # a release .pth + --vision EVA ViT-g + --language-model folder
    "transformers": ("chat_backend", "card_kind"),
}

__all__ = ["NAME", "FORMS", "recognise", "describe", "conversion", "open_original", "verify", "chat_backend"]


def recognise(path: Path, config: dict | None) -> str | None:
    form = form_of(path)
    if form is not None:
        return form
    if any(a in TRANSFORMERS_ARCHITECTURES for a in (config or {}).get("architectures") or []):
        return "transformers"
    return None


def conversion(found, options: LoadOptions):
    """``--to hf``: the rule table to transformers' Blip2ForConditionalGeneration (see ``convert.py``)."""
    from .convert import conversion as plan

    return plan(found.path, options)


def describe(found) -> dict:
    from ...tensors.safe_pickle import peek_state_dict
    from .checkpoint import lavis_file, lm_kind

    path = found.path
    tensors = peek_state_dict(lavis_file(path))
    kind = lm_kind(tensors)
    layers = {n.split(".")[4] for n in tensors if n.startswith("Qformer.bert.encoder.layer.")}
    return {"blip2 form": form_of(path), "language model": kind.title,
            "query tokens": tensors["query_tokens"].shape[1], "q-former layers": len(layers),
            "visual encoder inside": any(n.startswith("visual_encoder.") for n in tensors),
            "language model inside": any(n.startswith(kind.original_prefix) for n in tensors)}


def verify(found, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of the original against its conversion ``converted`` (see ``parity.py``)."""
    from .parity import verify as run

    return run(found.path, converted, options, [(Path(i), p) for i, p in probes], max_new_tokens=max_new_tokens)


def chat_backend(found, options: LoadOptions):
    """The runtime backend (chat, serve): the LAVIS checkpoint through the reference, or the transformers folder."""
    from .backend import Blip2Backend

    if found.form == "transformers":
        from ...tensors import open_source

        open_source(found.path).close()  # vlmkit's readers check the weights (headers, sizes) as inspect and convert do
    return Blip2Backend(found.path, options, original=found.form != "transformers")


def card_kind(found):
    """What the model card says of a transformers BLIP-2 folder: its language model's row (OPT, Flan-T5)."""
    from ...publish.card import Kind
    from .language_models import of_transformers

    config = found.config or {}
    # the flag transformers' Blip2Config writes (True for OPT, False for Flan-T5), else the text model's type
    row = of_transformers(config.get("use_decoder_only_language_model",
                                     (config.get("text_config") or {}).get("model_type") != "t5"))
    # vLLM has no encoder-decoder language model for BLIP-2 (its Blip2 runs OPT only): `vllm serve` for causal rows
    return Kind(f"BLIP-2 with {row.title} (transformers `Blip2ForConditionalGeneration`)", "image-text-to-text",
                "transformers", ("blip-2", *(() if row.causal else (row.name,)), "image-text-to-text"),
                ("transformers-blip2", "vlmkit-chat", *(("vllm",) if row.causal else ())), prompt=row.prompt[1])


# ---------------------------------------------------------------- registry walk (issue 19): tiny models and traits
# REVERSIBLE: no. --to hf drops the Q-Former parts Blip2OPT/Blip2T5 never use (word/position embeddings, the cls
# head, the text feed-forward) and the language model's tied copies (OPT's lm_head, T5's embed_tokens).
REVERSIBLE = False
GENERATES = True


def variants() -> tuple[str, ...]:
    """One tiny model per language-model row (``language_models.ROWS``): a new row is walked by the registry test."""
    from .language_models import ROWS

    return tuple(ROWS)


def make_tiny(folder: Path, variant: str | None = None) -> Path:
    """Build a tiny BLIP-2 as LAVIS releases it, in ``folder``: the release ``.pth`` (Q-Former and projection) under
    ``lavis/``, ``eva/eva_vit_g.pth`` and the language model's folder; returns the release ``.pth``."""
    from . import tiny

    lm = variant or variants()[0]
    if lm not in variants():
        raise ValueError(f"BLIP-2 has no tiny variant {lm!r}; variants: {', '.join(variants())}")
    sizes = tiny.TinySizes()
    tiny.make_eva_vit(folder / "eva" / "eva_vit_g.pth", sizes)
    tiny.make_language_model(folder / f"{lm}-tiny", lm, sizes)
    return tiny.make_release(folder / "lavis" / f"blip2_pretrained_{lm}.pth", lm, sizes)


def tiny_options(folder: Path, variant: str | None = None) -> dict:
    """The loading options (``LoadOptions`` keywords) ``make_tiny(folder, variant)``'s model needs: the EVA ViT-g
    and language-model parts beside it, and the head counts no tensor shape holds (``--config``)."""
    from . import tiny

    lm = variant or variants()[0]
    return {"vision_tower": str(folder / "eva" / "eva_vit_g.pth"), "model_base": str(folder / f"{lm}-tiny"),
            "config": tiny.TinySizes().override()}
