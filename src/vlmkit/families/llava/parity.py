"""``vlmkit verify`` for LLaVA: the original forward pass vs the converted transformers folder.

The reference side is ``reference.OriginalLlava`` with the original preprocessing
(``runtime.images``), prompt (``runtime.templates``) and tokenisation
(``runtime.tokens``); the converted side is plain transformers (``AutoProcessor`` +
``Llava(Next)ForConditionalGeneration``). Each model is loaded in turn, so memory holds
one of them at a time.

A OneVision checkpoint also gets a video probe (the probe images as the frames of one video, the first question):
where transformers' OneVision computes what the original computes for the checkpoint's ``mm_spatial_pool_mode`` /
``mm_newline_position`` (bilinear, one newline after all frames), ids, logits and greedy tokens are compared;
elsewhere the probe is a failed check naming the fields.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import dtypes
from ...errors import ConfigError
from ...options import LoadOptions
from ...runtime import images, templates
from ...runtime.tokens import IMAGE_TOKEN_INDEX
from ...parity import Check, Report, compare_ids, compare_tensors
from . import onevision
from .checkpoint import open_original
from .hf_output import template_for
from .image_path import image_config
from .reference import OriginalLlava

# float32 on both sides: the same ops in the same order, so differences are rounding only.
TOLERANCES = {
    "F32": {"pixels": 1e-5, "logits": 1e-4, "cosine": 0.99999},
    "F16": {"pixels": 1e-5, "logits": 5e-2, "cosine": 0.999},
    "BF16": {"pixels": 1e-5, "logits": 2e-1, "cosine": 0.99},
}


@dataclass
class Probe:
    image: Path
    prompt: str


def _collapse_image_runs(ids: list[int], image_token: int) -> list[int]:
    """transformers expands ``<image>`` into one id per feature; the original keeps one -200."""
    out: list[int] = []
    for i in ids:
        if i == image_token:
            if not out or out[-1] != IMAGE_TOKEN_INDEX:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(i)
    return out


def _until_eos(ids: list[int], stop: frozenset[int]) -> list[int]:
    """``ids`` up to and with the first stop id."""
    end = next((i for i, token in enumerate(ids) if token in stop), None)
    return ids if end is None else ids[:end + 1]


def verify(original: Path, converted: Path, options: LoadOptions, probes: list[Probe], *,
           max_new_tokens: int = 8) -> Report:
    """Run both models on the same probes and report every difference.

    Args:
        original: the original LLaVA checkpoint (any form; ``options`` as for convert).
        converted: the transformers folder.
        probes: image + question pairs; the first is measured in detail, all of them
            (at least two) are generated together in one padded batch.
        max_new_tokens: greedy tokens to compare.
    """
    ckpt = open_original(original, options)
    template = template_for(ckpt, options)
    report = Report("LLaVA parity: original forward vs converted transformers model", str(original), str(converted),
                    inputs={"template": template, "probes": [f"{p.image.name}: {p.prompt!r}" for p in probes],
                            "max_new_tokens": max_new_tokens},
                    assumptions=list(ckpt.assumptions))

    # --- the original ------------------------------------------------------------
    reference = OriginalLlava.load(ckpt, dtype=torch.float32)
    stop = templates.stop_ids(template, reference.vocab)
    ref = []
    for probe in probes:
        image = images.load_image(probe.image)
        pixels, sizes = images.preprocess([image], reference.image_config)
        prompt = templates.render(template, [("user", templates.with_image(probe.prompt)), ("assistant", None)])
        ids = reference.prompt_ids(prompt)
        features = reference.image_features(pixels, sizes)
        ref.append({"image": image, "pixels": pixels, "ids": ids,
                    "logits": reference.logits(ids, features) if not ref else None,
                    "tokens": reference.greedy(ids, features, max_new_tokens, stop)})
    ov = onevision.is_onevision(ckpt)
    video = _reference_video(reference, template, probes, max_new_tokens, stop) if ov else None
    # the original's logits: len(tokenizer) columns (reference._rows_kept); the converted model may keep more rows
    vocab = reference.language_model.config.vocab_size
    decode = reference.vocab.decode
    del reference
    gc.collect()

    # --- the converted folder, through transformers alone --------------------------
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    processor = onevision.processor(converted) if ov else AutoProcessor.from_pretrained(converted)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(converted, dtype=torch.float32).eval()
    # §4.5: the original runs with len(tokenizer) rows; the rows past them (the checkpoint's untrained padding,
    # the conversion's new <image>/<video> rows) never win a greedy step of the original, so none may here
    rows = model.get_output_embeddings().weight.shape[0]
    masked = {"suppress_tokens": list(range(vocab, rows))} if rows > vocab else {}
    stored = _stored_dtype(converted)
    tol = TOLERANCES.get(stored, TOLERANCES["F32"])
    image_token = model.config.image_token_index

    def inputs_for(items: list[int]):
        texts = [processor.apply_chat_template(_messages(probes[i].prompt), add_generation_prompt=True) for i in items]
        return processor(images=[ref[i]["image"] for i in items], text=texts, return_tensors="pt", padding=True)

    first = inputs_for([0])
    report.checks.append(_pixel_check(ref[0]["pixels"], first["pixel_values"], tol["pixels"]))
    ids = _collapse_image_runs(first["input_ids"][0].tolist(), image_token)
    report.checks.append(compare_ids("input ids", ref[0]["ids"], ids, decode=decode))
    try:
        with torch.no_grad():
            logits = model(**first).logits[0, :, :vocab]
    except (ValueError, RuntimeError, IndexError) as e:  # the folder's own files do not fit together: a verdict
        report.checks.append(Check("logits", False, {}, "the converted model runs on the probe",
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return report
    report.checks.append(compare_tensors("logits", ref[0]["logits"], logits, atol=tol["logits"], min_cosine=tol["cosine"]))

    single = []
    for i in range(len(probes)):
        inputs = first if i == 0 else inputs_for([i])
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **masked)
        single.append(_until_eos(out[0, inputs["input_ids"].shape[1]:].tolist(), stop))
    report.checks.append(compare_ids("greedy tokens", ref[0]["tokens"], single[0], decode=decode))
    batch = inputs_for(list(range(len(probes))))
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **masked)
    batched = [_until_eos(row[batch["input_ids"].shape[1]:].tolist(), stop) for row in out]
    agree = [b == r["tokens"] and b == s for b, r, s in zip(batched, ref, single)]
    report.checks.append(Check(
        "batched generation", all(agree),
        {"batch": len(probes), "rows_equal": sum(agree)},
        "each padded batch row = its unbatched generation = the original's",
        "" if all(agree) else f"rows differing: {[i for i, a in enumerate(agree) if not a]}",
    ))
    if ov:
        report.checks.extend(_video_checks(ckpt, Path(converted), processor, model, video, tol, vocab, masked, stop,
                                           decode))
        report.notes.append(f"video probe: the {len(probes)} probe images as the frames of one video, the first "
                            "question; the original's frame pixels fed to the converted model (transformers' video "
                            "processor needs torchvision)")
    report.notes.append(f"original greedy text: {decode(ref[0]['tokens'])!r}")
    if masked:
        report.notes.append(f"logits compared on the original's {vocab} columns; greedy tokens with the converted "
                            f"model's rows {vocab}..{rows - 1} masked (untrained padding and the added tokens)")
    if ckpt.is_next or ov:
        report.notes.append("transformers unpads with int(round(x, 7)), the original with int(x): "
                            "they can differ by one row for rare image sizes")
    if ov:
        report.notes.extend(onevision.differences(ckpt))
    return report


def _messages(prompt: str, kind: str = "image") -> list[dict]:
    return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": prompt}]}]


def _reference_video(reference: OriginalLlava, template: str, probes: list[Probe], max_new_tokens: int,
                     stop: frozenset[int]) -> dict:
    """The original on the video probe: every probe image a frame of one video, the first probe's question, one
    ``<image>`` for the whole video (LLaVA-Video's inference code). ``{"error": reason}`` when the original cannot
    read the checkpoint's video fields."""
    frames = [images.load_image(p.image) for p in probes]
    try:
        features = reference.video_features(frames)
    except ConfigError as e:
        return {"error": str(e)}
    prompt = templates.render(template, [("user", templates.with_image(probes[0].prompt)), ("assistant", None)])
    ids = reference.prompt_ids(prompt)
    return {"frames": len(frames), "prompt": probes[0].prompt, "max_new_tokens": max_new_tokens,
            "pixels": torch.from_numpy(reference.image_config.frames(frames)), "ids": ids,
            "logits": reference.logits(ids, [features]),
            "tokens": reference.greedy(ids, [features], max_new_tokens, stop)}


def _video_checks(ckpt, converted: Path, processor, model, video: dict, tol: dict, vocab: int, masked: dict,
                  stop: frozenset[int], decode) -> list[Check]:
    """The converted folder on the video probe, against ``_reference_video``'s results.

    transformers' video processor needs torchvision, so the original's frame pixels are fed to the converted
    model and the folder's ``video_preprocessor_config.json`` is checked against the original's frame
    preprocessing field by field; the ``<video>`` placeholder is expanded by the folder's own processor.
    """
    differ = onevision.video_differences(ckpt)
    if "error" in video or differ:
        return [Check("video probe", False, {"frames": video.get("frames", 0)},
                      "transformers' OneVision computes the original's video features for this config.json",
                      "; ".join(differ) or video["error"])]
    file = converted / "video_preprocessor_config.json"
    written = json.loads(file.read_text()) if file.exists() else {}
    original = _original_frame_preprocessing(ckpt)
    wrong = sorted(k for k, v in original.items() if written.get(k) != v)
    checks = [Check("video preprocessing", not wrong, {"fields": len(original)},
                    "video_preprocessor_config.json describes the original's frame preprocessing",
                    "" if not wrong else (f"{file.name}: {', '.join(wrong)} differ (absent: transformers' class "
                                          "defaults, CLIP's mean/std)"))]
    pixels = video["pixels"][None]
    text = processor.apply_chat_template(_messages(video["prompt"], "video"), add_generation_prompt=True)
    text = text.replace(processor.video_token, processor.replace_video_token({"pixel_values_videos": pixels}, 0), 1)
    inputs = {**processor.tokenizer([text], return_tensors="pt"), "pixel_values_videos": pixels}
    ids = _collapse_image_runs(inputs["input_ids"][0].tolist(), model.config.video_token_index)
    checks.append(compare_ids("video input ids", video["ids"], ids, decode=decode))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, :, :vocab]
    except (ValueError, RuntimeError, IndexError) as e:
        return checks + [Check("video logits", False, {}, "the converted model runs on the video probe",
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
    checks.append(compare_tensors("video logits", video["logits"], logits, atol=tol["logits"],
                                  min_cosine=tol["cosine"]))
    out = model.generate(**inputs, max_new_tokens=video["max_new_tokens"], do_sample=False, **masked)
    tokens = _until_eos(out[0, inputs["input_ids"].shape[1]:].tolist(), stop)
    checks.append(compare_ids("video greedy tokens", video["tokens"], tokens, decode=decode))
    return checks


def _original_frame_preprocessing(ckpt) -> dict:
    """The original's frame preprocessing (``SigLipImageProcessor.preprocess`` of the frame stack) in the field names
    of transformers' video processor: the tower's size, bicubic, the SigLIP processor's rescale and mean/std."""
    cfg = image_config(ckpt)
    return {"size": {"height": cfg.size, "width": cfg.size}, "resample": 3, "rescale_factor": cfg.rescale,
            "image_mean": list(cfg.mean), "image_std": list(cfg.std), "do_resize": True, "do_rescale": True,
            "do_normalize": True}


def _pixel_check(reference, converted: torch.Tensor, atol: float) -> Check:
    ref = reference if isinstance(reference, torch.Tensor) else torch.stack(list(reference))
    if ref.dim() == 5 and converted.dim() == 5 and converted.shape[1] > ref.shape[1]:
        converted = converted[:, : ref.shape[1]]  # transformers pads the crop dimension to the batch maximum
    return compare_tensors("pixel values", ref, converted, atol=atol)


def _stored_dtype(folder: Path) -> str:
    config = json.loads((Path(folder) / "config.json").read_text())
    # transformers 5's save_pretrained writes "dtype"
    return dtypes.optional_code(config.get("torch_dtype") or config.get("dtype")) or "F32"
