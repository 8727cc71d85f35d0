"""BLIP-2 retrieval: LAVIS's stage-1 Q-Former model (``blip2``, ``blip2_image_text_matching``,
``blip2_feature_extractor``) with its ITM and ITC heads.

Recognised by its key names: a ``.pth`` with ``query_tokens``, ``Qformer.bert.*`` with word
embeddings, ``vision_proj``, ``text_proj`` and ``itm_head``, and no projection into a language
model (that is the ``blip2`` family). Covers ``blip2_pretrained.pth`` (with ``--vision
eva_vit_g.pth``), ``blip2_finetune_coco.pth`` and users' fine-tunes of either; and transformers
``Blip2ForImageTextRetrieval`` folders (form ``transformers``), which ``vlmkit score`` and ``vlmkit serve`` run.
The pieces:

* ``checkpoint`` — the input forms, presented as LAVIS's one namespace;
* ``convert``    — the rule table to ``Blip2ForImageTextRetrieval`` (the ``blip2`` family's ViT and
  Q-Former rows, imported, and the retrieval model's own);
* ``hf_output``  — ``Blip2Config`` and ``Blip2Processor`` of the output;
* ``reference``  — LAVIS's ITM / ITC forward, for ``verify`` and for scoring an original checkpoint;
* ``scoring``    — ``vlmkit score`` and ``/v1/score``: image x texts -> ITM probability and ITC similarity;
* ``tiny``       — tiny random checkpoints in the real layouts (tests).

Example:
    vlmkit convert blip2_pretrained.pth blip2-itm-vit-g/ --vision eva_vit_g.pth --language-model bert-base-uncased/
    vlmkit score cat.png "a cat on a sofa" "a rocket" blip2-itm-vit-g/
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import form_of

NAME = "blip2_retrieval"
REVERSIBLE = True  # renames and the q/v bias fusion, which splits back

_LAVIS = ("describe", "conversion", "verify", "score")
FORMS: dict[str, tuple[str, ...]] = {
    "full": _LAVIS,    # the ViT inside (blip2_finetune_coco.pth, original_model.state_dict())
    "parts": _LAVIS,   # blip2_pretrained.pth + --vision eva_vit_g.pth
    "transformers": ("describe", "score", "card_kind"),  # a Blip2ForImageTextRetrieval folder
}
ARCHITECTURES = ("Blip2ForImageTextRetrieval",)

__all__ = ["NAME", "FORMS", "recognise", "describe", "conversion", "verify", "score", "card_kind"]


def recognise(path: Path, config: dict | None) -> str | None:
    if any(a in ARCHITECTURES for a in (config or {}).get("architectures") or []):
        return "transformers"
    return form_of(path)


def describe(found) -> dict:
    if found.form == "transformers":
        config = found.config or {}
        qformer = config.get("qformer_config") or {}
        return {"blip2 retrieval form": "transformers", "query tokens": config.get("num_query_tokens"),
                "q-former layers": qformer.get("num_hidden_layers"),
                "image size": (config.get("vision_config") or {}).get("image_size"),
                "embedding width": config.get("image_text_hidden_size")}
    from ...tensors.safe_pickle import peek_state_dict
    from ..blip2.checkpoint import lavis_file

    tensors = peek_state_dict(lavis_file(found.path))
    layers = {n.split(".")[4] for n in tensors if n.startswith("Qformer.bert.encoder.layer.")}
    return {"blip2 retrieval form": found.form, "query tokens": tensors["query_tokens"].shape[1],
            "q-former layers": len(layers), "embedding width": tensors["vision_proj.weight"].shape[0],
            "visual encoder inside": found.form == "full"}


def conversion(found, options: LoadOptions):
    """``--to hf``: the rule table to transformers' Blip2ForImageTextRetrieval (see ``convert.py``)."""
    from .convert import conversion as plan

    return plan(found.path, options)


def verify(found, converted: Path, options: LoadOptions, probes, **_):
    """Parity report of the original against its conversion ``converted`` (see ``parity.py``)."""
    from .parity import verify as run

    return run(found.path, converted, options, [(Path(i), t) for i, t in probes])


def card_kind(found):
    """What the model card says of a transformers Blip2ForImageTextRetrieval folder."""
    from ...publish.card import Kind

    return Kind("BLIP-2 image-text matching and retrieval (transformers `Blip2ForImageTextRetrieval`)", None,
                "transformers", ("blip-2", "image-text-matching"), ("transformers-blip2-itm", "vlmkit-score"))


def score(found, options: LoadOptions):
    """The loaded model, a ``runtime.scoring.Scorer``: image x texts -> ITM and ITC (``vlmkit score``,
    ``vlmkit serve``'s ``/v1/score``; see ``scoring.py``)."""
    from .scoring import scorer

    return scorer(found, options)


# ---------------------------------------------------------------- registry walk (issue 19): tiny models and traits
# REVERSIBLE: no. --to hf drops the captioning head (Qformer.cls.*) and the ITC temperature (temp).
REVERSIBLE = False
GENERATES = False  # it scores image-text pairs (vlmkit score); it writes no text


def variants() -> tuple[str, ...]:
    """LAVIS's two stage-1 releases: ``pretrained`` (blip2_pretrained.pth, the ViT given apart) and ``coco`` (the COCO
    retrieval fine-tune, its ViT inside)."""
    return ("pretrained", "coco")


def make_tiny(folder: Path, variant: str | None = None) -> Path:
    """A tiny stage-1 checkpoint in LAVIS's layout in ``folder`` (with bert-base-uncased's tokenizer and, for
    ``pretrained``, the EVA ViT-g beside it); returns the ``.pth``."""
    from . import tiny

    variant = variant or variants()[0]
    if variant not in variants():
        raise ValueError(f"BLIP-2 retrieval has no tiny variant {variant!r}; variants: {', '.join(variants())}")
    vocab = tiny.make_tokenizer(folder / "bert-base-uncased")
    if variant == "coco":
        return tiny.make_finetuned(folder / "coco" / "blip2_finetune_coco.pth", vocab)
    tiny.make_eva_vit(folder / "eva" / "eva_vit_g.pth")
    return tiny.make_pretrained(folder / "lavis" / "blip2_pretrained.pth", vocab)


def tiny_options(folder: Path, variant: str | None = None) -> dict:
    """The loading options ``make_tiny(folder, variant)``'s checkpoint needs: bert-base-uncased's tokenizer
    (``--language-model``), the EVA ViT-g when it is not inside, the head counts no shape holds (``--config``)."""
    from . import tiny

    vision = {} if variant == "coco" else {"vision_tower": str(folder / "eva" / "eva_vit_g.pth")}
    return {**vision, "model_base": str(folder / "bert-base-uncased"), "config": tiny.TinySizes().override()}
