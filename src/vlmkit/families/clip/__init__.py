"""CLIP (a transformers ``CLIPModel`` folder, e.g. ``openai/clip-vit-large-patch14-336``).

Recognised by ``config.json`` (``architectures: ["CLIPModel"]``). The folder is already in
transformers' layout, so ``--to hf`` only re-shards / re-types it; ``--to gguf`` writes one
GGUF (two-tower, ``--text-only`` or ``--vision-only``) in the key layout of llama.cpp's
legacy ``convert_image_encoder_to_gguf.py`` (see ``gguf.py``). LLaVA's mmproj reuses the
vision half of that layout.
"""

from __future__ import annotations

from pathlib import Path

from ...conversion import engine
from ...options import LoadOptions
from ...tensors import open_source

NAME = "clip"
ARCHITECTURES = ("CLIPModel",)

__all__ = ["NAME", "ARCHITECTURES", "recognise", "describe", "conversion"]


def recognise(path: Path, config: dict | None) -> bool:
    return any(a in ARCHITECTURES for a in (config or {}).get("architectures") or [])


def describe(path: Path, config: dict | None) -> dict:
    config = config or {}
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    return {"clip vision": {k: vision.get(k) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
            "clip text": {k: text.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}}


def conversion(path: Path, options: LoadOptions) -> engine.Conversion:
    """``--to hf``: the folder is already a transformers CLIP; tensors are copied (re-sharded, re-typed)."""
    return engine.identity(open_source(path))
