"""CLIP (a transformers ``CLIPModel`` folder, e.g. ``openai/clip-vit-large-patch14-336``).

Recognised by ``config.json`` (``architectures: ["CLIPModel"]``). The folder is already in
transformers' layout, so ``--to hf`` only re-shards / re-types it; ``--to gguf`` writes one
GGUF (two-tower, ``--text-only`` or ``--vision-only``) in the key layout of llama.cpp's
legacy ``convert_image_encoder_to_gguf.py`` (see ``gguf_export.py``). LLaVA's mmproj reuses the
vision half of that layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ... import dtypes
from ...conversion import engine
from ...options import LoadOptions
from ...tensors import open_source

NAME = "clip"
ARCHITECTURES = ("CLIPModel",)

FORMS: dict[str, tuple[str, ...]] = {
    "transformers": ("describe", "conversion", "gguf", "verify", "card_kind"),
    "gguf": ("card_kind",),  # what --to gguf writes: one GGUF in llama.cpp's CLIP layout
}

__all__ = ["NAME", "ARCHITECTURES", "FORMS", "recognise", "describe", "conversion", "gguf", "verify", "card_kind"]


def recognise(path: Path, config: dict | None) -> str | None:
    if any(a in ARCHITECTURES for a in (config or {}).get("architectures") or []):
        return "transformers"
    return "gguf" if _is_gguf(path) else None


def _is_gguf(path: Path) -> bool:
    """A GGUF folder of CLIP files without a LLaVA projector (what ``--to gguf`` writes for a CLIPModel)."""
    from ...conversion import gguf_folder

    keys = ("general.architecture", "clip.has_llava_projector")
    headers = [gguf_folder.header(f, *keys) for f in gguf_folder.files(path)] if path.is_dir() else []
    return bool(headers) and all(h.get(keys[0]) == "clip" and not h.get(keys[1]) for h in headers)


def describe(found) -> dict:
    config = found.config or {}
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    return {"clip vision": {k: vision.get(k) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
            "clip text": {k: text.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}}


# the non-tensor files of a transformers CLIP folder (openai/clip-vit-*): without them the output is no model
SIDE_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "special_tokens_map.json")


def conversion(found, options: LoadOptions) -> engine.Conversion:
    """``--to hf``: the folder is already a transformers CLIP; tensors are copied (re-sharded, re-typed) with its
    config, preprocessor and tokenizer files."""
    path = found.path
    folder = path if path.is_dir() else path.parent

    def write_extras(out: Path) -> None:
        for name in SIDE_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
        if options.dtype and (out / "config.json").is_file():  # the dtype the weights now have
            config = json.loads((out / "config.json").read_text())
            config["torch_dtype"] = dtypes.config_name(options.dtype)
            (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    identity = engine.identity(open_source(path))
    identity.write_extras = write_extras
    identity.summary = "CLIP (transformers CLIPModel): tensors copied, with the config, preprocessor and tokenizer"
    return identity


def gguf(found, options: LoadOptions, gguf_options):
    """``--to gguf``: one GGUF in llama.cpp's legacy CLIP layout (see ``gguf_export.py``)."""
    from .gguf_export import conversion as plan

    return plan(found.path, options, gguf_options)


def verify(found, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """The GGUF that ``--to gguf`` wrote, read back against this folder (``gguf_parity.py``). ``--to hf`` only
    copies the tensors: ``vlmkit verify-files`` checks that copy."""
    from ...conversion.gguf_folder import is_gguf_folder
    from ...errors import ConfigError

    if not is_gguf_folder(converted):
        raise ConfigError(f"{converted}: vlmkit verifies a CLIP conversion to GGUF (a folder from `vlmkit convert "
                          f"{found.path.name} OUT --to gguf`); --to hf copies the tensors unchanged",
                          hint=f"vlmkit verify-files {converted}")
    from .gguf_parity import verify as run

    return run(found.path, Path(converted), options, probes, max_new_tokens=max_new_tokens)


def card_kind(found):
    """What the model card says of a CLIP folder, or of the GGUF --to gguf wrote."""
    from ...publish.card import Kind

    if found.form == "gguf":
        return Kind("CLIP as GGUF (llama.cpp's CLIP layout)", "feature-extraction", "gguf", ("clip", "gguf"), ())
    return Kind("CLIP (transformers `CLIPModel`)", "zero-shot-image-classification", "transformers", ("clip",),
                ("transformers-clip",))


# ---------------------------------------------------------------- registry walk (issue 19): tiny models and traits
REVERSIBLE = True  # --to hf copies every tensor under its own name
GENERATES = False  # CLIP embeds images and texts; it writes no text


def variants() -> tuple[str, ...]:
    """One tiny model: a two-tower ``CLIPModel`` folder as ``openai/clip-vit-large-patch14-336`` ships it."""
    return ("vit",)


def make_tiny(folder: Path, variant: str | None = None) -> Path:
    """A tiny CLIP folder in ``folder``; returns it (``llava.tiny`` makes it: the tower of LLaVA's tiny models)."""
    from ..llava import tiny

    if (variant or "vit") not in variants():
        raise ValueError(f"CLIP has no tiny variant {variant!r}; variants: {', '.join(variants())}")
    return tiny.make_clip(folder / "clip-vit-tiny-patch14")


def tiny_options(folder: Path, variant: str | None = None) -> dict:
    """A CLIP folder needs no loading options."""
    return {}
