"""GGUF output: every file planned down to each tensor's ggml type, then written one tensor at a time.

A family describes each GGUF file as a ``GGUFFile``: rules from source names to GGUF
names (built from gguf-py's ``TensorNameMap``), the metadata as typed
``GGUFWriter.add_*`` calls, and the tensors whose type does not follow the one asked
for. ``plan`` compiles and checks every file, records the metadata, and chooses each
tensor's type with the reason wherever it is not the one asked for (norms and biases
stay F32, rows a block quantisation cannot split fall back to F16, ...). ``run``
writes the files into one atomic folder with a manifest: nothing is read before every
plan checks out, and at most two steps' tensors are in memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf

from .. import dtypes
from ..errors import ConfigError, PlanError
from ..tensors import TensorSource
from ..tensors.gguf_io import GGUFStreamWriter, GGUFTensorSpec
from . import gguf_folder, output
from .engine import Progress, Result, _stream
from .plan import Plan, compile_plan, human_bytes
from .rules import Pattern, Rule, op_label

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class GGUFType:
    """A type a user can ask for: the ggml type of the big matrices and the file's ``general.file_type``."""

    name: str
    ggml: T
    file_type: F

    @property
    def quantized(self) -> bool:
        return self.ggml not in (T.F32, T.F16, T.BF16)


# What gguf-py can produce (gguf.quants has no K-quant encoder); llama.cpp reads all of them.
GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("f32", T.F32, F.ALL_F32),
    GGUFType("f16", T.F16, F.MOSTLY_F16),
    GGUFType("bf16", T.BF16, F.MOSTLY_BF16),
    GGUFType("q8_0", T.Q8_0, F.MOSTLY_Q8_0),
    GGUFType("q5_1", T.Q5_1, F.MOSTLY_Q5_1),
    GGUFType("q5_0", T.Q5_0, F.MOSTLY_Q5_0),
    GGUFType("q4_1", T.Q4_1, F.MOSTLY_Q4_1),
    GGUFType("q4_0", T.Q4_0, F.MOSTLY_Q4_0),
)}
DEFAULT_TYPE = "f16"  # llama.cpp's converters default to f16 too


def gguf_type(name: str | None) -> GGUFType:
    """The ``GGUFType`` for ``--dtype NAME`` (None: f16).

    Raises:
        ConfigError: an unknown name, listing the known ones.
    """
    key = (name or DEFAULT_TYPE).strip().lower()
    if key not in GGUF_TYPES:  # float16, fp16, half, torch.bfloat16 ...: the spellings of vlmkit.dtypes
        with contextlib.suppress(ConfigError):
            key = dtypes.code(key).lower()  # "F16" -> "f16", the ggml name
    if key not in GGUF_TYPES:
        raise ConfigError(f"--dtype {name!r} is not a GGUF type vlmkit writes",
                          hint=f"use one of {', '.join(GGUF_TYPES)} (gguf-py has no K-quant encoder; "
                               "run llama.cpp's llama-quantize on the f16 file for those)")
    return GGUF_TYPES[key]


@dataclass(frozen=True)
class TypeRule:
    """Tensors named like ``pattern`` are written as ``table[asked]`` (``default`` when absent), because ``why``.

    Example:
        >>> TypeRule("v.patch_embd.weight", T.F32, "the patch convolution is never quantised",
        ...          table=((T.F16, T.F16),))                                    # doctest: +SKIP
    """

    pattern: str
    default: T
    why: str
    table: tuple[tuple[T, T], ...] = ()

    def matches(self, name: str) -> bool:
        return Pattern(self.pattern).match(name) is not None

    def choose(self, asked: T) -> T:
        return dict(self.table).get(asked, self.default)


def choose_type(name: str, shape: tuple[int, ...], asked: GGUFType, rules: list[TypeRule]) -> tuple[T, str]:
    """The ggml type of one tensor and, when it is not ``asked``, why.

    In order: the file's own ``rules``; 1-D tensors and tensors that are not ``.weight``
    matrices stay F32 (as llama.cpp's converter keeps them); a block quantisation that
    cannot split the rows falls back to F16 (as llama.cpp's converter does).
    """
    rule = next((r for r in rules if r.matches(name)), None)
    if rule is not None:
        chosen, why = rule.choose(asked.ggml), rule.why
    elif len(shape) <= 1:
        chosen, why = T.F32, "1-D (norm, bias, embedding vector): llama.cpp reads these as F32"
    elif not name.endswith(".weight"):
        chosen, why = T.F32, "not a '.weight' matrix: llama.cpp's converter keeps these F32"
    else:
        chosen, why = asked.ggml, ""
    block = gguf.GGML_QUANT_SIZES[chosen][0]
    if block > 1 and shape[-1] % block:
        chosen, why = T.F16, (f"rows of {shape[-1]} are not a multiple of {asked.ggml.name}'s block of {block}: "
                              "F16 instead, as llama.cpp's converter falls back")
    return chosen, ("" if chosen == asked.ggml else why)


