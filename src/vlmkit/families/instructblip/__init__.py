"""InstructBLIP as Salesforce LAVIS writes it (``blip2_vicuna_instruct``, ``blip2_t5_instruct``).

Recognised by its key names: a release ``.pth`` (``{"model": state_dict}``) with ``query_tokens``,
``Qformer.bert.*`` *with* the Q-Former's word embeddings, and ``llm_proj`` (Vicuna) or ``t5_proj``
(Flan-T5) without ``Qformer.cls`` (see ``checkpoint.py`` for how it differs from plain BLIP-2).
The EVA ViT-g and the language model come apart, as in LAVIS (``--vision``, ``--language-model``),
and the Q-Former's ``bert-base-uncased`` tokenizer from a folder beside the ``.pth``; a full state
dict of the whole LAVIS model (form ``full``) holds both, and takes ``--language-model`` for the
config and the tokenizer only. The pieces:

* ``checkpoint`` — the release + its parts (or a full state dict), presented as LAVIS's one namespace;
* ``convert``    — the rule table to transformers' ``InstructBlipForConditionalGeneration``;
* ``hf_output``  — ``InstructBlipConfig``, generation config, ``InstructBlipProcessor`` (two tokenizers);
* ``reference``  — LAVIS's forward (the Q-Former reading the instruction), for ``verify`` and chat;
* ``parity``     — ``vlmkit verify``;
* ``backend``    — chat and serve (the release through the reference, or a converted folder);
* ``tiny``       — tiny random checkpoints in the real layouts (tests).

Example:
    vlmkit convert lavis/instruct_blip_vicuna7b_trimmed.pth instructblip-vicuna-7b/ \\
        --vision eva_vit_g.pth --language-model vicuna-7b-v1.1/
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import form_of

NAME = "instructblip"

# transformers' own class: what --to hf writes (and Salesforce/instructblip-* publish), read back by chat
TRANSFORMERS_ARCHITECTURES = ("InstructBlipForConditionalGeneration",)

_LAVIS = ("describe", "conversion", "verify", "chat_backend")
FORMS: dict[str, tuple[str, ...]] = {
    "parts": _LAVIS,  # release .pth + --vision + --language-model
    "full": _LAVIS,   # model.state_dict() of the whole LAVIS model (--language-model for its config and tokenizer)
    "transformers": ("chat_backend",),
}
# the contract's ``tiny(folder, variant)`` capability is ``tiny.tiny``: a function named ``tiny`` here would be
# replaced by the ``tiny`` submodule as soon as anything imports it
__all__ = ["NAME", "FORMS", "REVERSIBLE", "recognise", "describe", "conversion", "verify", "chat_backend", "variants"]


def recognise(path: Path, config: dict | None) -> str | None:
    form = form_of(path)
    if form is not None:
        return form
    if path.is_dir() and any(a in TRANSFORMERS_ARCHITECTURES for a in (config or {}).get("architectures") or []):
        return "transformers"
    return None


def describe(found) -> dict:
    from ...tensors.safe_pickle import peek_state_dict
    from ..blip2.checkpoint import QFORMER_LAYER, VISION, WORDS, lavis_file
    from .checkpoint import lm_of

    tensors = peek_state_dict(lavis_file(found.path))
    lm = lm_of(tensors)
    layers = {m.group(1) for n in tensors if (m := QFORMER_LAYER.match(n))}
    return {"instructblip form": found.form, "language model": lm.title,
            "query tokens": tensors["query_tokens"].shape[1],
            "q-former layers": len(layers), "q-former vocabulary": tensors[WORDS].shape[0],
            "visual encoder inside": any(n.startswith(VISION) for n in tensors),
            "language model inside": found.form == "full"}


def conversion(found, options: LoadOptions):
    """``--to hf``: the rule table to transformers' InstructBlipForConditionalGeneration (``convert.py``)."""
    from .convert import conversion as plan

    return plan(found.path, options)


def verify(found, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of LAVIS's forward against the converted folder (``parity.py``)."""
    from .parity import verify as run

    return run(found.path, converted, options, [(Path(i), p) for i, p in probes], max_new_tokens=max_new_tokens)


def chat_backend(found, options: LoadOptions):
    """The runtime backend (chat, serve): the release through the reference, or a transformers folder."""
    from .backend import InstructBlipBackend

    return InstructBlipBackend(found.path, options, original=found.form != "transformers")


# ---------------------------------------------------------------- registry walk (issue 19): tiny models and traits
# REVERSIBLE: no. The Vicuna embedding and lm_head gain rows LAVIS never saves ([PAD], <image>), and the language
# model's weights come from another folder than the release .pth.
REVERSIBLE = False
GENERATES = True


def variants() -> tuple[str, ...]:
    """One tiny release per language model, Vicuna (causal) and Flan-T5 (encoder-decoder), and a full state dict of
    each (``-full``)."""
    from .tiny import VARIANTS

    return VARIANTS


def make_tiny(folder: Path, variant: str | None = None) -> Path:
    """A tiny InstructBLIP in LAVIS's layout (release ``.pth`` + EVA ViT-g, or a full state dict; the language
    model's folder, bert-base-uncased's tokenizer beside the ``.pth``) in ``folder``; returns the ``.pth``."""
    from . import tiny

    return tiny.tiny(folder, variant)["release"]


def tiny_options(folder: Path, variant: str | None = None) -> dict:
    """The loading options ``make_tiny(folder, variant)``'s release needs: its EVA ViT-g, its language model and the
    head counts no tensor shape holds (``--config``)."""
    from . import tiny

    variant = variant or tiny.VARIANTS[0]
    # a full state dict holds the ViT; --language-model gives the config and tokenizer its .pth cannot hold
    vision = {} if variant.endswith("-full") else {"vision_tower": str(folder / "eva" / "eva_vit_g.pth")}
    return {**vision, "model_base": str(folder / tiny.language_model_folder(variant)), "config": tiny.SIZES.override()}
