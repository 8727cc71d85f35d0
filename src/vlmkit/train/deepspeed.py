"""DeepSpeed ZeRO presets, and a config check that runs before any data or weight is read.

The presets are LLaVA's ``scripts/zero2.json``, ``zero3.json`` and ``zero3_offload.json``, with
``zero_allow_untested_optimizer`` set for the two without an ``optimizer`` section (the Trainer
then hands DeepSpeed its own AdamW with LLaVA's parameter groups). ``--deepspeed`` takes a preset
name or a JSON file. :func:`resolve_config` then

* refuses unknown top-level keys (with the closest known key: DeepSpeed itself ignores them),
* compares every value that is not ``"auto"`` with the training options (batch size, gradient
  accumulation, the product with the world size, clipping, precision) and names each mismatch,
* runs DeepSpeed's own parser (``deepspeed.runtime.config.DeepSpeedConfig``: its pydantic models
  refuse unknown keys inside ``zero_optimization`` and wrong types),

so a typo fails in a second with the key named, not after the model has loaded.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from ..errors import ConfigError

_FP16 = {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
         "hysteresis": 2, "min_loss_scale": 1}
_BATCH = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
_STAGE3 = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
           "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
           "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
           "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}

PRESETS: dict[str, dict] = {
    "zero2": {"fp16": _FP16, "bf16": {"enabled": "auto"}, **_BATCH, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                    "sub_group_size": 1e9, "reduce_bucket_size": "auto"}},
    "zero3": {"fp16": _FP16, "bf16": {"enabled": "auto"}, **_BATCH, "zero_allow_untested_optimizer": True,
              "zero_optimization": _STAGE3},
    "zero3_offload": {
        "fp16": _FP16, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "zero_optimization": {**{k: v for k, v in _STAGE3.items() if k != "stage3_gather_16bit_weights_on_model_save"},
                              "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True},
                              "gather_16bit_weights_on_model_save": True},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 1e5, "wall_clock_breakdown": False},
}

# Top-level keys DeepSpeed reads (deepspeed/runtime/config.py and the config modules it calls).
KNOWN_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print dump_state
disable_allgather communication_data_type seq_parallel_communication_data_type prescale_gradients
gradient_predivide_factor sparse_gradients zero_optimization zero_allow_untested_optimizer
zero_force_ds_cpu_optimizer optimizer scheduler fp16 bf16 bfloat16 amp torch_autocast gradient_clipping
graph_harvesting activation_checkpointing flops_profiler wall_clock_breakdown memory_breakdown tensorboard
wandb csv_monitor comet comms_logger eigenvalue progressive_layer_drop sparse_attention pipeline
pld curriculum_learning data_efficiency compression_training checkpoint data_types aio nebula elasticity
autotuning weight_quantization hybrid_engine compile timers use_data_before_expert_parallelism
mics_shard_size mics_hierarchical_params_gather load_universal_checkpoint use_node_local_storage
quantize_training dataloader_drop_last zenflow sequence_parallel_size tensor_parallel domino
""".split())


def preset(name: str) -> dict:
    """A copy of a preset (``zero2``, ``zero3``, ``zero3_offload``)."""
    return copy.deepcopy(PRESETS[name])


def load(spec: str) -> tuple[dict, str]:
    """``--deepspeed``: a preset name or a JSON file -> (config, where it came from).

    Raises:
        ConfigError: neither a preset nor a readable JSON file.
    """
    if spec in PRESETS:
        return preset(spec), f"preset {spec}"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--deepspeed {spec!r} is neither a preset nor a file",
                          hint=f"presets: {', '.join(PRESETS)}; or a DeepSpeed JSON file")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({e})") from None


def _is_auto(value) -> bool:
    return value == "auto"


def resolve_config(config: dict, where: str, *, micro_batch: int, accumulation: int, world_size: int,
                   max_grad_norm: float, bf16: bool, fp16: bool) -> dict:
    """Check a DeepSpeed config against the training options and DeepSpeed's parser.

    Args:
        config: the config (``"auto"`` values allowed, as in LLaVA's files).
        where: its origin, for messages.
        micro_batch, accumulation, world_size: ``--batch-size``, ``--gradient-accumulation``, processes.
        max_grad_norm, bf16, fp16: the training's clipping and precision.

    Returns:
        ``config`` unchanged (the Trainer fills the ``"auto"`` values the same way).

    Raises:
        ConfigError: every problem at once, each naming the key and the fix.
    """
    problems = []
    for key in config:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.75)
            problems.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    expected = {"train_micro_batch_size_per_gpu": (micro_batch, "--batch-size"),
                "gradient_accumulation_steps": (accumulation, "--gradient-accumulation"),
                "train_batch_size": (micro_batch * accumulation * world_size,
                                     f"--batch-size x --gradient-accumulation x {world_size} process(es)"),
                "gradient_clipping": (max_grad_norm, "--max-grad-norm")}
    for key, (value, flag) in expected.items():
        given = config.get(key, "auto")
        if not _is_auto(given) and given != value:
            problems.append(f"{key} is {given} but {flag} gives {value} (use \"auto\" to follow the flags)")
    for key, on in (("bf16", bf16), ("fp16", fp16)):
        given = (config.get(key) or {}).get("enabled", "auto")
        if not _is_auto(given) and bool(given) != on:
            problems.append(f"{key}.enabled is {given} but the run's --precision {'is' if on else 'is not'} {key}")
    if not problems:
        problems += _deepspeed_parser(config, micro_batch, accumulation, max_grad_norm, bf16, fp16)
    if problems:
        raise ConfigError(f"DeepSpeed config ({where}) does not fit:\n" + "\n".join(f"  - {p}" for p in problems),
                          hint="fix the file, or use a preset (--deepspeed zero2 | zero3 | zero3_offload)")
    return config


def _filled(value, fill):
    if isinstance(value, dict):
        return {k: _filled(v, fill) for k, v in value.items()}
    return fill if _is_auto(value) else value


def _deepspeed_parser(config: dict, micro: int, accumulation: int, clip: float, bf16: bool, fp16: bool) -> list[str]:
    """DeepSpeed's own checks on the config with ``"auto"`` filled in (as the Trainer will, for one process)."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        raise ConfigError("--deepspeed needs DeepSpeed, which is not installed",
                          hint="pip install 'vlmkit[deepspeed]'") from None
    filled = _filled(config, 1_000_000)
    filled.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation,
                  train_batch_size=micro * accumulation, gradient_clipping=clip)
    for key, on in (("bf16", bf16), ("fp16", fp16)):
        if key in filled:
            filled[key] = {**filled[key], "enabled": on}
    for section in ("optimizer", "scheduler"):
        params = (config.get(section) or {}).get("params") or {}
        if any(_is_auto(v) for v in params.values()):  # numbers the Trainer fills from its arguments
            filled[section]["params"] = {k: ([0.9, 0.999] if k == "betas" else 1e-3) if _is_auto(v) else v
                                         for k, v in params.items()}
    try:
        DeepSpeedConfig(filled)
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError, AssertionError, ValueError: all mean "bad config"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return [" ".join(lines[:6]) or type(e).__name__]
    return []


def zero_stage(config: dict | None) -> int:
    return int(((config or {}).get("zero_optimization") or {}).get("stage", 0))
