"""``vlmkit train``: one run, in the order that makes mistakes cheap.

1. options checked (``TrainConfig.check``), the run folder claimed (or the run to resume found
   and its options compared), the DeepSpeed config validated with DeepSpeed's parser;
2. the starting checkpoint opened from its headers, and the data checked with ``vlmkit data
   check`` (every record tokenised by the training's own code, every image opened): a bad dataset
   fails in seconds, naming the records, before any weight is read;
3. then the model is built and trained by ``LlavaTrainer``, and the outputs written.

What the start *is* (its weights, the model built from them, the files a run leaves) is the
family's: ``families.require(start, "training")`` and its ``training`` composition.

Example:
    >>> result = train(TrainConfig(model="llava-v1.5-7b", data="wukong.jsonl", image_folder="images",
    ...                            output="runs/wukong-lora", lora=True, deepspeed="zero2"))
    >>> result.files
    ['adapter_config.json', 'adapter_model.safetensors', 'config.json', 'non_lora_trainables.bin', ...]
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import families
from ..errors import ConfigError, OutputError
from ..options import LoadOptions
from ..tensors import resolve
from . import deepspeed as ds_config
from . import progress, setup
from .config import TrainConfig, describe
from .trainer import STAGING, LlavaTrainer, latest_checkpoint

RUN_FILE = "vlmkit-run.json"
# Options a resumed run must share with the run it continues (the rest may change, e.g. --save-steps).
SAME_ON_RESUME = ("model", "data", "stage", "image_folder", "lora", "lora_r", "lora_alpha", "lora_targets",
                  "train_vision", "init_projector", "learning_rate", "projector_lr", "weight_decay", "warmup_ratio",
                  "lr_scheduler", "epochs", "max_steps", "batch_size", "gradient_accumulation", "max_length",
                  "group_by_modality_length", "seed", "model_base", "vision_tower", "template")


@dataclass
class TrainResult:
    """What a finished run left.

    Attributes:
        output: the run folder.
        files: the output files (see ``outputs``).
        steps: optimizer steps done.
        losses: (step, loss) per logging step, the whole run's (resumed runs included).
        summary: trainable parameters per part, tokens, seconds.
    """

    output: Path
    files: list[str]
    steps: int
    losses: list[tuple[int, float]]
    summary: dict = field(default_factory=dict)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _claim(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to mix runs: a new run needs an empty folder (or --force), --resume needs the same options.

    Every process checks the folder as it was, then the first one writes (between barriers).
    """
    _check_claim(run_dir, config)
    _barrier()
    if _is_main():
        if not config.resume:
            if run_dir.exists() and config.force:
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_FILE).write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
        shutil.rmtree(run_dir / STAGING, ignore_errors=True)  # what an interrupted save left
    _barrier()


def _check_claim(run_dir: Path, config: TrainConfig) -> None:
    record = run_dir / RUN_FILE
    if config.resume:
        if not record.exists():
            raise OutputError(f"--resume: {run_dir} holds no run ({RUN_FILE} missing)",
                              hint="start the run without --resume")
        before = TrainConfig.from_dict(json.loads(record.read_text())).to_dict()
        now = config.to_dict()
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in SAME_ON_RESUME
                   if str(before.get(k)) != str(now.get(k))]
        if changed:
            raise ConfigError(f"--resume: the options differ from the run in {run_dir}: " + "; ".join(changed),
                              hint="resume with the same options, or start a new run in another folder")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not config.force:
        raise OutputError(f"{run_dir} already holds files", hint="pass --resume to continue that run, --force "
                                                                 "to start it anew, or choose another --output")


def _precision(name: str) -> tuple[bool, bool]:
    """(bf16, fp16): ``auto`` is bf16 where the GPU has it, else fp32 (CPU)."""
    if name == "auto":
        return (torch.cuda.is_available() and torch.cuda.is_bf16_supported(), False)
    if name in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"--precision {name} needs a GPU; this machine trains in fp32",
                          hint="pass --precision fp32 (or auto)")
    return name == "bf16", name == "fp16"


def _check_data(config: TrainConfig, data_model) -> None:
    from ..data import DataError, check
    from ..data.check import render

    report = check(config.data, image_folder=config.image_folder, model=data_model, strict=config.strict_data)
    if report.failed():
        raise DataError(f"the training data does not check out; nothing was loaded:\n{render(report)}",
                        hint=f"fix the records, or keep the good ones: vlmkit data check {config.data} "
                             f"--image-folder {config.image_folder or '.'} --model {config.model} --fix clean.jsonl"
                             + (" --strict" if config.strict_data else ""))


