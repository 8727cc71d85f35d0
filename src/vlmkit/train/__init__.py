"""Fine-tuning LLaVA as its authors do, on the well-kept stack (transformers ``Trainer``, peft, accelerate, DeepSpeed).

* ``config``     — :class:`TrainConfig`, the run as one value, and the stages (:data:`STAGES`);
* ``model``      — building and loading the model to train under ZeRO-3, reading it back (``gathered``);
* ``setup``      — freezing per stage, LoRA targets, LLaVA's optimizer groups;
* ``collate``    — batches from ``vlmkit.data`` (the one tokenisation) and ``runtime.images``;
* ``sampler``    — LLaVA's ``group_by_modality_length`` sampler;
* ``deepspeed``  — ZeRO presets, validated with DeepSpeed's own parser before anything loads;
* ``trainer``    — ``LlavaTrainer``: sampler, optimizer groups, atomic checkpoints, tokens/s;
* ``progress``   — progress bar, JSONL log, TensorBoard, loss plot;
* ``run``        — :func:`train`, the order of a run;
* ``merge``      — :func:`merge_lora`, through the run's family (into its original or the transformers layout);
* ``cli``        — ``add_train_commands`` for the ``vlmkit`` command.

Example:
    >>> from vlmkit.train import TrainConfig, train, merge_lora
    >>> train(TrainConfig(model="llava-v1.5-7b", data="wukong.jsonl", image_folder="images",
    ...                   output="runs/llava-wukong-lora", lora=True))
    >>> merge_lora("runs/llava-wukong-lora", base="llava-v1.5-7b", output="llava-wukong")
"""

from __future__ import annotations

import importlib

# name -> submodule; imported on first use, so that `vlmkit --help` does not load the Trainer and peft
_EXPORTS = {"STAGES": "config", "TrainConfig": "config", "merge_lora": "merge", "TrainResult": "run", "train": "run"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
