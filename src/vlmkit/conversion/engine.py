"""Run a checked plan: tensor by tensor, bounded memory, into an atomic folder.

A family module describes a conversion as a ``Conversion`` (a source, rules, the
target's expected tensors, and a function that writes the non-tensor files); ``run``
compiles, checks and executes it. Peak memory is the tensors of two steps (the one
being written and the one being read ahead), never the model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..lazy import torch

from ..tensors import DTYPES, TensorSource
from . import output
from .plan import Plan, Step, compile_plan
from .rules import Rule, rename

DEFAULT_MAX_SHARD = 5 * 1024**3  # transformers' default shard size

ExtraWriter = Callable[[Path], None]


@dataclass
class Conversion:
    """What a family hands to the engine.

    Attributes:
        source: the lazily opened checkpoint (possibly several combined).
        rules: source names -> target names.
        expected: target name -> shape that must be produced (None: not checked).
        keep_dtype: targets never cast by ``--dtype``.
        dtype: the dtype written when ``--dtype`` asks for none (None: each tensor keeps its
            own), e.g. a LoRA run's base model's, whatever its adapter's dtype.
        write_extras: writes config, tokenizer, processor... into the output folder.
        summary: one line shown before converting (what was recognised).
        assumptions: values no source file states that the conversion rests on, each with where it
            came from; listed by the plan, the CLI and the manifest.
    """

    source: TensorSource
    rules: list[Rule]
    expected: dict[str, tuple[int, ...]] | None = None
    keep_dtype: frozenset[str] = frozenset()
    dtype: str | None = None
    write_extras: ExtraWriter | None = None
    summary: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)


def identity(source: TensorSource) -> Conversion:
    """The conversion with no family: every tensor kept under its name (re-shard, re-type)."""
    return Conversion(source, [rename("{name:path}", "{name:path}")], summary="tensors copied as they are")


class Progress(Protocol):
    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


@dataclass
class Result:
    plan: Plan
    destination: Path | None
    files: dict[str, str]  # written file -> sha256


def plan_for(conversion: Conversion, *, dtype: str | None = None) -> Plan:
    """Compile and check the plan of a conversion; reads no tensor data."""
    infos = [conversion.source.info(n) for n in conversion.source.keys()]
    plan = compile_plan(conversion.rules, infos, dtype=dtype or conversion.dtype, expected=conversion.expected,
                        keep_dtype=conversion.keep_dtype)
    return dataclasses.replace(plan, assumptions=tuple(conversion.assumptions))


def run(
    conversion: Conversion,
    destination: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[int], "Progress"] | None = None,
    provenance: dict | None = None,
) -> Result:
    """Convert into ``destination`` (a folder), atomically.

    Args:
        conversion: what to convert (see ``Conversion``).
        destination: output folder; must not exist unless ``force``.
        dtype: safetensors code to cast floating tensors to ("F16", "BF16", "F32"), or None.
        max_shard_size: bytes per safetensors shard.
        force: replace an existing destination (atomically, at the end).
        dry_run: compile and check the plan, write nothing.
        progress: called with the total source bytes once the plan checks out; returns
            an object with ``update(n)`` and ``close()`` (a ``tqdm`` fits).
        provenance: how the conversion was asked for (``output.provenance``), for the manifest and the card.

    Raises:
        PlanError: the plan does not check out (before anything is read).
        OutputError: the destination is refused or cannot be written (nothing left behind).
    """
    from ..tensors.safetensors_io import SafetensorsWriter, TensorSpec, layout_shards

    destination = Path(destination)
    source = conversion.source
    plan = plan_for(conversion, dtype=dtype)
    output.check_destination(destination, source.files(), force=force)
    if dry_run:
        return Result(plan, None, {})
    source_hashes = output.hash_sources(source)  # in the background, overlapping the conversion's reads
    shards = layout_shards([TensorSpec(t.name, t.shape, t.dtype) for t in plan.targets], max_shard_size)
    bar = progress(plan.bytes_in) if progress else None
    with contextlib.ExitStack() as cleanup:
        if bar is not None:
            cleanup.callback(bar.close)
        tmp = cleanup.enter_context(output.atomic_folder(destination, force=force))
        with SafetensorsWriter(tmp, shards, conversion.metadata) as writer:
            for step, tensors in _stream(plan, source):
                for target, tensor in zip(step.targets, tensors):
                    writer.write(target.name, tensor.to(DTYPES[target.dtype]))
                if bar is not None:
                    bar.update(step.nbytes_in)
        hashes = writer.hashes
        if conversion.write_extras:
            conversion.write_extras(tmp)
        from ..publish import card

        output.write_manifest(tmp, known_hashes=hashes, source=output.source_record(source, source_hashes),
                              plan=plan.to_dict(),
                              provenance={**(provenance or {}), "output": "hf", "summary": conversion.summary},
                              assumptions=list(plan.assumptions), card=card.render)
    return Result(plan, destination, hashes)


def apply_step(step: Step, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    for op in step.ops:
        tensors = op(tensors)
    return tensors


def _stream(plan: Plan, source: TensorSource):
    """Yield (step, output tensors), reading the next step's sources in the background."""

    def load(step: Step) -> list[torch.Tensor]:
        return apply_step(step, [source.read(i.name) for i in step.sources])

    steps = list(plan.steps)
    if not steps:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, steps[0])
        for i, step in enumerate(steps):
            tensors = pending.result()
            if i + 1 < len(steps):
                pending = pool.submit(load, steps[i + 1])
            yield step, tensors
            del tensors
