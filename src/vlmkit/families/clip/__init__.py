"""CLIP (a transformers ``CLIPModel`` folder, e.g. ``openai/clip-vit-large-patch14-336``).

Recognised by ``config.json`` (``architectures: ["CLIPModel"]``). The folder is already in
transformers' layout, so ``--to hf`` only re-shards / re-types it; ``--to gguf`` writes one
GGUF (two-tower, ``--text-only`` or ``--vision-only``) in the key layout of llama.cpp's
legacy ``convert_image_encoder_to_gguf.py`` (see ``gguf.py``). LLaVA's mmproj reuses the
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
    "transformers": ("describe", "conversion", "gguf", "card_kind"),
}

__all__ = ["NAME", "ARCHITECTURES", "FORMS", "recognise", "describe", "conversion"]


def recognise(path: Path, config: dict | None) -> str | None:
    return "transformers" if any(a in ARCHITECTURES for a in (config or {}).get("architectures") or []) else None


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