def _arguments(config: TrainConfig, run_dir: Path, deepspeed: dict | None, bf16: bool, fp16: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation, learning_rate=config.lr,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio, lr_scheduler_type=config.lr_scheduler,
        num_train_epochs=config.epochs, max_steps=config.max_steps, max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, seed=config.seed, bf16=bf16, fp16=fp16,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_workers, report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), deepspeed=deepspeed, save_only_model=False,
        ddp_find_unused_parameters=False,
    )


def _callbacks(config: TrainConfig, run_dir: Path) -> list:
    callbacks = [progress.JsonlLog(run_dir / progress.LOG)]
    if config.progress:
        callbacks.append(progress.ProgressBar())
    if config.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("TensorBoard logs need the tensorboard package",
                              hint="pip install 'vlmkit[train]' (or pass --no-tensorboard)") from None
        from transformers.integrations import TensorBoardCallback

        if _is_main():
            callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return callbacks


def train(config: TrainConfig, *, callbacks: list | None = None,
          announce: Callable[[str], None] | None = None) -> TrainResult:
    """Run ``config``: check, load, train, write the outputs (see the module docstring).

    Args:
        config: the run.
        callbacks: extra ``TrainerCallback`` objects (tests interrupt runs with one).
        announce: receives one-line messages for the user (what was found, what is written).

    Raises:
        ConfigError / DataError / CheckpointError / OutputError: before the model loads, naming what to fix.
    """
    say = announce or (lambda _: None)
    config.check()
    run_dir = Path(config.output)
    bf16, fp16 = _precision(config.precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = None
    if config.deepspeed:
        deepspeed, where = ds_config.load(config.deepspeed)
        ds_config.resolve_config(deepspeed, where, micro_batch=config.batch_size,
                                 accumulation=config.gradient_accumulation, world_size=world,
                                 max_grad_norm=config.max_grad_norm, bf16=bf16, fp16=fp16)
    stage_template = config.template or config.stage_info.template
    options = LoadOptions(vision_tower=config.vision_tower, model_base=config.model_base, template=stage_template,
                          seed=config.seed)
    start = resolve(config.model)
    found = families.require(start, "training")
    composition = found.family.training(found, options, config)  # the family's start, model and outputs
    composition.check()  # the start opened from its headers
    data_model = composition.data_model()
    say(f"{describe(config)}; template {data_model.template}, max length {data_model.max_length}")
    for note in composition.notes(run_dir):
        say(note)
    _check_data(config, data_model)
    base = composition.trained_base()
    fingerprint = composition.fingerprint()
    args = _arguments(config, run_dir, deepspeed, bf16, fp16)
    _ = args.device  # initialises the process group (and DeepSpeed's) before a partitioned model is built
    _claim(run_dir, config)
    zero3 = deepspeed if ds_config.zero_stage(deepspeed) == 3 else None
    model = composition.build(max_length=data_model.max_length, zero3=zero3)
    llava_module = model
    if zero3 is not None:
        parts = sum(1 for p in model.parameters() if hasattr(p, "ds_id"))
        say(f"ZeRO-3: {parts} of {len(list(model.parameters()))} parameters partitioned at construction; the "
            "checkpoint was loaded into the partitions")
    model = setup.prepare(model, config)
    trained = setup.count(model)
    say("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in sorted(trained.items())))

    from ..data import open_records
    from .collate import Collator, LlavaDataset

    records = list(open_records(config.data))
    dataset = LlavaDataset(records, data_model, config.image_folder, llava_module.image_config)
    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset,
                           data_collator=Collator(data_model.encoder.pad_token_id, data_model.max_length),
                           llava_module=llava_module,
                           lengths=dataset.modality_lengths if config.group_by_modality_length else None,
                           projector_lr=config.projector_lr, callbacks=_callbacks(config, run_dir) + (callbacks or []))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)
    resume = latest_checkpoint(run_dir) if config.resume else None
    if config.resume:
        say(f"resuming from {resume}" if resume else "no checkpoint yet: starting from step 0")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    log = progress.read_log(run_dir / progress.LOG)
    losses = [(e["step"], e["loss"]) for e in log if "loss" in e]
    summary = {"steps": trainer.state.global_step, "final_loss": losses[-1][1] if losses else None,
               "trainable_parameters": trained, "tokens": trainer.state.num_input_tokens_seen}
    files = composition.write(model, run_dir, max_length=data_model.max_length, base=base, fingerprint=fingerprint,
                              summary=summary)
    if _is_main():
        progress.plot(run_dir / progress.LOG, run_dir / progress.PLOT, title=f"{config.stage} loss ({run_dir.name})")
    return TrainResult(run_dir, files, trainer.state.global_step, losses, summary)
