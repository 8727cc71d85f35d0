"""``vlmkit verify`` for BLIP-2 retrieval: LAVIS's forward (``reference.py``) vs the converted transformers folder.

Every probe image is scored against every probe text, as ``vlmkit score`` does it: LAVIS one
caption at a time, the converted model through its own processor and forward in one padded
batch. The checks, each over all images and texts:

* pixel values: LAVIS's eval preprocessing vs the converted processor;
* input ids: LAVIS's tokenisation (``bert-base-uncased`` + ``[DEC]``, cut at 32) vs the
  converted tokenizer's (padding removed);
* ITM logits and probabilities, ITC similarities (what transformers' conversion script compares);
* image embeddings (the normalised ``vision_proj`` of the 32 query outputs) and text embeddings
  (the normalised ``text_proj`` of the text's CLS output): ``extract_features``' projected features.

Each model is loaded in turn, so memory holds one of them at a time.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

import torch

from ...options import LoadOptions
from ...parity import Check, Report, compare_ids, compare_tensors
from ...runtime import images
from . import hf_output
from .checkpoint import open_original
from .reference import OriginalRetrievalModel
from .scoring import load_transformers, transformers_scores

# float32 on both sides; transformers normalises the ViT output with eps 1e-6 where LAVIS's ln_vision uses 1e-5.
# With --dtype the converted ViT runs on rounded weights (the Q-Former stays float32).
TOLERANCES = {"F32": {"pixels": 1e-5, "scores": 1e-4}, "F16": {"pixels": 1e-5, "scores": 2e-2},
              "BF16": {"pixels": 1e-5, "scores": 1e-1}}
TENSORS = (("ITM logits", "itm_logits"), ("ITM probabilities", "itm"), ("ITC similarities", "itc"),
           ("image embeddings", "image_embeds"), ("text embeddings", "text_embeds"))


def verify(original: Path, converted: Path, options: LoadOptions, probes: list[tuple[Path, str]], **_) -> Report:
    """The parity report (see the module docstring). ``probes``: (image, text) pairs; every image x every text."""
    ckpt = open_original(original, options)
    cfg = hf_output.target_for(ckpt, options).hf_config
    pictures = [images.load_image(i) for i, _ in probes]
    texts = [t for _, t in probes]
    report = Report("BLIP-2 retrieval parity: LAVIS's ITM / ITC forward vs converted Blip2ForImageTextRetrieval",
                    str(original), str(converted),
                    inputs={"images": [Path(i).name for i, _ in probes], "texts": texts})

    reference = OriginalRetrievalModel.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict())
    ref = [reference.scores(p, texts) for p in pictures]
    decode = reference.tokenizer.decode
    del reference
    gc.collect()

    cast = _cast_to(ckpt, converted)
    model, processor = load_transformers(converted, replace(options, dtype=None))  # float32, whatever is stored
    got = [transformers_scores(model, processor, p, texts) for p in pictures]
    del model
    gc.collect()

    tol = TOLERANCES[cast]
    stack = lambda outs, key: torch.stack([o[key] for o in outs])  # noqa: E731
    report.checks.append(compare_tensors("pixel values", stack(ref, "pixels"), stack(got, "pixels"),
                                         atol=tol["pixels"]))
    report.checks.append(_ids(ref[0]["ids"], got[0]["ids"], decode))
    for name, key in TENSORS:
        report.checks.append(compare_tensors(name, stack(ref, key), stack(got, key), atol=tol["scores"]))
    report.notes.append("ITM probability = softmax of the ITM logits averaged over the queries, match column "
                        "(blip2_image_text_matching); ITC = max over the queries of the cosine similarity, not / temp")
    report.notes.append("LAVIS scores one caption at a time; the converted model scores all texts in one padded batch")
    report.notes.append("transformers normalises the ViT output with eps 1e-6, LAVIS's ln_vision with 1e-5")
    return report


def _ids(reference: list[list[int]], candidate: list[list[int]], decode) -> Check:
    """Every text's ids identical: the first text that differs, else the first check."""
    checks = [compare_ids("input ids", r, c, decode=decode) for r, c in zip(reference, candidate)]
    return next((c for c in checks if not c.passed), checks[0])


def _cast_to(ckpt, converted: Path) -> str:
    """The dtype the conversion cast the ViT to ("F32" when it kept the checkpoint's own values)."""
    from ...tensors import open_source

    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    out = open_source(converted)
    try:
        written = out.info(name).dtype
    finally:
        out.close()
    source = ckpt.source.info("visual_encoder.blocks.0.mlp.fc1.weight").dtype
    return written if written != source and written in TOLERANCES else "F32"
