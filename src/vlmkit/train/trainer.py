"""``LLaVATrainer``: transformers' ``Trainer`` with LLaVA's sampler and optimizer groups, and safe checkpoints.

On top of the stock ``Trainer`` (which brings accelerate, DeepSpeed, gradient checkpointing,
schedules, logging and resuming):

* ``_get_train_sampler``: LLaVA's modality-length grouping (``sampler.py``);
* ``create_optimizer``: LLaVA's groups with ``--projector-lr`` (``setup.parameter_groups``);
* checkpoints hold only what changes (the trainable parameters, the optimizer, the scheduler, the
  random states, the trainer state) and are written atomically: into ``.staging/checkpoint-N``,
  renamed to ``checkpoint-N`` once every process has finished writing. A crash or Ctrl-C leaves no
  ``checkpoint-N`` behind, so ``--resume`` always finds a complete one;
* tokens per second (the language model's positions, image features included) in every log.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer

from .sampler import ModalityLengthSampler
from .setup import parameter_groups

STAGING = ".staging"
TRAINABLE = "trainable.safetensors"


class LlavaTrainer(Trainer):
    """The Trainer of a vlmkit run.

    Args:
        llava_module: the ``LlavaTraining`` model inside any wrapper (its ``last_tokens`` are counted).
        lengths: modality lengths for the grouped sampler, or None for the Trainer's random sampler.
        projector_lr: ``--projector-lr`` (None: the main learning rate).
    """

    def __init__(self, *args, llava_module, lengths: list[int] | None, projector_lr: float | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.llava_module, self.lengths, self.projector_lr = llava_module, lengths, projector_lr
        self._tokens = 0
        self._last_log = time.perf_counter()
        self._staging = False

    # ------------------------------------------------------------------ data and optimizer

    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthSampler(self.lengths, self.args.train_batch_size,
                                     self.args.world_size * self.args.gradient_accumulation_steps, self.args.seed)

    def create_optimizer(self, model=None):
        model = self.model if model is None else model
        if self.optimizer is None:
            groups = parameter_groups(model, set(self.get_decay_parameter_names(model)), self.args.weight_decay,
                                      self.projector_lr)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ tokens per second

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        self._tokens += getattr(self.llava_module, "last_tokens", 0)
        return result

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            tokens = torch.tensor(self._tokens, device=self.args.device)
            if self.args.world_size > 1:
                tokens = self.accelerator.reduce(tokens, reduction="sum")
            now = time.perf_counter()
            seen = int(tokens)
            self.state.num_input_tokens_seen = int(self.state.num_input_tokens_seen or 0) + seen
            logs["tokens"] = self.state.num_input_tokens_seen
            logs["tokens_per_second"] = round(seen / max(now - self._last_log, 1e-9), 1)
            self._tokens, self._last_log = 0, now
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = run_dir / STAGING / name
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every process has written its part
            if self.args.should_save:
                final = run_dir / name
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staged, final)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            raise
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trainable parameters only (frozen ones never change), gathered under ZeRO-3."""
        from safetensors.torch import save_file

        from .model import gathered

        output_dir = output_dir or self.args.output_dir
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        state = {n: t.contiguous() for n, t in gathered(params)}
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_file(state, os.path.join(output_dir, TRAINABLE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from safetensors.torch import load_file

        model = model or self.model
        state = load_file(os.path.join(resume_from_checkpoint, TRAINABLE))
        params = dict(model.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            from ..errors import CheckpointError

            raise CheckpointError(f"{resume_from_checkpoint}/{TRAINABLE}: '{unknown[0]}' is not a parameter of "
                                  "this model", hint="resume with the options the run was started with")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` of a run (staged, unfinished ones are never named so)."""
    found = [(int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None
