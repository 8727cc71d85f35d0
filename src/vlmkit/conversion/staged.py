"""A checked plan read as a source: the first stage of a two-stage conversion.

A family that already knows how to reach one layout (original LLaVA -> the published
transformers names, with the LoRA merge and the vocabulary growth) reaches a second one
(GGUF names) by planning from the first plan's targets. Both plans are compiled and
checked before anything is read; reading a target runs its first-stage step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tensors import DTYPES, TensorInfo, TensorSource
from .plan import Plan, Step
from .rules import Op


def _apply(ops: tuple[Op, ...], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    for op in ops:
        tensors = op(tensors)
    return tensors


class PlannedSource:
    """The targets of ``plan`` over ``source``, under their target names and dtypes.

    Example:
        >>> first = compile_plan(rules, [src.info(n) for n in src.keys()])   # doctest: +SKIP
        >>> staged = PlannedSource(first, src)                               # doctest: +SKIP
        >>> staged.info("language_model.lm_head.weight").shape               # doctest: +SKIP
        (32064, 4096)
    """

    def __init__(self, plan: Plan, source: TensorSource):
        self.plan = plan
        self.source = source
        self.path: Path = source.path
        self.format = source.format
        self._where: dict[str, tuple[Step, int]] = {
            t.name: (step, i) for step in plan.steps for i, t in enumerate(step.targets)}

    def keys(self) -> list[str]:
        return list(self._where)

    def files(self) -> list[Path]:
        return self.source.files()

    def info(self, name: str) -> TensorInfo:
        step, i = self._where[name]
        target = step.targets[i]
        file = step.sources[0].file if step.sources else self.source.path
        return TensorInfo(name, target.shape, target.dtype, target.nbytes, file)

    def read(self, name: str) -> torch.Tensor:
        step, i = self._where[name]
        tensors = _apply(step.ops, [self.source.read(s.name) for s in step.sources])
        return tensors[i].to(DTYPES[step.targets[i].dtype])

    def close(self) -> None:
        self.source.close()
