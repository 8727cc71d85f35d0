"""What a training run is, as one value: stage, parts trained, LoRA, learning rates, schedule, DeepSpeed.

Defaults are those of LLaVA-1.5's released scripts (``scripts/v1_5/pretrain.sh``,
``finetune.sh``, ``finetune_lora.sh``), per stage, in :data:`STAGES`. Every option is checked
in :meth:`TrainConfig.check` before any data or weight is read, and every problem is reported
at once.

Example:
    >>> cfg = TrainConfig(model="vicuna-7b", data="blip_558k.json", output="ckpt/pretrain", stage="pretrain",
    ...                   image_folder="images", vision_tower="clip-vit-large-patch14-336")
    >>> cfg.check()
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One of LLaVA's two training stages.

    Attributes:
        trains: what gets gradients ("projector", "language_model").
        template: the conversation template the original uses (None: the model's own).
        learning_rate: the released script's ``--learning_rate`` (full fine-tuning / projector only).
        lora_learning_rate: ``finetune_lora.sh``'s.
        what: one line for ``--help`` and the summary.
    """

    trains: tuple[str, ...]
    template: str | None
    learning_rate: float
    lora_learning_rate: float | None
    what: str


STAGES: dict[str, Stage] = {
    "pretrain": Stage(("projector",), "plain", 1e-3, None,
                      "stage 1: only the projector learns (vision tower and language model frozen)"),
    "finetune": Stage(("projector", "language_model"), None, 2e-5, 2e-4,
                      "stage 2: projector + language model (LoRA or full), vision tower frozen"),
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ZERO_PRESETS = ("zero2", "zero3", "zero3_offload")


@dataclass
class TrainConfig:
    """A training run (see ``vlmkit train --help`` for each field's flag).

    Attributes:
        model: the starting checkpoint: an original LLaVA (any form) or a plain language model folder.
        data: training records (any format ``vlmkit data`` reads).
        output: the run folder: checkpoints, logs and the final outputs.
        stage: "pretrain" or "finetune" (:data:`STAGES`).
        image_folder: where relative image paths start.
        lora: train LoRA adapters instead of the full language model (finetune only).
    """

    model: str
    data: str
    output: str
    stage: str = "finetune"
    image_folder: str | None = None
    strict_data: bool = False  # refuse the records the original trains on in its own way (data check --strict)
    # parts and adapters
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None  # default: the language model's linear layers
    train_vision: bool = False
    init_projector: str | None = None
    projector_type: str = "mlp2x_gelu"  # a new LLaVA from a plain language model only
    vision_select_layer: int = -2
    image_aspect_ratio: str = "pad"
    # optimisation
    learning_rate: float | None = None
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    max_length: int | None = None
    group_by_modality_length: bool = True
    gradient_checkpointing: bool = True
    precision: str = "auto"
    seed: int = 42
    # checkpoints and logs
    save_steps: int = 500
    save_total_limit: int | None = 1
    logging_steps: int = 1
    resume: bool = False
    force: bool = False
    tensorboard: bool = True
    progress: bool = True
    dataloader_workers: int = 0
    # DeepSpeed
    deepspeed: str | None = None  # a preset name or a JSON file
    # loading options shared with every command
    vision_tower: str | None = None
    model_base: str | None = None
    template: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def stage_info(self) -> Stage:
        return STAGES[self.stage]

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        stage = self.stage_info
        return stage.lora_learning_rate if self.lora and stage.lora_learning_rate else stage.learning_rate

    def check(self) -> None:
        """Every problem with the options, at once.

        Raises:
            ConfigError: listing each problem with the flag that fixes it.
        """
        problems = [p for rule in _RULES if (p := rule(self))]
        if problems:
            raise ConfigError("the training options do not fit:\n" + "\n".join(f"  - {p}" for p in problems),
                              hint="see `vlmkit train --help`")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("lora_targets"), list):
            values["lora_targets"] = tuple(values["lora_targets"])
        return cls(**values)


def _positive(name: str, flag: str):
    return lambda c: f"{flag} {getattr(c, name)} must be positive" if getattr(c, name) <= 0 else None


# Each rule returns a problem (with the flag to change) or None.
_RULES = [
    lambda c: None if c.stage in STAGES else f"--stage {c.stage!r} is unknown (choose {', '.join(STAGES)})",
    lambda c: "--lora applies to --stage finetune (stage 1 trains the projector only)"
    if c.lora and c.stage == "pretrain" else None,
    lambda c: "--train-vision with --stage pretrain: stage 1 trains the projector only"
    if c.train_vision and c.stage == "pretrain" else None,
    lambda c: None if c.precision in PRECISIONS else f"--precision {c.precision!r} is not one of {PRECISIONS}",
    lambda c: f"--lora-dropout {c.lora_dropout} must be in [0, 1)" if not 0 <= c.lora_dropout < 1 else None,
    _positive("lora_r", "--lora-r"),
    _positive("lora_alpha", "--lora-alpha"),
    _positive("batch_size", "--batch-size"),
    _positive("gradient_accumulation", "--gradient-accumulation"),
    _positive("save_steps", "--save-steps"),
    _positive("logging_steps", "--logging-steps"),
    lambda c: f"--learning-rate {c.learning_rate} must be positive" if c.learning_rate is not None
    and c.learning_rate <= 0 else None,
    lambda c: f"--projector-lr {c.projector_lr} must be positive" if c.projector_lr is not None
    and c.projector_lr <= 0 else None,
    lambda c: f"--max-length {c.max_length} must be positive" if c.max_length is not None and c.max_length <= 0 else None,
    lambda c: "--epochs must be positive (or give --max-steps)" if c.epochs <= 0 and c.max_steps <= 0 else None,
    lambda c: f"--warmup-ratio {c.warmup_ratio} must be in [0, 1)" if not 0 <= c.warmup_ratio < 1 else None,
    lambda c: f"--init-projector {c.init_projector}: no such file" if c.init_projector
    and not Path(c.init_projector).is_file() else None,
    lambda c: f"--data {c.data}: no such file" if not Path(c.data).exists() else None,
    lambda c: f"--image-folder {c.image_folder}: no such folder" if c.image_folder
    and not Path(c.image_folder).is_dir() else None,
    lambda c: "--resume and --force contradict each other (continue the run, or start it anew)"
    if c.resume and c.force else None,
]


def describe(c: TrainConfig) -> str:
    """One line: what this run trains, and how."""
    parts = STAGES[c.stage].what
    how = f"LoRA r={c.lora_r} alpha={c.lora_alpha}" if c.lora else ("full" if c.stage == "finetune" else "")
    lrs = f"lr {c.lr:g}" + (f", projector lr {c.projector_lr:g}" if c.projector_lr else "")
    extra = [how, lrs, f"batch {c.batch_size}x{c.gradient_accumulation}", c.deepspeed or ""]
    return f"{c.stage}: {parts}; " + ", ".join(e for e in extra if e)


__all__ = ["Stage", "STAGES", "TrainConfig", "describe"]