MetadataWriter = Callable[[gguf.GGUFWriter, GGUFType], None]


@dataclass(frozen=True)
class GGUFOptions:
    """What ``--to gguf`` adds to the loading options.

    Attributes:
        text_only / vision_only: CLIP: write one tower only.
        image_mean / image_std: override the preprocessor's normalisation (R, G, B).
        mmproj_only: LLaVA: write only the mmproj file (no language model).
    """

    text_only: bool = False
    vision_only: bool = False
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    mmproj_only: bool = False


@dataclass
class GGUFFile:
    """One GGUF file of a conversion.

    Attributes:
        file_name: name in the output folder; ``{type}`` is replaced by the type asked for.
        arch: ``general.architecture`` ("llama", "clip").
        rules: source names -> GGUF tensor names.
        metadata: writes the key/values with the typed ``add_*`` calls (given the type asked for).
        types: tensors whose ggml type does not follow the one asked for, with the reason.
        expected: GGUF name -> shape that must be produced (None: not checked).
        source: where this file's tensors come from (None: the conversion's source).
    """

    file_name: str
    arch: str
    rules: list[Rule]
    metadata: MetadataWriter
    types: list[TypeRule] = field(default_factory=list)
    expected: dict[str, tuple[int, ...]] | None = None
    source: TensorSource | None = None

    @property
    def role(self) -> str:
        """``"model"`` or ``"mmproj"``: what llama.cpp's tools take it as, read from the name (``gguf_folder.role``)."""
        return gguf_folder.role(self.file_name)


@dataclass
class GGUFConversion:
    """What a family hands to the GGUF sink: one source and the files to write from it."""

    source: TensorSource
    files: list[GGUFFile]
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)  # as engine.Conversion's: listed in the manifest


@dataclass(frozen=True)
class FilePlan:
    """One file: the checked tensor plan, each target's ggml type (and why, if not the one asked), the metadata."""

    file: GGUFFile
    plan: Plan
    types: tuple[tuple[T, str], ...]
    metadata: dict
    file_name: str

    @property
    def specs(self) -> list[GGUFTensorSpec]:
        return [GGUFTensorSpec(t.name, t.shape, ty) for t, (ty, _) in zip(self.plan.targets, self.types)]

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.specs)


@dataclass(frozen=True)
class GGUFPlan:
    asked: GGUFType
    files: tuple[FilePlan, ...]

    @property
    def targets(self) -> list:
        return [t for f in self.files for t in f.plan.targets]

    @property
    def bytes_in(self) -> int:
        return sum(f.plan.bytes_in for f in self.files)

    @property
    def bytes_out(self) -> int:
        return sum(f.bytes_out for f in self.files)

    def fallbacks(self) -> list[tuple[str, str, str, str]]:
        """(file, tensor, type, why) for every tensor not written in the type asked for."""
        return [(f.file_name, t.name, ty.name, why)
                for f in self.files for t, (ty, why) in zip(f.plan.targets, f.types) if why]

    def to_dict(self) -> dict:
        return {"type": self.asked.name, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "files": [{
            "file": f.file_name, "arch": f.file.arch, "metadata": f.metadata,
            "tensors": [{"name": t.name, "shape": list(t.shape), "type": ty.name, **({"why": why} if why else {}),
                         "from": [s.name for s in step.sources], "ops": [op_label(op) for op in step.ops]}
                        for step, (t, (ty, why)) in _targets_with_steps(f)],
            "drops": [{"name": d.source.name, "why": d.why} for d in f.plan.drops],
        } for f in self.files]}

    def render(self) -> str:
        """The ``--dry-run`` table: each tensor with its type and source, then why some are not in the type asked."""
        lines = []
        for f in self.files:
            lines.append(f"{f.file_name} ({f.file.arch}, {len(f.plan.targets)} tensors, "
                         f"{human_bytes(f.bytes_out)}, {len(f.metadata)} metadata keys)")
            reasons: dict[tuple[str, str], list[str]] = {}
            for step, (t, (ty, why)) in _targets_with_steps(f):
                src = " + ".join(s.name for s in step.sources) or "(created)"
                ops = ", ".join(op_label(op) for op in step.ops)
                lines.append(f"  {t.name} {list(t.shape)} {ty.name}  <- {src}{f' [{ops}]' if ops else ''}")
                if why:
                    reasons.setdefault((ty.name, why), []).append(t.name)
            for d in f.plan.drops:
                lines.append(f"  dropped {d.source.name}: {d.why}")
            for (ty, why), names in reasons.items():
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                lines.append(f"  {ty} instead of {self.asked.name} for {len(names)} tensor(s) ({shown}): {why}")
        lines.append(f"{len(self.files)} GGUF file(s), {len(self.targets)} tensors as {self.asked.name}, "
                     f"{len(self.fallbacks())} in another type (reasons above); "
                     f"read {human_bytes(self.bytes_in)}, write {human_bytes(self.bytes_out)}")
        return "\n".join(lines)


