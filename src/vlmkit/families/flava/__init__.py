"""FLAVA as facebookresearch/multimodal released it, with OpenAI's DALL-E dVAE as image codebook.

Recognised by its key names: a ``.pt`` state dict with ``image_encoder.module.*`` and
``mm_encoder.module.*`` (a folder holding it, or the file). The folder also holds the codebook
(``encoder.pkl``, a pickled module read without running it, or its state dict) and the text
tokenizer. The pieces:

* ``checkpoint`` — the folder's three parts presented as one namespace (codebook under ``dalle.``);
* ``convert``    — the rule table to transformers' ``FlavaForPreTraining``;
* ``hf_output``  — ``FlavaConfig`` from the shapes (``--config`` overrides) and ``FlavaProcessor``;
* ``reference``  — the original forward pass and dVAE encoder, for ``verify``;
* ``tiny``       — tiny random folders in the real layouts (tests).

Example:
    vlmkit convert flava-original/ flava-full-hf/        # flava.pt + encoder.pkl + vocab.txt
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import find_checkpoint, open_original

NAME = "flava"

FORMS: dict[str, tuple[str, ...]] = {
    "original": ("describe", "conversion", "verify"),  # flava.pt (+ encoder.pkl, vocab.txt) as released
    "transformers": ("card_kind",),  # what --to hf writes
}
TRANSFORMERS_ARCHITECTURES = ("FlavaForPreTraining",)

__all__ = ["NAME", "FORMS", "recognise", "describe", "conversion", "open_original", "verify"]


def recognise(path: Path, config: dict | None) -> str | None:
    if find_checkpoint(path) is not None:
        return "original"
    if any(a in TRANSFORMERS_ARCHITECTURES for a in (config or {}).get("architectures") or []):
        return "transformers"
    return None


def conversion(found, options: LoadOptions):
    """``--to hf``: the rule table to transformers' FlavaForPreTraining (see ``convert.py``)."""
    from .convert import conversion as plan

    return plan(found.path, options)


def describe(found) -> dict:
    from ...errors import CheckpointError, UnsafeCheckpointError
    from .checkpoint import _candidates, _state_dict_keys, open_codebook

    file = find_checkpoint(found.path)
    names = _state_dict_keys(file)
    count = lambda p: len({n.split(".")[4] for n in names if n.startswith(p + "encoder.layer.")})  # noqa: E731
    info = {"flava checkpoint": file.name,
            "encoder layers (image/text/multimodal)": (f"{count('image_encoder.module.')}/"
                                                       f"{count('text_encoder.module.')}/{count('mm_encoder.module.')}")}
    codebooks = []
    for candidate in _candidates(file.parent):
        if candidate == file:
            continue
        try:
            book, form = open_codebook(candidate)
            book.close()
            codebooks.append(f"{candidate.name} ({form})")
        except UnsafeCheckpointError:
            codebooks.append(f"{candidate.name} (refused: it pickles a class outside the dVAE's allow-list)")
        except CheckpointError:
            continue
    info["image codebook"] = ", ".join(codebooks) or "missing (put encoder.pkl beside the checkpoint)"
    return info


def verify(found, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of the original against its conversion ``converted`` (see ``parity.py``)."""
    from .parity import verify as run

    return run(found.path, converted, options, [(Path(i), p) for i, p in probes])


def card_kind(found):
    """What the model card says of a transformers FLAVA folder."""
    from ...publish.card import Kind

    return Kind("FLAVA (transformers `FlavaForPreTraining`)", "feature-extraction", "transformers", ("flava",),
                ("transformers-flava",))


# ---------------------------------------------------------------- registry walk (issue 19): tiny models and traits
# REVERSIBLE: no. --to hf drops the second copies the original stores (the encoders' embeddings twice, the heads'
# bias as decoder.bias) and the position_ids buffer. GENERATES: no: FLAVA encodes, it does not write text.
REVERSIBLE = False
GENERATES = False


def variants() -> tuple[str, ...]:
    """One tiny model: ``flava.pt`` with the pickled DALL-E codebook ``encoder.pkl``, as ``facebook/flava-full``."""
    return ("full",)


def make_tiny(folder: Path, variant: str | None = None) -> Path:
    """Build a tiny original FLAVA folder (``flava.pt``, ``encoder.pkl``, ``vocab.txt``) in ``folder``; returns it."""
    from . import tiny

    if (variant or "full") not in variants():
        raise ValueError(f"FLAVA has no tiny variant {variant!r}; variants: {', '.join(variants())}")
    return tiny.make_flava(folder / "flava-full-tiny", tiny.TinySizes())


def tiny_options(folder: Path, variant: str | None = None) -> dict:
    """The loading options ``make_tiny``'s model needs: its head counts (``--config``), which no shape holds."""
    from . import tiny

    return {"config": tiny.TinySizes().override()}
