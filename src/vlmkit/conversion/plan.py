"""Rules + a source listing -> an explicit, checked plan, before any byte is read.

The plan is a value: the same object drives ``--dry-run``, the shard layout, the
execution and the manifest. ``compile_plan`` collects every problem it finds (an
unclaimed tensor, a missing fuse partner, a duplicate or missing target, a shape
that does not fit) and raises them together in one ``PlanError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanError
from ..tensors import FLOAT_CODES, TensorInfo, element_size
from .rules import Op, Rule, op_label


@dataclass(frozen=True)
class Target:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Step:
    """Read ``sources``, apply ``ops``, write ``targets`` (cast to their dtypes)."""

    rule: str
    sources: tuple[TensorInfo, ...]
    ops: tuple[Op, ...]
    targets: tuple[Target, ...]

    @property
    def nbytes_in(self) -> int:
        return sum(s.nbytes for s in self.sources)


@dataclass(frozen=True)
class Drop:
    source: TensorInfo
    why: str


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    drops: tuple[Drop, ...]
    assumptions: tuple[str, ...] = ()  # values no source file states, each with its origin (Conversion.assumptions)

    @property
    def targets(self) -> list[Target]:
        return [t for s in self.steps for t in s.targets]

    @property
    def bytes_in(self) -> int:
        return sum(s.nbytes_in for s in self.steps)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.targets)

    def to_dict(self) -> dict:
        """A JSON-ready description (used by ``--dry-run --json`` and the manifest)."""
        return {
            "steps": [
                {
                    "rule": s.rule,
                    "sources": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "file": i.file.name}
                                for i in s.sources],
                    "ops": [op_label(op) for op in s.ops],
                    "targets": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in s.targets],
                }
                for s in self.steps
            ],
            "drops": [{"name": d.source.name, "why": d.why} for d in self.drops],
            "assumptions": list(self.assumptions),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    def render(self) -> str:
        """The human table of ``--dry-run``: source -> op -> target, shapes, dtypes, bytes."""
        lines = []
        for s in self.steps:
            src = " + ".join(f"{i.name} {list(i.shape)} {i.dtype}" for i in s.sources)
            ops = ", ".join(op_label(op) for op in s.ops) or ("rename" if s.sources[0].name != s.targets[0].name else "copy")
            for t in s.targets:
                lines.append(f"{src}\n    -> {ops} -> {t.name} {list(t.shape)} {t.dtype} ({human_bytes(t.nbytes)})")
        for d in self.drops:
            lines.append(f"{d.source.name} {list(d.source.shape)} {d.source.dtype}\n    -> dropped: {d.why}")
        lines.append(
            f"{len(self.steps)} step(s), {len(self.targets)} target tensor(s), {len(self.drops)} dropped; "
            f"read {human_bytes(self.bytes_in)}, write {human_bytes(self.bytes_out)}"
        )
        lines += [f"assumed: {a}" for a in self.assumptions]
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)




def compile_plan(
    rules: list[Rule],
    sources: list[TensorInfo],
    *,
    dtype: str | None = None,
    expected: dict[str, tuple[int, ...]] | None = None,
    keep_dtype: frozenset[str] = frozenset(),
) -> Plan:
    """Match every source tensor to a rule and check the result.

    Rules are tried in order and the first whose pattern matches claims the tensor
    (so specific rules and drops come before catch-alls).

    Args:
        rules: the conversion.
        sources: the source listing (names, shapes, dtypes; no data).
        dtype: cast floating-point targets to this safetensors code (None keeps them).
        expected: target name -> shape that must be produced exactly (e.g. from the
            target model's config); None skips that check.
        keep_dtype: target names never cast (e.g. tensors that must stay float32).

    Raises:
        PlanError: with every problem found; nothing has been read or written.
    """
    problems: list[str] = []
    # (rule index, captures) -> slot index -> source info; rules that create tensors have one empty instance
    instances: dict[tuple[int, tuple], dict[int, TensorInfo]] = {(i, ()): {} for i, r in enumerate(rules) if r.creates}
    order: list[tuple[int, tuple]] = list(instances)
    drops: list[Drop] = []
    for info in sources:
        claimed = False
        for r_index, rule in enumerate(rules):
            for slot, pattern in enumerate(rule.sources):
                captures = pattern.match(info.name)
                if captures is None:
                    continue
                claimed = True
                if rule.is_drop:
                    drops.append(Drop(info, rule.why))
                else:
                    key = (r_index, tuple(sorted(captures.items())))
                    if key not in instances:
                        instances[key] = {}
                        order.append(key)
                    instances[key][slot] = info
                break
            if claimed:
                break
        if not claimed:
            problems.append(f"no rule claims source tensor '{info.name}' {list(info.shape)} {info.dtype}")

    steps: list[Step] = []
    for key in order:
        r_index, captures = key
        rule, found = rules[r_index], instances[key]
        names = dict(captures)
        missing = [rule.sources[i].format(names) for i in range(len(rule.sources)) if i not in found]
        if missing:
            have = ", ".join(f"'{i.name}'" for i in found.values())
            problems.append(f"rule {rule.name}: found {have} but not {', '.join(repr(m) for m in missing)}")
            continue
        infos = tuple(found[i] for i in range(len(rule.sources)))
        dtypes = {i.dtype for i in infos} or {"F32"}
        mixable = bool(rule.ops) and rule.ops[0].mixed_dtypes and dtypes <= FLOAT_CODES
        if len(dtypes) > 1 and not mixable:
            problems.append(f"rule {rule.name}: sources {[i.name for i in infos]} mix dtypes {sorted(dtypes)}")
            continue
        shapes = [i.shape for i in infos]
        try:
            for op in rule.ops:
                shapes = op.shapes(shapes)
        except ValueError as e:
            problems.append(f"rule {rule.name} on {[i.name for i in infos]}: {e}")
            continue
        src_dtype = infos[0].dtype if infos else "F32"  # mixed: the first source's (e.g. the weight a LoRA modifies)
        targets = []
        for pattern, shape in zip(rule.targets, shapes):
            name = pattern.format(names)
            cast = dtype if (dtype and src_dtype in FLOAT_CODES and name not in keep_dtype) else src_dtype
            targets.append(Target(name, tuple(shape), cast))
        steps.append(Step(rule.name, infos, rule.ops, tuple(targets)))

    seen: dict[str, str] = {}
    for step in steps:
        for t in step.targets:
            if t.name in seen:
                problems.append(f"target '{t.name}' is produced twice (rules {seen[t.name]} and {step.rule})")
            seen[t.name] = step.rule

    if expected is not None:
        produced = {t.name: t for s in steps for t in s.targets}
        for name, shape in expected.items():
            if name not in produced:
                problems.append(f"expected target '{name}' {list(shape)} is not produced by any rule")
            elif tuple(produced[name].shape) != tuple(shape):
                problems.append(
                    f"target '{name}' would be {list(produced[name].shape)} but the target model expects {list(shape)}"
                )
        for name in produced:
            if name not in expected:
                problems.append(f"target '{name}' is not a tensor of the target model")

    if problems:
        raise PlanError("the conversion plan does not check out; nothing was read or written", problems,
                        hint="`vlmkit convert SRC DST --dry-run` prints the plan; `vlmkit inspect SRC` lists the source")
    return Plan(tuple(steps), tuple(drops))
