"""The conversion engine: rules (data) -> checked plan -> streamed, atomic output."""

from .engine import DEFAULT_MAX_SHARD, Conversion, Result, identity, plan_for, run
from .output import MANIFEST, verify_files
from .plan import Plan, Step, Target, compile_plan, human_bytes
from .rules import (
    Chunk, Concat, Custom, Op, Pattern, Permute, Reshape, ResizeRows, Rule,
    create, drop, fuse, lora_merge, rename, reverse, split, transform, transpose,
)

__all__ = [
    "DEFAULT_MAX_SHARD", "Conversion", "Result", "identity", "plan_for", "run", "MANIFEST", "verify_files",
    "Plan", "Step", "Target", "compile_plan", "human_bytes",
    "Chunk", "Concat", "Custom", "Op", "Pattern", "Permute", "Reshape", "ResizeRows", "Rule",
    "create", "drop", "fuse", "lora_merge", "rename", "reverse", "split", "transform", "transpose",
]
