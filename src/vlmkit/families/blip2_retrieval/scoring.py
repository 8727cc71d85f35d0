"""Scoring (``vlmkit score``, ``vlmkit serve``'s ``/v1/score``): one image against texts -> the ITM probability
and the ITC similarity of each text.

* a transformers folder (``Blip2ForImageTextRetrieval``, converted or downloaded): its processor
  (one padded batch of texts, truncated where LAVIS truncates) and the model's own forward, once
  with ``use_image_text_matching_head=True`` (the image repeated per text) and once without;
* an original LAVIS checkpoint: LAVIS's forward (``reference.py``), one text at a time.

The numbers are LAVIS's ``blip2_image_text_matching`` ones: ``itm`` = softmax of the query-mean
ITM logits, match column; ``itc`` = max over the queries of the cosine similarity.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...options import LoadOptions
from ...runtime.scoring import Scorer


def load_transformers(folder: Path, options: LoadOptions):
    """``Blip2ForImageTextRetrieval`` and its processor from a folder (float32 unless ``--dtype``)."""
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval
    from transformers.utils import logging as hf_logging

    from ... import dtypes

    hf_logging.disable_progress_bar()
    model = Blip2ForImageTextRetrieval.from_pretrained(folder, dtype=dtypes.torch_dtype(options.dtype))
    model = model.to(options.device).eval()
    return model, AutoProcessor.from_pretrained(folder)


@torch.no_grad()
def transformers_scores(model, processor, image, texts: list[str]) -> dict:
    """The same quantities as ``reference.OriginalRetrievalModel.scores``, from the transformers model."""
    inputs = processor(images=image, text=texts, padding=True, truncation=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    pixels = inputs["pixel_values"].to(model.vision_model.dtype)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    itm = model(pixel_values=pixels.expand(len(texts), -1, -1, -1), input_ids=ids, attention_mask=mask,
                use_image_text_matching_head=True).logits_per_image.float()
    itc = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    return {"pixels": inputs["pixel_values"][0].float().cpu(),
            "ids": [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())],
            "itm_logits": itm.cpu(), "itm": itm.softmax(dim=1)[:, 1].cpu(),
            "itc": itc.logits_per_image[0].float().cpu(), "image_embeds": itc.image_embeds[0].float().cpu(),
            "text_embeds": itc.text_embeds.float().cpu()}


class TransformersScorer(Scorer):
    """A ``Blip2ForImageTextRetrieval`` folder: its processor and forward (``transformers_scores``)."""

    def __init__(self, folder: Path, options: LoadOptions):
        self.model, self.processor = load_transformers(folder, options)

    def score(self, image, texts: list[str]) -> list[dict]:
        return rows(texts, transformers_scores(self.model, self.processor, image, list(texts)))


class LavisScorer(Scorer):
    """An original LAVIS checkpoint: LAVIS's forward (``reference.py``), float32."""

    def __init__(self, found, options: LoadOptions):
        from . import hf_output
        from .checkpoint import open_original
        from .reference import OriginalRetrievalModel

        ckpt = open_original(found.path, options)
        cfg = hf_output.target_for(ckpt, options).hf_config
        model = OriginalRetrievalModel.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict())
        self.model = model.to(options.device)

    def score(self, image, texts: list[str]) -> list[dict]:
        return rows(texts, self.model.scores(image, list(texts)))


def rows(texts: list[str], out: dict) -> list[dict]:
    return [{"text": t, "itm": float(p), "itc": float(s)} for t, p, s in zip(texts, out["itm"], out["itc"])]


def scorer(found, options: LoadOptions) -> Scorer:
    """The loaded model of ``found`` (a transformers folder or a LAVIS checkpoint), ready to score."""
    from ...errors import ConfigError
    from ...options import check_device

    if options.dtype and found.form != "transformers":
        raise ConfigError(f"--dtype does not apply to scoring {found.path}: LAVIS's forward runs in float32",
                          hint="remove --dtype, or score a converted folder")
    check_device(options.device)
    return TransformersScorer(found.path, options) if found.form == "transformers" else LavisScorer(found, options)
