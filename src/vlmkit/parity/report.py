"""A parity report: each check measured, compared with its tolerance, and a verdict.

Families fill a ``Report`` with ``Check``s (pixel values, token ids, logits,
generations); the CLI prints it, writes it as JSON or Markdown, and exits non-zero when
any check fails.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass
class Check:
    """One measured comparison.

    Attributes:
        name: what was compared ("pixel values", "logits", ...).
        passed: whether ``measured`` is within ``tolerance``.
        measured: the numbers (max abs diff, cosine, lengths...).
        tolerance: the rule, in words ("max abs diff <= 1e-4").
        detail: where it differs first, or a note.
    """

    name: str
    passed: bool
    measured: dict
    tolerance: str
    detail: str = ""


@dataclass
class Report:
    title: str
    original: str
    converted: str
    inputs: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # what the reference rests on that no file of the original states: a passing report with any
    # of these proves the conversion only as far as they are true, so it is never a plain PASS
    assumptions: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def verdict(self) -> str:
        failed = [c.name for c in self.checks if not c.passed]
        if not self.passed:
            return f"FAIL ({', '.join(failed) or 'no checks ran'})"
        if self.assumptions:
            return (f"CONDITIONAL PASS (true only if the {len(self.assumptions)} assumed value(s) above are: no file "
                    "of the original states them)")
        return "PASS"

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "verdict": self.verdict}

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The report ``to_dict`` wrote (derived fields such as ``verdict`` are recomputed)."""
        known = {f.name for f in fields(cls)}
        report = cls(**{k: v for k, v in data.items() if k in known})
        report.checks = [Check(**{k: v for k, v in c.items() if k in {f.name for f in fields(Check)}})
                         for c in data.get("checks") or []]
        return report

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", f"- original: `{self.original}`", f"- converted: `{self.converted}`"]
        lines += [f"- {k}: {v}" for k, v in self.inputs.items()]
        lines += ["", "| check | result | measured | tolerance | detail |", "|---|---|---|---|---|"]
        for c in self.checks:
            measured = ", ".join(f"{k}={_fmt(v)}" for k, v in c.measured.items())
            lines.append(f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {measured} | {c.tolerance} | {c.detail} |")
        lines += [""] + [f"> {n}" for n in self.notes] + [f"> assumed: {a}" for a in self.assumptions]
        lines += ["", f"**Verdict: {self.verdict}**", ""]
        return "\n".join(lines)

    def render(self) -> str:
        width = max((len(c.name) for c in self.checks), default=10)
        lines = [self.title, f"  original:  {self.original}", f"  converted: {self.converted}"]
        lines += [f"  {k}: {v}" for k, v in self.inputs.items()]
        for c in self.checks:
            measured = ", ".join(f"{k}={_fmt(v)}" for k, v in c.measured.items())
            lines.append(f"  [{'pass' if c.passed else 'FAIL'}] {c.name:<{width}}  {measured}  ({c.tolerance})"
                         + (f"\n         {c.detail}" if c.detail else ""))
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  assumed: {a}" for a in self.assumptions]
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def compare_tensors(name: str, reference: torch.Tensor, candidate: torch.Tensor, *, atol: float,
                    min_cosine: float | None = None) -> Check:
    """Max abs diff (and cosine) of two tensors of the same shape."""
    if tuple(reference.shape) != tuple(candidate.shape):
        return Check(name, False, {"reference_shape": list(reference.shape), "candidate_shape": list(candidate.shape)},
                     f"same shape, max abs diff <= {atol:g}", "shapes differ")
    a, b = reference.double().flatten(), candidate.double().flatten()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    measured = {"max_abs_diff": diff}
    passed = diff <= atol
    tolerance = f"max abs diff <= {atol:g}"
    if min_cosine is not None:
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() else 1.0
        measured["cosine"] = cosine
        passed = passed and cosine >= min_cosine
        tolerance += f", cosine >= {min_cosine:g}"
    detail = ""
    if not passed and a.numel():
        index = int((a - b).abs().argmax())
        detail = f"largest difference at flat index {index}: {float(a[index]):.6g} vs {float(b[index]):.6g}"
    return Check(name, passed, measured, tolerance, detail)


def compare_ids(name: str, reference: list[int], candidate: list[int], *, decode=None) -> Check:
    """Token ids equal, or the first position where they differ."""
    n = min(len(reference), len(candidate))
    first = next((i for i in range(n) if reference[i] != candidate[i]), None)
    if first is None and len(reference) != len(candidate):
        first = n
    measured = {"length": len(reference), "candidate_length": len(candidate)}
    if first is None:
        return Check(name, True, measured, "identical")
    ref_tok = reference[first] if first < len(reference) else None
    cand_tok = candidate[first] if first < len(candidate) else None
    detail = f"first difference at position {first}: {ref_tok} vs {cand_tok}"
    if decode is not None:
        detail += f" ({decode([t for t in (ref_tok,) if t is not None and t >= 0])!r} vs " \
                  f"{decode([t for t in (cand_tok,) if t is not None and t >= 0])!r})"
    measured["first_difference"] = first
    return Check(name, False, measured, "identical", detail)
