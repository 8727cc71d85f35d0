"""Which parameters learn, with which learning rate: stages, LoRA and optimizer groups as LLaVA sets them.

* stage 1 (``tune_mm_mlp_adapter``): everything frozen but ``mm_projector``;
* stage 2, full: the language model and the projector learn, the vision tower stays frozen
  (its ``load_model`` calls ``requires_grad_(False)``) unless ``--train-vision``;
* stage 2, LoRA: ``get_peft_model`` on the language model's linear layers
  (``find_all_linear_names``: every ``nn.Linear`` outside the projector and the tower, named by
  its last component, ``lm_head`` excepted), then the projector is unfrozen again and trained
  in full ("In case it is frozen by LoRA", ``initialize_vision_modules``).

Optimizer groups follow ``LLaVATrainer.create_optimizer``: weight decay for every parameter but
biases and LayerNorm/RMSNorm weights, and ``--projector-lr`` (``mm_projector_lr``) for the projector.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig

# A parameter's part, by the first keyword in its name; the language model is everything else.
PARTS = (("mm_projector", "projector"), ("vision_tower", "vision"), ("image_newline", "projector"))
MULTIMODAL_KEYWORDS = ("mm_projector", "vision_tower", "vision_resampler")


def part_of(name: str) -> str:
    """"projector", "vision" or "language_model" for a parameter name (peft prefixes included)."""
    return next((part for key, part in PARTS if key in name), "language_model")


def find_all_linear_names(model: nn.Module) -> list[str]:
    """LLaVA's LoRA targets: the last name component of every language-model ``nn.Linear`` but ``lm_head``."""
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not any(k in name for k in MULTIMODAL_KEYWORDS)}
    names.discard("lm_head")
    return sorted(names)


def trainable_parts(config: TrainConfig) -> set[str]:
    parts = set(config.stage_info.trains)
    if config.train_vision:
        parts.add("vision")
    return parts


def prepare(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze, add LoRA adapters, and switch on gradient checkpointing's input gradients.

    Returns:
        The model to train (a peft model with ``--lora``).
    """
    parts = trainable_parts(config)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        targets = list(config.lora_targets or find_all_linear_names(model))
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=targets,
                          lora_dropout=config.lora_dropout, bias="none", task_type="CAUSAL_LM",
                          # the original adds the tower after wrapping; here it exists, so keep LoRA off it
                          exclude_modules=r".*(mm_projector|vision_tower|vision_resampler).*")
        torch.manual_seed(config.seed)  # the adapters' initialisation depends on the seed alone
        model = get_peft_model(model, lora)
        parts.discard("language_model")  # only the adapters learn there
    for name, param in model.named_parameters():
        if config.lora and "lora_" in name:
            param.requires_grad_(True)
        else:
            param.requires_grad_(part_of(name) in parts)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def parameter_groups(model: nn.Module, decay: set[str], weight_decay: float, projector_lr: float | None) -> list[dict]:
    """``LLaVATrainer.create_optimizer``'s groups (empty groups left out).

    Args:
        decay: names of the parameters that decay (``Trainer.get_decay_parameter_names``).
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        projector = projector_lr is not None and "mm_projector" in name
        groups.setdefault((name in decay, projector), []).append(param)
    out = []
    for (decays, projector), params in sorted(groups.items(), reverse=True):
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if projector:
            group["lr"] = projector_lr
        out.append(group)
    return out


def count(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per part (for the summary)."""
    out: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = "lora" if "lora_" in name else part_of(name)
            out[key] = out.get(key, 0) + int(getattr(param, "ds_numel", param.numel()))
    return out
