"""``vlmkit verify`` for InstructBLIP: LAVIS's forward (``reference.py``) vs the converted transformers folder.

The checks, as transformers' conversion script makes them and beyond:

* pixel values: LAVIS's ``blip_image_eval`` vs the converted ``InstructBlipProcessor``;
* input ids: the language model's tokenisation of the prompt (Vicuna: ``</s>`` first) vs the
  processor's, its ``<image>`` placeholders removed;
* Q-Former ids: the instruction through ``bert-base-uncased`` + ``[DEC]`` vs the processor's
  ``qformer_input_ids``;
* logits: Vicuna over the queries and the prompt, on the 32,000 trained columns (LAVIS's
  ``[PAD]`` column is a random draw no file holds); Flan-T5 with "\\n" as labels, as the script;
* untrained rows (Vicuna): the converted model's ``[PAD]`` / ``<image>`` logits never exceed the
  best trained token's, at any position, so they cannot change a greedy answer;
* greedy tokens: LAVIS's generate with ``num_beams=1``, ``repetition_penalty=1.0`` vs
  ``model.generate(do_sample=False, num_beams=1, repetition_penalty=1.0)``, both passed explicitly
  (LAVIS's defaults are ``num_beams=5``, ``repetition_penalty=1.5``);
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
from ..blip2.parity import TOLERANCES, cast_to, check_converted
from . import hf_output
from .checkpoint import open_original
from .reference import OriginalInstructBlipModel, lavis_eval_pixels

GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}


def verify(original: Path, converted: Path, options: LoadOptions, probes: list[tuple[Path, str]], *,
           max_new_tokens: int = 8) -> Report:
    """Run LAVIS's forward and the converted model on the same probes and report every difference.

    Args:
        original: the LAVIS ``.pth``, a release or a full state dict (``options`` as for convert).
        converted: the transformers folder.
        probes: (image, instruction) pairs; the first is measured in detail, all are generated in one batch.
        max_new_tokens: greedy tokens to compare.
    """
    ckpt = open_original(original, options)
    target = hf_output.target_for(ckpt, options)
    cfg = target.hf_config
    report = Report(f"InstructBLIP {ckpt.lm.title} parity: LAVIS forward vs converted transformers model",
                    str(original), str(converted),
                    inputs={"probes": [f"{Path(i).name}: {p!r}" for i, p in probes], "max_new_tokens": max_new_tokens,
                            "generation": "num_beams=1, repetition_penalty=1.0 (LAVIS's defaults: 5, 1.5)"})

    # --- LAVIS --------------------------------------------------------------------------
    reference = OriginalInstructBlipModel.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict())
    ref = []
    for image_path, prompt in probes:
        image = images.load_image(image_path)
        pixels = lavis_eval_pixels(image, target.image_size)
        ref.append({"image": image, "pixels": pixels, "ids": reference.prompt_ids(prompt),
                    "qformer_ids": reference.qformer_ids(prompt),
                    "logits": reference.logits(pixels, prompt) if not ref else None,
                    "tokens": reference.greedy(pixels, prompt, max_new_tokens)})
    eos, min_new = reference.eos_token_id, reference.min_new_tokens
    decode, decode_q = reference.tokenizer.decode, reference.qformer_tokenizer.decode
    del reference
    gc.collect()

    tol = TOLERANCES[cast_to(converted, "language_model." + ckpt.lm.embedding,
                             ckpt.source.info(ckpt.prefix + ckpt.lm.embedding).dtype)]

    def instruction_checks(model, processor, first) -> list[Check]:
        checks = [compare_ids("q-former ids", ref[0]["qformer_ids"], first["qformer_input_ids"][0].tolist(),
                              decode=decode_q)]
        with torch.no_grad():
            if ckpt.lm.causal:
                logits = model(**first).logits[0]
            else:
                labels = processor.tokenizer("\n", return_tensors="pt").input_ids
                labels = labels.masked_fill(labels == processor.tokenizer.pad_token_id, -100)
                logits = model(**first, labels=labels).logits[0]
        trained = ref[0]["logits"].shape[-1]
        checks.append(compare_tensors("logits", ref[0]["logits"], logits[:, :trained], atol=tol["logits"],
                                      min_cosine=tol["cosine"]))
        if logits.shape[-1] > trained and ckpt.lm.causal:
            margin = float((logits[:, trained:].max(-1).values - logits[:, :trained].max(-1).values).max())
            checks.append(Check(
                "untrained rows", margin <= 0, {"rows": logits.shape[-1] - trained, "max_margin": margin},
                "[PAD] / <image> logit <= the best trained token's, at every position",
                "" if margin <= 0 else "an untrained row can win a greedy step"))
        return checks

    extra = {"min_new_tokens": min_new} if min_new else {}  # LAVIS's min_length=1 (see reference.greedy)
    check_converted(report, "InstructBlipForConditionalGeneration", converted, ref, [p for _, p in probes], tol=tol,
                    causal=ckpt.lm.causal, eos=eos, decode=decode, middle=instruction_checks,
                    generate={**GREEDY, **extra}, max_new_tokens=max_new_tokens)
    if not ckpt.lm.causal:
        report.notes.append("LAVIS runs Flan-T5 in bfloat16 on a GPU; this comparison is float32, as LAVIS on the CPU")
    return report
