"""The one set of options every command that loads a model accepts, with one meaning.

``convert``, ``verify``, ``chat``, ``serve``, ``train`` and ``data tokenize`` all call
``add_load_arguments`` and read the result with ``LoadOptions.from_args``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .tensors import dtype_code


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model.

    Attributes:
        dtype: safetensors dtype code to load or write weights in (None: as stored).
        device: torch device for running ("cpu", "cuda", "cuda:1", "mps").
        vision_tower: the vision encoder's weights (``--vision-tower`` / ``--vision``): LLaVA's CLIP
            folder replacing ``mm_vision_tower``, BLIP-2's EVA ViT-g checkpoint.
        model_base: the base language model (``--model-base`` / ``--language-model``): the LLM of
            LLaVA LoRA and projector-only checkpoints, BLIP-2's OPT / Flan-T5 folder.
        template: a conversation template name overriding the detected one.
        config: a transformers config (JSON) of the target overriding derived fields.
        seed: seed for anything random (new embedding rows when converting, sampling when chatting).
        assume_clip_defaults: allow OpenAI CLIP's values for what no file states (LLaVA: a tower config that
            cannot be found); every value taken so is listed as an assumption (plan, manifest, parity report).
    """

    dtype: str | None = None
    device: str = "cpu"
    vision_tower: str | None = None
    model_base: str | None = None
    template: str | None = None
    config: dict | None = None
    seed: int = 0
    assume_clip_defaults: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoadOptions":
        config = None
        if getattr(args, "config", None):
            path = Path(args.config)
            try:
                config = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"--config {path}: cannot read a JSON config ({e})") from None
        dtype = None
        if getattr(args, "dtype", None):
            try:
                dtype = dtype_code(args.dtype)
            except ValueError as e:
                raise ConfigError(f"--dtype: {e}") from None
        return cls(dtype=dtype, device=args.device, vision_tower=args.vision_tower, model_base=args.model_base,
                   template=args.template, config=config, seed=args.seed,
                   assume_clip_defaults=getattr(args, "assume_clip_defaults", False))


def deep_merge(derived: dict, override: dict) -> dict:
    """``derived`` with ``override``'s fields on top, sub-configs merged field by field (how ``--config`` applies)."""
    out = dict(derived)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model loading (same meaning in every command)")
    group.add_argument("--dtype", help="float32, float16 or bfloat16 (default: as stored)")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    group.add_argument("--vision-tower", "--vision", dest="vision_tower", metavar="PATH",
                       help="the vision encoder's weights/config (LLaVA: a CLIP folder replacing mm_vision_tower; "
                            "BLIP-2: the EVA ViT-g checkpoint)")
    group.add_argument("--model-base", "--language-model", dest="model_base", metavar="PATH",
                       help="the base language model (LLaVA: for LoRA and projector-only checkpoints; "
                            "BLIP-2: the OPT / Flan-T5 folder)")
    group.add_argument("--template", help="conversation template overriding the detected one")
    group.add_argument("--config", metavar="JSON", help="transformers config of the target overriding derived fields")
    group.add_argument("--assume-clip-defaults", action="store_true",
                       help="LLaVA: when the vision tower's config cannot be found, take OpenAI CLIP's values "
                            "(64-wide heads, quick_gelu, eps 1e-5, CLIP normalisation) for what no tensor shape "
                            "holds; each is listed as an assumption (default: refuse)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed for anything random: new embedding rows when converting, sampling when chatting "
                            "(default: 0)")
