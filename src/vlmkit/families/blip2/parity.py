"""``vlmkit verify`` for BLIP-2: LAVIS's forward (``reference.py``) vs the converted transformers folder.

The checks, as transformers' conversion script makes them and beyond:

* pixel values: LAVIS's eval preprocessing vs the converted ``Blip2Processor``;
* input ids: the language model's tokenisation of the prompt vs the processor's (its
  ``<image>`` placeholders removed);
* logits: OPT with an empty text input (LAVIS appends "\\n"), T5 with "\\n" as input and as
  labels, over every position (the queries' too);
* greedy tokens: LAVIS's generate (``num_beams=1``) vs ``model.generate(do_sample=False)``;
* batched generation: all probes in one padded batch, each row equal to its own run and to LAVIS.

Each model is loaded in turn, so memory holds one of them at a time.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ...options import LoadOptions
from ...parity import Check, Report, compare_ids, compare_tensors
from ...runtime import images
from . import hf_output
from .checkpoint import open_original
from .convert import lm_embedding
from .language_models import HF_PREFIX
from .reference import OriginalBlip2Model, lavis_eval_pixels

# float32 on both sides. transformers normalises the ViT output with eps 1e-6 where LAVIS's
# ln_vision uses 1e-5, so float32 logits agree to ~1e-5 relative, not to the last bit.
TOLERANCES = {
    "F32": {"pixels": 1e-5, "logits": 1e-4, "cosine": 0.99999},
    "F16": {"pixels": 1e-5, "logits": 5e-2, "cosine": 0.999},
    "BF16": {"pixels": 1e-5, "logits": 2e-1, "cosine": 0.99},
}


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def verify(original: Path, converted: Path, options: LoadOptions, probes: list[tuple[Path, str]], *,
           max_new_tokens: int = 8) -> Report:
    """Run LAVIS's forward and the converted model on the same probes and report every difference.

    Args:
        original: the LAVIS checkpoint (any form; ``options`` as for convert).
        converted: the transformers folder.
        probes: (image, prompt) pairs; the first is measured in detail, all are generated in one batch.
        max_new_tokens: greedy tokens to compare.
    """
    ckpt = open_original(original, options)
    target = hf_output.target_for(ckpt, options)
    cfg = target.hf_config
    report = Report(f"BLIP-2 {ckpt.lm.name.upper()} parity: LAVIS forward vs converted transformers model", str(original),
                    str(converted), inputs={"probes": [f"{Path(i).name}: {p!r}" for i, p in probes],
                                            "max_new_tokens": max_new_tokens})
    # the text of LAVIS's training forward: a causal LM reads it (its forward appends the row's suffix);
    # a seq2seq LM reads it and is given it as labels
    logit_text = ("", None) if ckpt.lm.causal else ("\n", "\n")

    # --- LAVIS --------------------------------------------------------------------------
    reference = OriginalBlip2Model.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict(), cfg.text_config)
    ref = []
    for image_path, prompt in probes:
        image = images.load_image(image_path)
        pixels = lavis_eval_pixels(image, target.image_size)
        ref.append({"image": image, "pixels": pixels, "ids": reference.prompt_ids(prompt),
                    "logits": reference.logits(pixels, *logit_text) if not ref else None,
                    "tokens": reference.greedy(pixels, prompt, max_new_tokens)})
    eos = reference.eos_token_id
    decode = reference.tokenizer.decode
    del reference
    gc.collect()

    tol = TOLERANCES[cast_to(converted, HF_PREFIX + ckpt.lm.embedding, ckpt.source.info(lm_embedding(ckpt)).dtype)]

    def logits_check(model, processor, first) -> list[Check]:
        with torch.no_grad():
            text_in = processor(images=ref[0]["image"], text=logit_text[0] + ckpt.lm.forward_suffix,
                                return_tensors="pt")
            kwargs = {}
            if logit_text[1] is not None:
                labels = processor.tokenizer(logit_text[1], return_tensors="pt").input_ids
                kwargs["labels"] = labels.masked_fill(labels == processor.tokenizer.pad_token_id, -100)
            logits = model(**text_in, **kwargs).logits[0]
        return [compare_tensors("logits", ref[0]["logits"], logits, atol=tol["logits"], min_cosine=tol["cosine"])]

    # LAVIS's min_length=1 (see reference.greedy)
    extra = {"min_new_tokens": ckpt.lm.min_new_tokens} if ckpt.lm.min_new_tokens else {}
    check_converted(report, "Blip2ForConditionalGeneration", converted, ref, [p for _, p in probes], tol=tol,
                    causal=ckpt.lm.causal, eos=eos, decode=decode, middle=logits_check,
                    generate={"do_sample": False, **extra}, max_new_tokens=max_new_tokens)
    return report


def check_converted(report: Report, model_class: str, converted: Path, ref: list[dict], prompts: list[str], *,
                    tol: dict, causal: bool, eos: int, decode, middle, generate: dict, max_new_tokens: int) -> None:
    """The converted folder, through transformers alone (``model_class``), against LAVIS's results ``ref`` (one dict a
    probe: image, pixels, ids, tokens): pixel values, input ids, the checks ``middle(model, processor, first)``
    returns (logits, ...), greedy tokens and the padded batch. BLIP-2's and InstructBLIP's ``verify`` share it."""
    import transformers
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    processor = AutoProcessor.from_pretrained(converted)
    model = getattr(transformers, model_class).from_pretrained(converted, dtype=torch.float32).eval()
    image_token = model.config.image_token_index

    first = processor(images=ref[0]["image"], text=prompts[0], return_tensors="pt")
    report.checks.append(compare_tensors("pixel values", ref[0]["pixels"], first["pixel_values"], atol=tol["pixels"]))
    ids = [i for i in first["input_ids"][0].tolist() if i != image_token]
    report.checks.append(compare_ids("input ids", ref[0]["ids"], ids, decode=decode))
    report.checks.extend(middle(model, processor, first))

    def new_tokens(inputs, rows):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate)
        start = inputs["input_ids"].shape[1] if causal else 1  # seq2seq: after the decoder start token
        return [_until_eos(row[start:].tolist(), eos) for row in out[:rows]]

    single = [new_tokens(first if i == 0 else processor(images=r["image"], text=prompts[i], return_tensors="pt"), 1)[0]
              for i, r in enumerate(ref)]
    report.checks.append(compare_ids("greedy tokens", ref[0]["tokens"], single[0], decode=decode))
    batch = processor(images=[r["image"] for r in ref], text=prompts, return_tensors="pt", padding=True)
    batched = new_tokens(batch, len(ref))
    agree = [b == r["tokens"] and b == s for b, r, s in zip(batched, ref, single)]
    report.checks.append(Check(
        "batched generation", all(agree), {"batch": len(ref), "rows_equal": sum(agree)},
        "each padded batch row = its unbatched generation = LAVIS's",
        "" if all(agree) else f"rows differing: {[i for i, a in enumerate(agree) if not a]}",
    ))
    report.notes.append(f"LAVIS greedy text: {decode(ref[0]['tokens'])!r}")
    report.notes.append("transformers normalises the ViT output with eps 1e-6, LAVIS's ln_vision with 1e-5")


def cast_to(converted: Path, written: str, source_dtype: str) -> str:
    """The dtype the conversion cast the language model to ("F32" when it kept the checkpoint's own values), from the
    dtype of its embedding (``written`` in the folder; ``source_dtype`` in the checkpoint)."""
    from ...tensors import open_source

    out = open_source(converted)
    try:
        dtype = out.info(written).dtype
    finally:
        out.close()
    return dtype if dtype != source_dtype and dtype in TOLERANCES else "F32"
