"""Run a checked plan: tensor by tensor, bounded memory, into an atomic folder.

A family module describes a conversion as a ``Conversion`` (a source, rules, the
target's expected tensors, and a function that writes the non-tensor files); ``run``
compiles, checks and executes it. Execution is one bounded pipeline: a reader thread
reads, transforms and casts up to ``READ_AHEAD`` steps ahead of the writer (the
calling thread), which writes them while a thread per file hashes them; so reading
overlaps writing, and peak memory is the tensors of ``READ_AHEAD + 2`` steps, never the
model. A tensor whose stored bytes are kept (moved, or grown by rows) is not read at
all: the writer has the kernel copy them file to file (``file_pieces``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..lazy import torch

from ..tensors import DTYPES, TensorSource, return_freed_buffers, stored_at
from ..tensors.safetensors_io import FileBytes
from . import output
from .plan import Plan, Step, compile_plan
from .rules import ResizeRows, Rule, rename

DEFAULT_MAX_SHARD = 5 * 1024**3  # transformers' default shard size
READ_AHEAD = 2  # steps queued between the reader thread and the writer

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
        warnings: what the converted model computes differently from the source (e.g. an input kind the
            target class handles otherwise), each naming the source field; printed by the CLI and kept in the
            manifest's provenance, where a family's runtime reads them to refuse that input on the folder.
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
    warnings: list[str] = field(default_factory=list)


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
    manifest: bool = True,
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
        manifest: write ``vlmkit-manifest.json`` and the model card. False for an internal copy nobody
            publishes (``serve --engine vllm``'s renamed view): no source file is hashed for it.

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
    source_hashes = output.hash_sources(source) if manifest else None  # in the background, beside the reads
    shards = layout_shards([TensorSpec(t.name, t.shape, t.dtype) for t in plan.targets], max_shard_size)
    bar = progress(plan.bytes_in) if progress else None
    with contextlib.ExitStack() as cleanup:
        if bar is not None:
            cleanup.callback(bar.close)
        tmp = cleanup.enter_context(output.atomic_folder(destination, force=force))
        # the other files (config, tokenizer, processor: seconds of imports) are written meanwhile;
        # leaving the block waits for them before the temporary folder is kept or removed
        extras = cleanup.enter_context(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        extras_done = extras.submit(conversion.write_extras, tmp) if conversion.write_extras else None
        with SafetensorsWriter(tmp, shards, conversion.metadata) as writer:
            for step, tensors in _stream(plan, source, cast=True, moves=True):
                for target, tensor in zip(step.targets, tensors):
                    writer.write(target.name, tensor)
                if bar is not None:
                    bar.update(step.nbytes_in)
        hashes = writer.hashes
        if extras_done is not None:
            extras_done.result()
        if manifest:
            from ..publish import card

            output.write_manifest(tmp, known_hashes=hashes, source=output.source_record(source, source_hashes),
                                  plan=plan.to_dict(),
                                  provenance={**(provenance or {}), "output": "hf", "summary": conversion.summary,
                                              "warnings": list(conversion.warnings)},
                                  assumptions=list(plan.assumptions), card=card.render)
    return Result(plan, destination, hashes)


def apply_step(step: Step, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    for op in step.ops:
        tensors = op(tensors)
    return tensors


def cast_tensors(tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """Cast each tensor to its dtype; in place when the sizes match and the memory is its own.

    bf16 <-> fp16 rewrites the tensor's own buffer slice by slice instead of allocating a
    second one. Tensors that share memory (views of one read, the same tensor twice) or
    whose element sizes differ get a fresh one.
    """
    pointers = [t.untyped_storage().data_ptr() for t in tensors]
    out = []
    for t, dtype, ptr in zip(tensors, dtypes, pointers):
        own = (t.is_contiguous() and t.storage_offset() == 0 and pointers.count(ptr) == 1
               and t.untyped_storage().nbytes() == t.numel() * t.element_size())
        if t.dtype == dtype or not own or t.element_size() != torch.empty((), dtype=dtype).element_size():
            out.append(t.to(dtype))
            continue
        flat, done = t.reshape(-1), t.reshape(-1).view(dtype)
        for i in range(0, flat.numel(), 1 << 22):  # a 4M-element slice is converted, then written back
            done[i:i + (1 << 22)] = flat[i:i + (1 << 22)].to(dtype)
        out.append(done.reshape(t.shape))
    return out


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def file_pieces(step: Step, source: TensorSource) -> list | None:
    """The output of a step that keeps a stored tensor's bytes, as pieces for the writer: ``[FileBytes]`` for a
    tensor that only moves (no op, no cast), ``[FileBytes, new rows]`` for one that also grows by rows whose
    init reads none of the old (``ResizeRows.appended``: vocabulary growth). The writer copies the stored bytes
    file to file; nothing of them is read here. None when the step changes the stored bytes or the reader
    cannot say where they lie."""
    if len(step.sources) != 1 or len(step.targets) != 1:
        return None
    (src,), (dst,) = step.sources, step.targets
    if src.dtype != dst.dtype or len(step.ops) > 1:
        return None
    where = stored_at(source, src.name)
    if where is None:
        return None
    stored = FileBytes(where[0], where[1], src.nbytes, src.dtype, tuple(src.shape))
    if not step.ops:
        return [stored] if tuple(src.shape) == tuple(dst.shape) else None
    op = step.ops[0]
    new = op.appended(tuple(src.shape), DTYPES[src.dtype]) if isinstance(op, ResizeRows) else None
    return None if new is None else [stored, new]


def _stream(plan: Plan, source: TensorSource, *, cast: bool = False, moves: bool = False, depth: int = READ_AHEAD):
    """Yield (step, output tensors) while a reader thread prepares up to ``depth`` steps ahead.

    The reader reads each step's sources, applies its ops and (``cast``) casts to the target
    dtypes; a bounded queue holds what it finished. With ``moves``, a step that keeps a stored
    tensor's bytes yields them as pieces instead, unread (``file_pieces``; ``SafetensorsWriter``
    copies them file to file). An error in the reader is raised here,
    in the caller; when the caller stops early (an error while writing, Ctrl-C), the reader
    is told to stop and joined before this returns, so no thread outlives the conversion.
    """
    return_freed_buffers()  # each tensor's buffers go back to the OS when freed: memory is what the queue holds
    steps = list(plan.steps)
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for step in steps:
                if stop.is_set():
                    return
                pieces = file_pieces(step, source) if moves else None
                if pieces is not None:
                    tensors = [pieces]
                else:
                    tensors = apply_step(step, [source.read(i.name) for i in step.sources])
                    if cast:
                        tensors = cast_tensors(tensors, [DTYPES[t.dtype] for t in step.targets])
                if not put((step, tensors)):
                    return
                del tensors
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            put(_Failed(e))

    reader = threading.Thread(target=read, name="vlmkit-reader", daemon=True)
    reader.start()
    try:
        for _ in steps:
            item = ready.get()
            if isinstance(item, _Failed):
                raise item.error
            yield item
            del item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a reader waiting to put, and drop what it prepared
                ready.get_nowait()
        reader.join()
