"""Conversions as data: name patterns, small invertible ops, and immutable rules.

Patterns are dotted literals with named captures, never raw regex:

* ``{layer}`` captures an integer index (``model.layers.{layer}.mlp.up_proj.weight``);
* ``{rest:path}`` captures any non-empty dotted remainder (``vision_tower.{rest:path}``).

A rule maps one or more source patterns to zero or more target patterns through a
chain of ops. Every op knows its inverse, so ``reverse(rules)`` converts back.

Example:
    >>> RULES = [
    ...     drop("model.layers.{layer}.self_attn.rotary_emb.inv_freq", why="recomputed at load"),
    ...     rename("model.{rest:path}", "language_model.model.{rest:path}"),
    ... ]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..lazy import torch

_PLACEHOLDER = re.compile(r"\{(\w+)(?::(path))?\}")


@dataclass(frozen=True)
class Pattern:
    """A tensor-name pattern. ``match`` returns the captures or None; ``format`` fills them in."""

    text: str
    regex: re.Pattern = field(init=False, repr=False, compare=False)
    placeholders: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        parts, names, pos = [], [], 0
        for m in _PLACEHOLDER.finditer(self.text):
            parts.append(re.escape(self.text[pos:m.start()]))
            name = m.group(1)
            if name in names:
                raise ValueError(f"pattern {self.text!r} uses {{{name}}} twice")
            names.append(name)
            parts.append(f"(?P<{name}>.+)" if m.group(2) == "path" else f"(?P<{name}>\\d+)")
            pos = m.end()
        parts.append(re.escape(self.text[pos:]))
        if "{" in _PLACEHOLDER.sub("", self.text) or "}" in _PLACEHOLDER.sub("", self.text):
            raise ValueError(f"pattern {self.text!r} has a malformed placeholder; use {{name}} or {{name:path}}")
        object.__setattr__(self, "regex", re.compile("^" + "".join(parts) + "$"))
        object.__setattr__(self, "placeholders", frozenset(names))

    def match(self, name: str) -> dict[str, str] | None:
        m = self.regex.match(name)
        return m.groupdict() if m else None

    def format(self, captures: dict[str, str]) -> str:
        return _PLACEHOLDER.sub(lambda m: captures[m.group(1)], self.text)

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------- ops


class Op:
    """A step between source tensors and target tensors.

    ``count(n)`` says how many tensors come out of ``n`` going in (raising ValueError
    when ``n`` does not fit); ``shapes`` does the same for shapes at plan time so that
    every mismatch is found before any data is read.

    ``mixed_dtypes`` says the op takes floating-point sources of different dtypes (the
    plan refuses that otherwise, e.g. a fuse of F16 and F32 halves); the result takes the
    first source's dtype unless ``--dtype`` asks for another.
    """

    mixed_dtypes: bool = False

    def count(self, n: int) -> int:
        if n != 1:
            raise ValueError(f"{self} takes one tensor, got {n}")
        return 1

    def shapes(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def inverse(self) -> "Op":
        raise NotImplementedError(f"{self} has no inverse")


@dataclass(frozen=True)
class Concat(Op):
    """Fuse ``parts`` tensors into one along ``dim`` (e.g. q, k, v -> qkv)."""

    dim: int
    parts: int

    def count(self, n: int) -> int:
        if n != self.parts:
            raise ValueError(f"{self} expects {self.parts} tensors, got {n}")
        return 1

    def shapes(self, shapes):
        first = shapes[0]
        for s in shapes[1:]:
            if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != self.dim % len(first)):
                raise ValueError(f"cannot concatenate shapes {shapes} along dim {self.dim}")
        d = self.dim % len(first)
        return [tuple(sum(s[d] for s in shapes) if i == d else x for i, x in enumerate(first))]

    def __call__(self, tensors):
        return [torch.cat(tensors, dim=self.dim)]

    @property
    def inverse(self) -> Op:
        return Chunk(self.dim, self.parts)


@dataclass(frozen=True)
class Chunk(Op):
    """Split one tensor into ``parts`` equal pieces along ``dim`` (qkv -> q, k, v)."""

    dim: int
    parts: int

    def count(self, n: int) -> int:
        if n != 1:
            raise ValueError(f"{self} takes one tensor, got {n}")
        return self.parts

    def shapes(self, shapes):
        (s,) = shapes
        d = self.dim % len(s)
        if s[d] % self.parts:
            raise ValueError(f"dim {self.dim} of {s} does not split into {self.parts} equal parts")
        return [tuple(x // self.parts if i == d else x for i, x in enumerate(s))] * self.parts

    def __call__(self, tensors):
        return [t.contiguous() for t in torch.chunk(tensors[0], self.parts, dim=self.dim)]

    @property
    def inverse(self) -> Op:
        return Concat(self.dim, self.parts)


@dataclass(frozen=True)
class Permute(Op):
    """Reorder dimensions (``Permute((1, 0))`` transposes a matrix)."""

    dims: tuple[int, ...]

    def shapes(self, shapes):
        (s,) = shapes
        if len(s) != len(self.dims):
            raise ValueError(f"cannot permute {len(s)}-d shape {s} with {self.dims}")
        return [tuple(s[d] for d in self.dims)]

    def __call__(self, tensors):
        return [tensors[0].permute(self.dims).contiguous()]

    @property
    def inverse(self) -> Op:
        return Permute(tuple(sorted(range(len(self.dims)), key=lambda i: self.dims[i])))


@dataclass(frozen=True)
class Reshape(Op):
    """View a tensor with another shape of the same size (e.g. ``[d]`` <-> ``[1, d]``)."""

    shape: tuple[int, ...]
    original: tuple[int, ...]

    def shapes(self, shapes):
        (s,) = shapes
        if tuple(s) != self.original:
            raise ValueError(f"expected shape {self.original}, got {s}")
        return [self.shape]

    def __call__(self, tensors):
        return [tensors[0].reshape(self.shape)]

    @property
    def inverse(self) -> Op:
        return Reshape(self.original, self.shape)


# (existing rows, how many new, generator) -> the new rows. An init whose attribute ``reads_rows`` is False uses
# only the dtype and width of ``existing`` (it may then be given no rows): the stored rows can then be copied
# file to file and only the new ones computed (``ResizeRows.appended``).
RowInit = Callable[["torch.Tensor", int, "torch.Generator"], "torch.Tensor"]


def zero_rows(existing: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return existing.new_zeros((n, *existing.shape[1:]))


zero_rows.reads_rows = False


@dataclass(frozen=True)
class ResizeRows(Op):
    """Grow (new rows from ``init``) or shrink (keep the first rows) dim 0.

    Vocabulary growth for added tokens; the inverse shrinks back.
    """

    before: int
    after: int
    init: RowInit = zero_rows
    seed: int = 0

    def shapes(self, shapes):
        (s,) = shapes
        if s[0] != self.before:
            raise ValueError(f"expected {self.before} rows, got shape {s}")
        return [(self.after, *s[1:])]

    def __call__(self, tensors):
        (t,) = tensors
        if self.after <= self.before:
            return [t[: self.after].contiguous()]
        generator = torch.Generator().manual_seed(self.seed)
        new = self.init(t, self.after - self.before, generator).to(t.dtype)
        return [torch.cat([t, new], dim=0)]

    def appended(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The new rows alone (what ``__call__`` appends, bit for bit), when computing them reads no existing row;
        None for a shrink or an init that reads the rows."""
        if self.after <= self.before or getattr(self.init, "reads_rows", True):
            return None
        generator = torch.Generator().manual_seed(self.seed)
        return self.init(torch.empty((0, *shape[1:]), dtype=dtype), self.after - self.before, generator).to(dtype)

    @property
    def inverse(self) -> Op:
        return ResizeRows(self.after, self.before)


