"""Training batches: the data package's examples, the runtime's pixels, LLaVA's collator.

``LazySupervisedDataset`` + ``DataCollatorForSupervisedDataset`` of ``llava/train/train.py``:

* each record becomes ids and labels through ``vlmkit.data`` (``iter_examples``: the one
  implementation of LLaVA's tokenisation and masking, the same that ``vlmkit data tokenize``
  writes), and its image becomes pixels through ``runtime.images.preprocess`` (``pad``,
  ``square``, ``anyres``: the original preprocessing);
* a text-only record in a multimodal model gets a zero image of the crop size (the original's
  ``torch.zeros(3, crop_h, crop_w)``), which the model consumes with a zero-length slice;
* the collator pads ids with the pad token (LLaVA's ``pad_token = unk_token``) and labels with
  -100, cuts both at ``model_max_length``, masks the padding, and stacks the images when they
  all have one shape (a list otherwise, as for anyres).

``modality_lengths`` are the original's: words of all turns (``str.split``), negative for
text-only records, the input of the length-grouped sampler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data import DataModel, Record, RecordError, iter_examples
from ..data.tokenize import IGNORE_INDEX
from ..runtime import images as image_ops


class LlavaDataset(Dataset):
    """Records, tokenised and preprocessed one at a time (LLaVA's ``lazy_preprocess``).

    Args:
        records: the records (already checked by ``vlmkit.data.check``).
        model: tokenizer, template and length (``vlmkit.data.load_data_model``).
        image_folder: where relative image paths start.
        image_config: the checkpoint's preprocessing.
    """

    def __init__(self, records: list[Record], model: DataModel, image_folder: str | os.PathLike | None,
                 image_config: image_ops.ImageConfig):
        self.records, self.model, self.image_config = records, model, image_config
        self.image_folder = Path(image_folder) if image_folder is not None else None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Words per record, positive with an image and negative without (``modality_lengths``)."""
        return [(1 if r.images else -1) * sum(len(t.text.split()) for t in r.turns) for r in self.records]

    def image_path(self, name: str) -> Path:
        return Path(name) if self.image_folder is None or Path(name).is_absolute() else self.image_folder / name

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        example = next(iter_examples([record], self.model, image_folder=self.image_folder))
        if isinstance(example, RecordError):  # `data check` ran first; a file changed since
            raise example
        item = {"input_ids": torch.tensor(example.input_ids), "labels": torch.tensor(example.labels)}
        if record.images:
            pixels, sizes = image_ops.preprocess([self.image_path(record.images[0])], self.image_config)
            item["image"], item["image_size"] = pixels[0], sizes[0]
        else:
            height, width = self.image_config.crop
            shape = (1, 3, height, width) if self.image_config.aspect == "anyres" else (3, height, width)
            item["image"], item["image_size"] = torch.zeros(shape), None  # anyres: one crop, as unsqueeze(0)
        return item


@dataclass
class Collator:
    """``DataCollatorForSupervisedDataset``: pad, cut, mask, stack."""

    pad_token_id: int
    max_length: int

    def __call__(self, items: list[dict]) -> dict:
        ids = torch.nn.utils.rnn.pad_sequence([i["input_ids"] for i in items], batch_first=True,
                                              padding_value=self.pad_token_id)[:, :self.max_length]
        labels = torch.nn.utils.rnn.pad_sequence([i["labels"] for i in items], batch_first=True,
                                                 padding_value=IGNORE_INDEX)[:, :self.max_length]
        batch = {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(self.pad_token_id)}
        if "image" in items[0]:
            pixels = [i["image"] for i in items]
            batch["images"] = torch.stack(pixels) if len({p.shape for p in pixels}) == 1 else pixels
            batch["image_sizes"] = [i["image_size"] for i in items]
        return batch
