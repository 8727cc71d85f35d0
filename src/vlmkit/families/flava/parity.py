"""``vlmkit verify`` for FLAVA: the original checkpoint and forward vs the converted transformers folder.

Stronger than the seed script's one sum over all parameters:

* weights: every tensor of the folder equals, bit for bit, what its rule makes of the original
  tensor(s) (here: the same bytes under a new name), and every duplicate the conversion dropped
  equals the copy it kept;
* codebook ids: the DALL-E encoder as its own code runs it and the converted ``image_codebook``
  give the same code at every position, on the same (mapped) pixels;
* image / text / multimodal encoders: last hidden states of the original forward
  (``reference.py``) vs ``FlavaModel``, within tolerance, on the same pixels and token ids.

Probes run one at a time: the original passes no attention mask to its multimodal encoder, so
padded batches differ from transformers by design.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ...conversion import plan_for
from ...conversion.engine import apply_step
from ...options import LoadOptions
from ...parity import Check, Report, compare_tensors
from ...runtime import images
from ...tensors import open_source
from .checkpoint import open_original
from .convert import conversion
from .reference import OriginalFlavaModel

TOLERANCES = {"F32": 1e-4, "F16": 5e-2, "BF16": 2e-1}
TWIN = {"image_encoder.embeddings.": "image_encoder.module.embeddings.",
        "text_encoder.embeddings.": "text_encoder.module.embeddings."}


def check_weights(original: Path, converted: Path, options: LoadOptions) -> Check:
    """Each target tensor == its rule applied to the source tensor(s); each dropped duplicate == its twin."""
    plan = plan_for(conversion(original, options), dtype=options.dtype)
    source = open_original(original).source
    out = open_source(converted)
    differ, twins, twins_equal = [], 0, 0
    try:
        for step in plan.steps:
            made = apply_step(step, [source.read(i.name) for i in step.sources])
            for target, tensor in zip(step.targets, made):
                written = out.read(target.name)
                if written.dtype != tensor.dtype:
                    tensor = tensor.to(written.dtype)
                if not torch.equal(written, tensor):
                    differ.append(target.name)
        for drop in plan.drops:
            twin = next((drop.source.name.replace(k, v, 1) for k, v in TWIN.items() if drop.source.name.startswith(k)),
                        None)
            if twin is None:
                continue
            twins += 1
            twins_equal += torch.equal(source.read(drop.source.name), source.read(twin))
    finally:
        out.close()
    n = len(plan.targets)
    passed = not differ and twins_equal == twins
    detail = (f"differ: {differ[:5]}" if differ else "") + \
        (f" {twins - twins_equal} dropped duplicate(s) differ from the copy kept" if twins_equal != twins else "")
    return Check("weights", passed, {"tensors": n, "identical": n - len(differ), "duplicates_dropped": twins,
                                     "duplicates_identical": twins_equal},
                 "every tensor bit-identical to its source; dropped duplicates identical to their twins", detail.strip())


def verify(original: Path, converted: Path, options: LoadOptions, probes: list[tuple[Path, str]], **_) -> Report:
    """The FLAVA parity report (see the module docstring). ``probes``: (image, text) pairs."""
    from transformers import FlavaForPreTraining, FlavaProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    report = Report("FLAVA parity: original checkpoint, forward and dVAE vs converted transformers model",
                    str(original), str(converted), inputs={"probes": [f"{Path(i).name}: {t!r}" for i, t in probes]})
    report.checks.append(check_weights(original, converted, options))

    processor = FlavaProcessor.from_pretrained(converted)
    model = FlavaForPreTraining.from_pretrained(converted, dtype=torch.float32).eval()
    config = model.config
    inputs = [processor(images=images.load_image(i), text=t, return_tensors="pt", return_codebook_pixels=True)
              for i, t in probes]
    with torch.no_grad():
        ours = [model.flava(input_ids=x["input_ids"], pixel_values=x["pixel_values"],
                            attention_mask=x["attention_mask"], token_type_ids=x.get("token_type_ids")) for x in inputs]
        codes = [model.image_codebook.get_codebook_indices(x["codebook_pixel_values"]) for x in inputs]
    pad = processor.tokenizer.pad_token_id or 0
    del model
    gc.collect()

    ckpt = open_original(original)
    reference = OriginalFlavaModel.load(ckpt, {"image": config.image_config.num_attention_heads,
                                               "text": config.text_config.num_attention_heads,
                                               "mm": config.multimodal_config.num_attention_heads})
    written = open_source(converted)
    try:  # a cast (--dtype) changes the values the transformers side runs with; otherwise both use the same
        cast = written.info("flava.image_projection.weight").dtype
    finally:
        written.close()
    atol = TOLERANCES.get(cast, 1e-4) if cast != ckpt.source.info("image_projection.weight").dtype else 1e-4
    checks: dict[str, list[Check]] = {"image encoder": [], "text encoder": [], "multimodal encoder": []}
    same_codes = total_codes = 0
    for x, out, code in zip(inputs, ours, codes):
        image_hidden, image_out = reference.encode_image(x["pixel_values"])
        text_hidden, text_out = reference.encode_text(x["input_ids"], pad)
        mm_out = reference.encode_multimodal(image_hidden, text_hidden)
        for name, ref, got in (("image encoder", image_out, out.image_embeddings),
                               ("text encoder", text_out, out.text_embeddings),
                               ("multimodal encoder", mm_out, out.multimodal_embeddings)):
            checks[name].append(compare_tensors(name, ref, got, atol=atol, min_cosine=0.9999))
        ref_codes = reference.codebook_ids(x["codebook_pixel_values"])
        same_codes += int((ref_codes == code).sum()) if ref_codes.shape == code.shape else 0
        total_codes += ref_codes.numel()
    report.checks.append(Check("codebook ids", same_codes == total_codes,
                               {"positions": total_codes, "identical": same_codes},
                               "the same code at every position", ""))
    report.checks += [_worst(c) for c in checks.values()]
    report.notes.append("the original's multimodal encoder takes the unimodal states before their final layernorm "
                        "and no attention mask; probes run unpadded, one at a time")
    return report


def _worst(checks: list[Check]) -> Check:
    """The probe that did worst: a failing one first, else the largest difference."""
    return min(checks, key=lambda c: (c.passed, -c.measured.get("max_abs_diff", float("inf"))))