@dataclass(frozen=True)
class Custom(Op):
    """A named function for the rare case no small op covers.

    Args:
        name: shown in plans and errors.
        fn: tensors -> tensors.
        shape_fn: shapes -> shapes (plan-time check).
        inverse_op: optional Custom that undoes this one.
        mixed_dtypes: accepts sources of different float dtypes (see ``Op``).
    """

    name: str
    fn: Callable[[list[torch.Tensor]], list[torch.Tensor]] = field(compare=False)
    shape_fn: Callable[[list[tuple[int, ...]]], list[tuple[int, ...]]] = field(compare=False)
    n_in: int = 1
    n_out: int = 1
    inverse_op: "Custom | None" = field(default=None, compare=False)
    mixed_dtypes: bool = False

    def count(self, n: int) -> int:
        if n != self.n_in:
            raise ValueError(f"{self.name} takes {self.n_in} tensor(s), got {n}")
        return self.n_out

    def shapes(self, shapes):
        return self.shape_fn(shapes)

    def __call__(self, tensors):
        return self.fn(tensors)

    @property
    def inverse(self) -> Op:
        if self.inverse_op is None:
            raise NotImplementedError(f"custom op {self.name} has no inverse")
        return self.inverse_op

    def __str__(self) -> str:
        return self.name


def lora_merge(scale: float) -> Custom:
    """``(W, lora_A, lora_B) -> W + scale * B @ A`` as peft's ``merge_and_unload`` computes it.

    peft upcasts float16/bfloat16 adapters to float32, computes the delta in float32 and adds
    it to the base weight in float32; so here, from the tensors as stored (any float dtypes).
    The float32 sum is rounded once, to the target's dtype (the base's unless ``--dtype``): the
    merged result of the base loaded in that dtype bit for bit whenever the base's values are exact
    in it, e.g. the base's own dtype or float32. (Loading a float32 base in float16 rounds it
    first, so there ``--dtype float16`` can differ by one float16 step.)
    """

    def merge(tensors):
        w, a, b = tensors
        return [w.float() + scale * (b.float() @ a.float())]

    def shapes(s):
        w, a, b = s
        if a[1] != w[1] or b[0] != w[0] or a[0] != b[1]:
            raise ValueError(f"LoRA factors {a} / {b} do not fit the weight {w}")
        return [w]

    return Custom(f"merge LoRA (scale {scale:g})", merge, shapes, n_in=3, n_out=1, mixed_dtypes=True)


