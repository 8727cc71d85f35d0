"""The files a finished run leaves, as LLaVA's ``train.py`` writes them, so every consumer loads them.

==========  ==========================================================================================
stage 1     ``mm_projector.bin`` (``{"model.mm_projector.0.weight": ...}``, the keys of
            ``get_mm_adapter_state_maybe_zero_3``) + ``config.json``; LLaVA's ``--pretrain_mm_mlp_adapter``,
            ``vlmkit train --init-projector`` and ``vlmkit convert --model-base`` read it
LoRA        ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's ``save_pretrained``),
            ``non_lora_trainables.bin`` (every trained non-LoRA parameter under its peft name,
            ``base_model.model.model.mm_projector.0.weight``) + ``config.json``: what
            ``load_pretrained_model(model_path, model_base)`` reads
full        an original full checkpoint: ``config.json``, ``model-0000i-of-0000n.safetensors`` (the
            vision tower left in its CLIP folder unless it was trained), tokenizer, generation config
==========  ==========================================================================================

Every run also writes ``vlmkit-train.json``: the options, the base the weights were trained on and
its fingerprint (``merge-lora`` refuses another base), and the final loss. Under ZeRO-3 each
parameter is gathered (``GatheredParameters``) on every process and written by the first.
Files go into a temporary folder and are moved into the run folder at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ... import __version__
from ...tensors import TensorSource
from ...train.config import TrainConfig
from ...train.model import gathered
from .checkpoint import TOWER, OriginalCheckpoint

RECORD = "vlmkit-train.json"
FINGERPRINT_MATRIX = "model.layers.0.self_attn.q_proj.weight"
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "added_tokens.json", "generation_config.json")


def base_fingerprint(source: TensorSource) -> str:
    """What identifies a language model: its tensor names and shapes, and the contents of a few tensors.

    Two fine-tunes of one architecture have the same names and shapes, but not the same norm weights
    nor the same first query projection; reading those is cheap (one matrix and a few KB per layer).
    """
    digest = hashlib.sha256()
    for name in sorted(n for n in source.keys() if n.startswith(LLM_PREFIXES)):
        digest.update(f"{name}|{list(source.info(name).shape)}\n".encode())
        if name.endswith("norm.weight") or name == FINGERPRINT_MATRIX:
            digest.update(source.read(name).float().numpy().tobytes())
    return digest.hexdigest()[:32]


def trained_base(ckpt: OriginalCheckpoint, start: Path, model_base: str | None) -> str:
    """The folder whose language model the run starts from (what ``--model-base`` must be for the outputs)."""
    return str(model_base) if ckpt.form in ("projector",) and model_base else str(start)


def llava_config(ckpt: OriginalCheckpoint, config: TrainConfig, max_length: int, base: str) -> dict:
    """``config.json`` as ``train.py`` leaves it on the model: the start's config + the training fields."""
    out = dict(ckpt.config)
    out.update({
        "_name_or_path": base, "tune_mm_mlp_adapter": config.stage == "pretrain", "freeze_mm_mlp_adapter": False,
        "mm_projector_lr": config.projector_lr, "tokenizer_model_max_length": max_length,
        "tokenizer_padding_side": "right", "image_aspect_ratio": ckpt.config.get("image_aspect_ratio", "pad"),
        "unfreeze_mm_vision_tower": config.train_vision, "use_cache": True, "torch_dtype": "float32",
    })
    return out


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def _staged(run_dir: Path):
    """A temporary folder whose files are moved into ``run_dir`` at the end (by the first process)."""
    tmp = run_dir / ".vlmkit-outputs"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _is_main():
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == RECORD):  # the record last: it marks completion
            os.replace(f, run_dir / f.name)
        tmp.rmdir()


def write(model: nn.Module, ckpt: OriginalCheckpoint, config: TrainConfig, run_dir: Path, *, max_length: int,
          base: str, fingerprint: str, summary: dict) -> list[str]:
    """Write the outputs of the run's stage into ``run_dir``; returns the file names."""
    llava = llava_config(ckpt, config, max_length, base)
    main = _is_main()
    with _staged(run_dir) as tmp:
        if config.stage == "pretrain":
            _projector(model, tmp, main)
        elif config.lora:
            _lora(model, tmp, main, base)
        else:
            _full(model, ckpt, tmp, main, config.train_vision)
        if main:
            (tmp / "config.json").write_text(json.dumps(llava, indent=2) + "\n")
            record = {"vlmkit_version": __version__, "stage": config.stage, "lora": config.lora,
                      "base": base, "base_fingerprint": fingerprint, "start": str(config.model),
                      "options": config.to_dict(), **summary}
            (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
            names = sorted(p.name for p in tmp.iterdir())
        else:
            names = []
    return names


def _projector(model: nn.Module, tmp: Path, main: bool) -> None:
    params = [(n, p) for n, p in model.named_parameters() if "mm_projector" in n]
    state = {_llava_name(n): t for n, t in gathered(params)}
    if main:
        torch.save(state, tmp / "mm_projector.bin")


def _llava_name(name: str) -> str:
    """The name without peft's ``base_model.model.`` (stage 1 never wraps, but be exact)."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _lora(model: nn.Module, tmp: Path, main: bool, base: str) -> None:
    named = list(model.named_parameters())
    lora = dict(gathered([(n, p) for n, p in named if "lora_" in n]))
    non_lora = dict(gathered([(n, p) for n, p in named if "lora_" not in n and p.requires_grad]))
    if not main:
        return
    # peft's own file names and config; the state dict keys drop the adapter name as peft saves them
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(tmp, state_dict={n.replace(".default", ""): t for n, t in lora.items()},
                          safe_serialization=True, save_embedding_layers=False)
    torch.save(non_lora, tmp / "non_lora_trainables.bin")
    for extra in ("README.md",):  # peft's model card: a template with nothing in it
        (tmp / extra).unlink(missing_ok=True)


def _full(model: nn.Module, ckpt: OriginalCheckpoint, tmp: Path, main: bool, train_vision: bool) -> None:
    from ...tensors.base import TORCH_TO_CODE
    from ...tensors.safetensors_io import SafetensorsWriter, TensorSpec, layout_shards

    params = [(n, p) for n, p in model.named_parameters() if train_vision or not n.startswith(TOWER[:-len("vision_model.")])]
    specs = [TensorSpec(n, tuple(getattr(p, "ds_shape", p.shape)), TORCH_TO_CODE[p.dtype]) for n, p in params]
    writer = SafetensorsWriter(tmp, layout_shards(specs, 5 * 1024**3)) if main else None
    with writer if writer is not None else contextlib.nullcontext():
        for name, tensor in gathered(params):  # one tensor in memory at a time
            if writer is not None:
                writer.write(name, tensor)
    if main:
        for name in TOKENIZER_FILES:
            if (ckpt.tokenizer_folder / name).exists():
                shutil.copyfile(ckpt.tokenizer_folder / name, tmp / name)
