"""The chat runtime on a CUDA device: batched answers equal one-by-one answers, sampling works.

The test suite runs on CPU (CI has no GPU). This script checks, on the tiny LLaVA models of
the tests (random weights), what only a GPU run can show: every tensor the runtime makes
(attention masks, positions, batch indices) lands on the model's device, and

* original LLaVA-1.5 and the converted transformers folder answer on ``cuda``;
* ``generate`` (one padded batch, rows leaving as they finish) gives each conversation the
  greedy tokens ``chat`` gives it alone, on the GPU;
* seeded sampling gives the same tokens twice;
* the GPU's greedy tokens are compared with the CPU's (reported, not required: kernels differ).

Exits 1 if a required check fails.

Usage:
    python scripts/check_cuda.py [--device cuda:0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import vlmkit
from vlmkit.families.llava import tiny

PHOTOS = sorted((Path(vlmkit.__file__).parent / "assets" / "images").glob("*.png"))


def conversations() -> list:
    return [[{"role": "user", "content": f"Question {i}: what is shown?" + " Tell me more." * i,
              "images": [PHOTOS[i % len(PHOTOS)].read_bytes()]}] for i in range(4)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: this script checks the runtime on a GPU")
    failures = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        if not ok:
            failures.append(name)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        clip = tiny.make_clip(work / "clip")
        original = tiny.make_llava15(work / "llava-v1.5", clip)
        converted = work / "llava-hf"
        vlmkit.convert(original, converted)
        for name, folder in (("original", original), ("transformers", converted)):
            model = vlmkit.load(folder, device=args.device)
            sampling = {"max_new_tokens": 24, "temperature": 0, "stop": ["</never>"]}
            alone = [model.chat(c, **sampling).tokens for c in conversations()]
            model.prefix_cache.clear()
            batched = [r.tokens for r in model.generate(conversations(), **sampling)]
            check(f"{name}: batched greedy tokens == one by one", batched == alone,
                  f"{sum(len(t) for t in alone)} tokens in {len(alone)} answers")
            drawn = [model.chat(conversations()[0], max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7).tokens
                     for _ in range(2)]
            check(f"{name}: seeded sampling repeats", drawn[0] == drawn[1])
            on_cpu = vlmkit.load(folder, device="cpu")
            same = sum(on_cpu.chat(c, **sampling).tokens == a for c, a in zip(conversations(), alone))
            print(f"info {name}: greedy answers equal to the CPU's: {same} of {len(alone)}")
    print("all required checks passed" if not failures else f"{len(failures)} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
