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
        vision_tower: a CLIP folder or hub id replacing the checkpoint's ``mm_vision_tower``.
        model_base: the base LLM folder for LoRA and projector-only checkpoints.
        template: a conversation template name overriding the detected one.
        config: a transformers config (JSON) of the target overriding derived fields.
        seed: seed for anything random in a conversion (new embedding rows).
    """

    dtype: str | None = None
    device: str = "cpu"
    vision_tower: str | None = None
    model_base: str | None = None
    template: str | None = None
    config: dict | None = None
    seed: int = 0

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
                   template=args.template, config=config, seed=args.seed)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model loading (same meaning in every command)")
    group.add_argument("--dtype", help="float32, float16 or bfloat16 (default: as stored)")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    group.add_argument("--vision-tower", metavar="PATH", help="CLIP folder or hub id replacing mm_vision_tower")
    group.add_argument("--model-base", metavar="PATH", help="base LLM for LoRA and projector-only checkpoints")
    group.add_argument("--template", help="conversation template overriding the detected one")
    group.add_argument("--config", metavar="JSON", help="transformers config of the target overriding derived fields")
    group.add_argument("--seed", type=int, default=0, help="seed for new embedding rows (default: 0)")
