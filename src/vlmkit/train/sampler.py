"""LLaVA's ``group_by_modality_length`` sampler (``llava/train/llava_trainer.py``), reproducible on resume.

Records are shuffled, cut into megabatches of ``batch_size x world_size`` (LLaVA passes
``world_size x gradient_accumulation_steps`` as the world size), each megabatch sorted by length
(longest first) and split into ``world_size`` chunks of similar total length. With
``group_by_modality``, image and text-only records are grouped apart (lengths > 0 and < 0) and
their megabatches shuffled together; the two last, incomplete megabatches go at the end, merged.

One deliberate difference: the original draws the inner shuffles from torch's global random
state (``generator=None``), so a resumed run would see another order. Here every shuffle uses
one generator seeded with ``seed + epoch`` (``set_epoch``), so ``--resume`` replays the same order.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: list[int], lengths: list[int], chunks: int) -> list[list[int]]:
    """Deal ``indices`` (longest first) into ``chunks`` lists of equal count and similar total length."""
    if len(indices) % chunks != 0:
        return [indices[i::chunks] for i in range(chunks)]
    per_chunk = len(indices) // chunks
    out: list[list[int]] = [[] for _ in range(chunks)]
    totals = [0.0] * chunks
    for index in indices:
        shortest = totals.index(min(totals))
        out[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(out[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return out


def length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                           generator: torch.Generator | None) -> list[int]:
    """``get_length_grouped_indices``."""
    indices = torch.randperm(len(lengths), generator=generator)
    size = world_size * batch_size
    megabatches = [sorted(indices[i:i + size].tolist(), key=lambda j: lengths[j], reverse=True)
                   for i in range(0, len(lengths), size)]
    return [i for mb in megabatches for chunk in split_to_even_chunks(mb, lengths, world_size) for i in chunk]


def modality_length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                                    generator: torch.Generator | None) -> list[int]:
    """``get_modality_length_grouped_indices``: image records (> 0) and text records (< 0) apart."""
    if any(n == 0 for n in lengths):
        raise ValueError("a record has no words (length 0); `vlmkit data check` reports it as an empty turn")
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    mm = [(i, n) for i, n in enumerate(lengths) if n > 0]
    lang = [(i, -n) for i, n in enumerate(lengths) if n < 0]
    size = world_size * batch_size

    def megabatches(group: list[tuple[int, int]]) -> list[list[int]]:
        order = length_grouped_indices([n for _, n in group], batch_size, world_size, generator)
        shuffled = [group[j][0] for j in order]
        return [shuffled[i:i + size] for i in range(0, len(shuffled), size)]

    mm_batches, lang_batches = megabatches(mm), megabatches(lang)
    last = mm_batches[-1] + lang_batches[-1]
    full = mm_batches[:-1] + lang_batches[:-1]
    full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if last:
        full.append(sorted(last))
    return [i for mb in full for i in mb]


class ModalityLengthSampler(Sampler[int]):
    """``LengthGroupedSampler(group_by_modality=True)`` with a per-epoch seed.

    Args:
        lengths: ``LlavaDataset.modality_lengths``.
        batch_size: per-device batch size.
        world_size: processes x gradient accumulation steps (as LLaVA passes it).
        seed: the run's seed.
    """

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int):
        self.lengths, self.batch_size, self.world_size, self.seed = lengths, batch_size, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