def _targets_with_steps(f: FilePlan):
    pairs = [(step, t) for step in f.plan.steps for t in step.targets]
    return [(step, (t, ty)) for (step, t), ty in zip(pairs, f.types)]


def _metadata_of(file: GGUFFile, asked: GGUFType) -> dict:
    """Run the metadata writer on a writer that is never opened: the keys, checked before any file exists."""
    writer = gguf.GGUFWriter(None, file.arch)
    file.metadata(writer, asked)
    values = {}
    for key, value in writer.kv_data[0].items():
        v = value.value
        if isinstance(v, (list, tuple)) and len(v) > 16:
            v = f"<{len(v)} values>"
        elif isinstance(v, (bytes, bytearray)):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, str) and len(v) > 200:
            v = v[:200] + "..."
        values[key] = v
    return values


def plan(conversion: GGUFConversion, type_name: str | None = None) -> GGUFPlan:
    """Compile and check every file of ``conversion``; reads no tensor data.

    Raises:
        PlanError: every problem of every file, prefixed with the file name.
        ConfigError: an unknown type.
    """
    asked = gguf_type(type_name)
    problems: list[str] = []
    files = []
    for f in conversion.files:
        source = f.source or conversion.source
        try:
            p = compile_plan(f.rules, [source.info(n) for n in source.keys()], expected=f.expected)
        except PlanError as e:
            problems += [f"{f.file_name.format(type=asked.name)}: {p}" for p in e.problems]
            continue
        types = tuple(choose_type(t.name, t.shape, asked, f.types) for t in p.targets)
        files.append(FilePlan(f, p, types, _metadata_of(f, asked), f.file_name.format(type=asked.name)))
    if problems:
        raise PlanError("the GGUF plan does not check out; nothing was read or written", problems,
                        hint="`vlmkit convert SRC DST --to gguf --dry-run` prints the plan")
    return GGUFPlan(asked, tuple(files))


def run(conversion: GGUFConversion, destination: str | Path, *, type_name: str | None = None, force: bool = False,
        dry_run: bool = False, progress: Callable[[int], Progress] | None = None,
        provenance: dict | None = None) -> Result:
    """Write every GGUF file of ``conversion`` into the folder ``destination``, atomically, with a manifest.

    Args:
        conversion: the files (see ``GGUFConversion``).
        destination: output folder; must not exist unless ``force``.
        type_name: the type asked for ("f32", "f16", "bf16", "q8_0", ...; None: f16).
        force: replace an existing destination (at the end, atomically).
        dry_run: compile and check the plan, write nothing.
        progress: as for ``engine.run``.
        provenance: as for ``engine.run``.

    Returns:
        ``Result`` whose ``plan`` is the ``GGUFPlan``.

    Raises:
        PlanError / ConfigError: before anything is read.
        OutputError: the destination is refused, or a tensor does not fit its type (nothing left behind).
    """
    destination = Path(destination)
    checked = plan(conversion, type_name)
    sources = {id(f.file.source or conversion.source): f.file.source or conversion.source for f in checked.files}
    output.check_destination(destination, [p for s in sources.values() for p in s.files()], force=force)
    if dry_run:
        return Result(checked, None, {})
    source_hashes = output.hash_sources(conversion.source)  # in the background, overlapping the conversion's reads
    bar = progress(checked.bytes_in) if progress else None
    hashes: dict[str, str] = {}
    with contextlib.ExitStack() as cleanup:
        if bar is not None:
            cleanup.callback(bar.close)
        tmp = cleanup.enter_context(output.atomic_folder(destination, force=force))
        for f in checked.files:
            source = f.file.source or conversion.source
            writer = GGUFStreamWriter(tmp / f.file_name, f.file.arch, f.specs)
            f.file.metadata(writer.kv, checked.asked)
            writer.begin()
            for step, tensors in _stream(f.plan, source):
                for target, tensor in zip(step.targets, tensors):
                    writer.write(target.name, tensor)
                if bar is not None:
                    bar.update(step.nbytes_in)
            hashes.update(writer.close())
        from ..publish import card

        first = getattr(conversion.source, "plan", None)  # a staged source: its first plan (vocabulary, drops)
        output.write_manifest(tmp, known_hashes=hashes, source=output.source_record(conversion.source, source_hashes),
                              plan={**checked.to_dict(), **({"first_stage": first.to_dict()} if first else {})},
                              provenance={**(provenance or {}), "output": "gguf", "summary": conversion.summary},
                              assumptions=list(conversion.assumptions), card=card.render)
    return Result(checked, destination, hashes)
