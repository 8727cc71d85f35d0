"""The one set of options every command that loads a model accepts, with one meaning.

``convert``, ``verify``, ``chat``, ``serve``, ``train`` and ``data tokenize`` all call
``add_load_arguments`` and read the result with ``LoadOptions.from_args``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import dtypes
from .errors import ConfigError

# the devices vlmkit places a model on; whether this machine has one is checked when a model is placed
DEVICE = re.compile(r"cpu|mps|(cuda|xpu)(:\d+)?")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model.

    Attributes:
        dtype: dtype to load or write weights in, any spelling ``vlmkit.dtypes`` knows ("float16", "fp16",
            ``torch.float16`` ...), kept as its safetensors code ("F16"); None: as stored.
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

    def __post_init__(self):  # one vocabulary and one device check for the CLI and the Python API alike
        object.__setattr__(self, "dtype", dtypes.optional_code(self.dtype))
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise ConfigError(f"device {self.device!r} is not a device vlmkit knows",
                              hint="use cpu, cuda, cuda:N, mps or xpu (--device)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoadOptions":
        config = read_json(Path(args.config), what="--config ") if getattr(args, "config", None) else None
        dtype = dtypes.optional_code(getattr(args, "dtype", None), field="--dtype")
        return cls(dtype=dtype, device=args.device or "cpu", vision_tower=args.vision_tower, model_base=args.model_base,
                   template=args.template, config=config, seed=args.seed,
                   assume_clip_defaults=getattr(args, "assume_clip_defaults", False))


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before a model is loaded onto it (imports torch).

    Raises:
        ConfigError: naming the device and what this machine has.
    """
    import torch

    kind, _, index = device.partition(":")
    if kind == "cpu":
        return
    if kind == "mps":
        available = torch.backends.mps.is_available()
        count = int(available)
    else:
        backend = getattr(torch, kind)
        available = backend.is_available()
        count = backend.device_count() if available else 0
    if not available:
        built = "" if kind != "cuda" or torch.version.cuda else f" (this torch, {torch.__version__}, is built without CUDA)"
        raise ConfigError(f"--device {device}: this machine has no {kind} device{built}",
                          hint="use --device cpu, or install the torch build for your accelerator")
    if index and int(index) >= count:
        raise ConfigError(f"--device {device}: this machine has {count} {kind} device(s), numbered from 0",
                          hint=f"use --device {kind}:0 ... {kind}:{count - 1}")


def refuse_unused(args: argparse.Namespace, command: str, unused: dict[str, str]) -> None:
    """Refuse loading options a command has no use for: a flag the user typed is never ignored.

    Args:
        unused: option name (``dtype``) -> why it does not apply and what to use instead.
    """
    for name, why in unused.items():
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} does not apply to vlmkit {command}: {why}", hint=f"remove {flag}")


def read_json(file: Path, *, what: str = "") -> dict:
    """A JSON file (a config), or a ``ConfigError`` naming it (``what`` prefixes the name, e.g. "--config ")."""
    try:
        return json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what}{file}: cannot read JSON ({e})",
                          hint="is it the right file? a truncated copy: download or copy it again") from None


def deep_merge(derived: dict, override: dict) -> dict:
    """``derived`` with ``override``'s fields on top, sub-configs merged field by field (how ``--config`` applies)."""
    out = dict(derived)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def add_load_arguments(parser: argparse.ArgumentParser, unused: dict[str, str] | None = None) -> None:
    """The loading options on ``parser``; those in ``unused`` (the command's ``refuse_unused`` table) are not
    offered by ``--help`` but still parsed, so that the command refuses them with the reason when a script passes one."""
    group = parser.add_argument_group("model loading (same meaning in every command)")

    def option(*flags, **kwargs) -> None:
        action = group.add_argument(*flags, **kwargs)
        if action.dest in (unused or {}):
            action.help = argparse.SUPPRESS

    option("--dtype", help="float32, float16 or bfloat16 (also fp16, half, bf16 ...; default: as stored)")
    option("--device", help="cpu, cuda, cuda:N or mps (default: cpu)")
    option("--vision-tower", "--vision", dest="vision_tower", metavar="PATH",
           help="the vision encoder's weights/config (LLaVA: a CLIP folder replacing mm_vision_tower; "
                "BLIP-2: the EVA ViT-g checkpoint)")
    option("--model-base", "--language-model", dest="model_base", metavar="PATH",
           help="the base language model (LLaVA: for LoRA and projector-only checkpoints; "
                "BLIP-2: the OPT / Flan-T5 folder; BLIP-2 retrieval: the bert-base-uncased folder)")
    option("--template", help="conversation template overriding the detected one")
    option("--config", metavar="JSON", help="transformers config of the target overriding derived fields")
    option("--assume-clip-defaults", action="store_true",
           help="LLaVA: when the vision tower's config cannot be found, take OpenAI CLIP's values "
                "(64-wide heads, quick_gelu, eps 1e-5, CLIP normalisation) for what no tensor shape "
                "holds; each is listed as an assumption (default: refuse)")
    option("--seed", type=int, default=0,
           help="seed for anything random: new embedding rows when converting, sampling when chatting "
                "(default: 0)")
