"""Chat latency: ``vlmkit.load(...).chat`` vs plain transformers ``generate`` on the same model.

Builds (random weights, locally) an original LLaVA-1.5 with a ~1.1B LLaMA-shaped language
model (TinyLlama-1.1B's shapes: 22 layers, 2048 wide, 5632 MLP, 32 heads / 4 KV heads) and
a CLIP-L/336-shaped tower (24 layers, 1024 wide, 336 px, patch 14: 576 image tokens),
converts it with vlmkit, then measures on the converted folder, float32 on CPU, greedy:

* time to first token (TTFT) and decode tokens/s of ``model.stream`` (vlmkit) and of
  ``model.generate`` with a streamer (plain transformers: processor + the same model
  object), a fresh conversation each time (no cached image, no cached prompt);
* the second turn's TTFT with vlmkit (same image, follow-up question: image features and
  the first turn's KV cache are reused) against the first turn's.

Targets (issue 5): vlmkit's overhead <= 5 % on TTFT and on decode tokens/s; second-turn
TTFT <= 1/3 of the first. Each figure is the median of ``--repeats`` runs.

Usage:
    .venv/bin/python benchmarks/chat_latency.py              # the ~1.1B model (~6 GB RAM, several minutes)
    .venv/bin/python benchmarks/chat_latency.py --quick      # tiny model, seconds
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

import vlmkit
from vlmkit.families.llava import tiny

PHOTO = Path(vlmkit.__file__).parent / "assets" / "images" / "chelsea.png"
QUESTION = "What is shown in this image? Describe it in detail."
FOLLOW_UP = "What colours does it have?"

SIZES = {
    "1.1b": tiny.TinySizes(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vision_hidden=1024,
                           vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=336, patch=14),
    "quick": tiny.TinySizes(),
}


def build(work: Path, sizes: tiny.TinySizes) -> Path:
    clip = tiny.make_clip(work / "clip", sizes)
    original = tiny.make_llava15(work / "llava-v1.5", clip, sizes, shards=4)
    converted = work / "llava-hf"
    vlmkit.convert(original, converted)
    shutil.rmtree(original)
    return converted


def vlmkit_run(model, messages, new_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = None
    count = 0
    for item in model.stream_reply(messages, max_new_tokens=new_tokens, temperature=0):
        if isinstance(item, str) and first is None:
            first = time.perf_counter()
        if not isinstance(item, str):
            count = item.completion_tokens
    end = time.perf_counter()
    return first - start, (count - 1) / (end - first), count


class FirstToken:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def transformers_run(model, processor, new_tokens: int) -> tuple[float, float, int]:
    from vlmkit.runtime.images import load_image

    start = time.perf_counter()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[load_image(PHOTO)], text=[text], return_tensors="pt")
    streamer = FirstToken()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=streamer)
    end = time.perf_counter()
    count = out.shape[1] - inputs["input_ids"].shape[1]
    return streamer.first - start, (count - 1) / (end - streamer.first), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test model instead of ~1.1B")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-chat"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        folder = build(args.workdir, SIZES["quick" if args.quick else "1.1b"])
        model = vlmkit.load(folder)
        hf_model, processor = model.backend.model, model.backend.processor
        params = sum(p.numel() for p in hf_model.parameters())
        ask = [{"role": "user", "content": QUESTION, "images": [PHOTO]}]

        rows = {"vlmkit": [], "transformers": [], "second": []}
        for _ in range(args.repeats):
            rows["transformers"].append(transformers_run(hf_model, processor, args.new_tokens))
            model._features.clear()
            model.prefix_cache.clear()  # a fresh conversation: nothing cached
            ttft, rate, count = vlmkit_run(model, ask, args.new_tokens)
            rows["vlmkit"].append((ttft, rate, count))
            answer = model.chat(ask, max_new_tokens=args.new_tokens, temperature=0).text  # warm: as a user would
            follow = ask + [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
            rows["second"].append(vlmkit_run(model, follow, args.new_tokens))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)

    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    print(f"\nmodel: {params / 1e9:.2f} B parameters, float32, CPU ({torch.get_num_threads()} threads); "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print("| run | time to first token (s) | decode tokens/s |")
    print("|---|---:|---:|")
    print(f"| transformers generate | {med['transformers'][0]:.2f} | {med['transformers'][1]:.2f} |")
    print(f"| vlmkit chat, first turn | {med['vlmkit'][0]:.2f} | {med['vlmkit'][1]:.2f} |")
    print(f"| vlmkit chat, second turn (cached) | {med['second'][0]:.2f} | {med['second'][1]:.2f} |")
    ttft_over = med["vlmkit"][0] / med["transformers"][0] - 1
    rate_over = 1 - med["vlmkit"][1] / med["transformers"][1]
    second = med["second"][0] / med["vlmkit"][0]
    print(f"\nvlmkit overhead: TTFT {ttft_over:+.1%}, decode {rate_over:+.1%} (target <= 5% each); "
          f"second-turn TTFT = {second:.2f} x first (target <= 0.33)")
    ok = ttft_over <= 0.05 and rate_over <= 0.05 and second <= 1 / 3
    print(f"targets: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