def op_label(op: Op) -> str:
    """Short text for plans: ``concat(dim=0)``, ``permute(1, 0)``, ``rows 32000->32064``."""
    if isinstance(op, Concat):
        return f"concat(dim={op.dim})"
    if isinstance(op, Chunk):
        return f"chunk({op.parts}, dim={op.dim})"
    if isinstance(op, Permute):
        return f"permute{op.dims}"
    if isinstance(op, Reshape):
        return f"reshape{op.shape}"
    if isinstance(op, ResizeRows):
        return f"rows {op.before}->{op.after}"
    return str(op)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """Source patterns -> ops -> target patterns. Immutable and checked when built.

    A rule without targets is a deliberate drop and must say why.
    """

    sources: tuple[Pattern, ...]
    targets: tuple[Pattern, ...]
    ops: tuple[Op, ...] = ()
    why: str = ""

    def __post_init__(self):
        if not self.sources:
            if not (self.ops and isinstance(self.ops[0], Custom) and self.ops[0].n_in == 0):
                raise ValueError("a rule needs a source pattern, or a Custom op that creates its tensors")
            if any(t.placeholders for t in self.targets) or not self.why:
                raise ValueError("a rule that creates tensors needs literal target names and a reason")
        elif not self.targets:
            if self.ops:
                raise ValueError(f"drop rule {self.name} cannot have ops")
            if not self.why:
                raise ValueError(f"drop rule {self.name} must say why the tensor is dropped")
            return
        placeholders = self.sources[0].placeholders if self.sources else frozenset()
        if any(p.placeholders != placeholders for p in self.sources[1:]):
            raise ValueError(f"rule {self.name}: every source pattern must capture the same names")
        for t in self.targets:
            if not t.placeholders <= placeholders:
                raise ValueError(f"rule {self.name}: target {t} uses a name no source captures")
        n = len(self.sources)
        for op in self.ops:
            n = op.count(n)
        if n != len(self.targets):
            raise ValueError(f"rule {self.name}: ops produce {n} tensor(s) for {len(self.targets)} target(s)")

    @property
    def name(self) -> str:
        return str(self.sources[0]) if self.sources else f"create {self.targets[0]}"

    @property
    def is_drop(self) -> bool:
        return not self.targets

    @property
    def creates(self) -> bool:
        return not self.sources

    def reversed(self) -> "Rule":
        """The same rule read backwards: targets -> inverse ops -> sources."""
        if self.is_drop:
            raise ValueError(f"drop rule {self.name} cannot run backwards: the tensor is gone")
        if self.creates:
            return Rule(self.targets, (), why=f"created by the forward conversion: {self.why}")
        return Rule(self.targets, self.sources, tuple(op.inverse for op in reversed(self.ops)))


def _patterns(names) -> tuple[Pattern, ...]:
    return tuple(Pattern(n) for n in ([names] if isinstance(names, str) else names))


def rename(source: str, target: str) -> Rule:
    """One tensor to one tensor, bytes unchanged."""
    return Rule(_patterns(source), _patterns(target))


def drop(source: str, *, why: str) -> Rule:
    """Consume a tensor deliberately without writing it, with the reason."""
    return Rule(_patterns(source), (), why=why)


def fuse(sources: list[str], target: str, *, dim: int = 0) -> Rule:
    """Several tensors concatenated into one along ``dim``."""
    return Rule(_patterns(sources), _patterns(target), (Concat(dim, len(sources)),))


def split(source: str, targets: list[str], *, dim: int = 0) -> Rule:
    """One tensor cut into equal parts along ``dim``."""
    return Rule(_patterns(source), _patterns(targets), (Chunk(dim, len(targets)),))


def transpose(source: str, target: str, dims: tuple[int, ...] = (1, 0)) -> Rule:
    """One tensor with its dimensions reordered."""
    return Rule(_patterns(source), _patterns(target), (Permute(tuple(dims)),))


def transform(sources: str | list[str], targets: str | list[str], *ops: Op) -> Rule:
    """The general form: any chain of ops (e.g. ``ResizeRows`` or a ``Custom``)."""
    return Rule(_patterns(sources), _patterns(targets), tuple(ops))


def create(target: str, shape: tuple[int, ...], fn: Callable[[], torch.Tensor], *, why: str) -> Rule:
    """A tensor the source does not have, made by ``fn`` (e.g. an identity matrix), with the reason."""
    op = Custom(f"create {target}", lambda _: [fn()], lambda _: [tuple(shape)], n_in=0, n_out=1)
    return Rule((), _patterns(target), (op,), why=why)


def reverse(rules: list[Rule]) -> list[Rule]:
    """Rules that convert the targets back into the sources; drops cannot be reversed."""
    return [r.reversed() for r in rules if not r.is_drop]
