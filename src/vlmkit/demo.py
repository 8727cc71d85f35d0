"""``make demo``: the main job, end to end, on an embedded default.

1. builds a tiny ORIGINAL-format LLaVA-1.5 checkpoint (the real LLaMA tokenizer, random
   weights, fixed seed) and a tiny CLIP tower, in the layouts the real releases use;
2. converts it to a transformers folder with ``vlmkit convert``;
3. proves the conversion with ``vlmkit verify`` (the parity report);
4. answers a question about a bundled photo with the converted model, through plain
   transformers. The weights are random, so the answer is noise: the point is that the
   original and the converted model produce the same noise.

Run: ``python -m vlmkit.demo [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from . import families
from .cli import main as vlmkit

PHOTO = Path(__file__).parent / "assets" / "images" / "chelsea.png"
QUESTION = "What is shown in this image?"
MODEL = ("llava", "llama")  # the family and tiny variant the demo builds: LLaVA-1.5 on a LLaMA language model


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def answer(folder: Path) -> str:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from .runtime.images import load_image

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[load_image(PHOTO)], text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def build_original(work: Path) -> Path:
    """The tiny LLaVA-1.5 checkpoint, built by its family (``make_tiny``) in ``work`` beside its CLIP tower.

    ``mm_vision_tower`` is the tower's path as given (relative to the directory the demo ran
    in), as a training run leaves it; vlmkit finds the tower beside the checkpoint from any
    other directory, so the README's commands on ``demo-output/`` work from anywhere.
    """
    name, variant = MODEL
    return families.load(name).make_tiny(work, variant)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vlmkit demo: convert and verify a tiny original LLaVA-1.5")
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)

    step("1. a tiny original LLaVA-1.5 checkpoint (real LLaMA tokenizer, random weights, seed 0)")
    original = build_original(work)
    print(f"original checkpoint: {original}")
    vlmkit(["inspect", str(original)])

    step("2. vlmkit convert (original -> transformers, published llava-hf layout)")
    converted = work / "llava-1.5-tiny-hf"
    if vlmkit(["convert", str(original), str(converted)]) != 0:
        return 1

    step("3. vlmkit verify (original forward pass vs converted transformers model)")
    code = vlmkit(["verify", str(original), str(converted), "--markdown", str(work / "parity-report.md")])

    step("4. the converted model answers, through plain transformers")
    print(f"photo:    {PHOTO.name}\nquestion: {QUESTION}\nanswer:   {answer(converted)!r}")
    print("(random weights: the words are noise; the parity report above is the point)")
    print(f"\nparity report (Markdown): {work / 'parity-report.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
