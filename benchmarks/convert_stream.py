"""Streaming conversion vs. copying: wall time and peak RSS on a 7B-shaped checkpoint.

Synthesises (random bytes, no model code) a checkpoint with the exact tensor shapes of
LLaVA-1.5-7B (LLaMA-2-7B + mlp2x_gelu projector), bf16, in ~5 GB shards (~13.5 GB),
then measures in one run, each as its own process under ``/usr/bin/time -v``:

* ``cp -r`` of the checkpoint;
* a vlmkit conversion of it: the LLaVA renames (``model.*`` -> ``language_model.model.*``,
  projector -> ``multi_modal_projector.linear_1/2``) with a bf16 -> fp16 cast;
* the same renames alone (a pure rename plan: the bytes only move).

Targets (issue 22): the pure rename <= 1.05 x the copy's wall time, peak RSS <= 1 GiB for
both conversions. The page cache is dropped (as root) before each measurement.

Usage:
    .venv/bin/python benchmarks/convert_stream.py                  # full size (~13.5 GB, needs ~45 GB free)
    .venv/bin/python benchmarks/convert_stream.py --scale 0.05     # a quick run with 1/20 of the layers' width
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from vlmkit.conversion import Conversion, rename, run
from vlmkit.tensors import open_source
from vlmkit.tensors.safetensors_io import SafetensorsWriter, TensorSpec, layout_shards

LLAVA_RULES = [
    rename("model.mm_projector.0.{p:path}", "multi_modal_projector.linear_1.{p:path}"),
    rename("model.mm_projector.2.{p:path}", "multi_modal_projector.linear_2.{p:path}"),
    rename("model.{rest:path}", "language_model.model.{rest:path}"),
    rename("lm_head.weight", "language_model.lm_head.weight"),
]


def scaled_head(size: int, scale: float) -> int:
    """A head size scaled by ``scale``: even and at least 2 (RoPE rotates pairs of dimensions). The scalers keep
    the head counts and scale the head sizes, so a scaled width is always whole heads (4096 x 0.35 = 1433 wide
    was not: 11 heads of 130.3) and the config they write is one transformers accepts."""
    return max(2, int(size * scale) // 2 * 2)


def llava_7b_shapes(scale: float = 1.0) -> list[TensorSpec]:
    """LLaVA-1.5-7B's tensors: LLaMA-2-7B (32 layers, 32 heads of 128, 11008 MLP, 32000 vocab) + projector from
    CLIP-L (16 heads of 64), at ``scale`` of every head size; the MLP keeps LLaMA's ratio to the width."""
    h, vision = 32 * scaled_head(128, scale), 16 * scaled_head(64, scale)
    ff = 11008 * h // 4096
    vocab = 32000  # the real tokenizer's, at every scale
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), "BF16")]
    for i in range(32):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + f"self_attn.{n}_proj.weight", (h, h), "BF16") for n in "qkvo"]
        specs += [TensorSpec(p + "mlp.gate_proj.weight", (ff, h), "BF16"),
                  TensorSpec(p + "mlp.up_proj.weight", (ff, h), "BF16"),
                  TensorSpec(p + "mlp.down_proj.weight", (h, ff), "BF16"),
                  TensorSpec(p + "input_layernorm.weight", (h,), "BF16"),
                  TensorSpec(p + "post_attention_layernorm.weight", (h,), "BF16")]
    specs += [TensorSpec("model.norm.weight", (h,), "BF16"),
              TensorSpec("model.mm_projector.0.weight", (h, vision), "BF16"),
              TensorSpec("model.mm_projector.0.bias", (h,), "BF16"),
              TensorSpec("model.mm_projector.2.weight", (h, h), "BF16"),
              TensorSpec("model.mm_projector.2.bias", (h,), "BF16"),
              TensorSpec("lm_head.weight", (vocab, h), "BF16")]
    return specs


def vit_layer_specs(prefix: str, width: int, ff: int, dtype: str) -> list[TensorSpec]:
    """One ViT encoder layer's tensors (CLIP's and SigLIP's share the names): q/k/v/out projections with
    biases, the two layer norms, the MLP; ``prefix`` ends with the layer's dot."""
    shapes = [(f"self_attn.{n}.{k}", (width, width) if k == "weight" else (width,))
              for n in ("q_proj", "k_proj", "v_proj", "out_proj") for k in ("weight", "bias")]
    shapes += [(f"{n}.{k}", (width,)) for n in ("layer_norm1", "layer_norm2") for k in ("weight", "bias")]
    shapes += [("mlp.fc1.weight", (ff, width)), ("mlp.fc1.bias", (ff,)), ("mlp.fc2.weight", (width, ff)),
               ("mlp.fc2.bias", (width,))]
    return [TensorSpec(prefix + name, shape, dtype) for name, shape in shapes]


def synthesise(folder: Path, specs: list[TensorSpec], shard_size: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with SafetensorsWriter(folder, layout_shards(specs, shard_size)) as writer:
        for spec in specs:
            # random finite bf16 values: random mantissas, exponents near 1.0
            bits = rng.integers(0x3C00, 0x3F80, size=spec.shape, dtype=np.int16)
            writer.write(spec.name, torch.from_numpy(bits).view(torch.bfloat16))


def synthesise_bin(folder: Path, specs: list[TensorSpec], shard_size: int) -> None:
    """The same tensors as fp16 ``pytorch_model-*.bin`` shards + index, as ``save_pretrained`` left the
    original LLaVA-1.5 releases (``torch.save`` of each shard's state dict, one storage per tensor).

    The release has two shards (9.98 + 3.54 GB); smaller ones keep this script's own memory low and
    change nothing per byte for the reader.
    """
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = layout_shards([TensorSpec(s.name, s.shape, "F16") for s in specs], shard_size)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        state = {}
        for spec in shard.tensors:  # random finite fp16 values near 1.0
            bits = rng.integers(0x3000, 0x3C00, size=spec.shape, dtype=np.int16)
            state[spec.name] = torch.from_numpy(bits).view(torch.float16)
            weight_map[spec.name] = name
        torch.save(state, folder / name)
        del state
    total = sum(s.nbytes for s in shards)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time -v; return (wall seconds, peak RSS in GiB)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return hours * 3600 + minutes * 60 + seconds, rss_kb / 1024**2


def convert(src: str, dst: str, dtype: str) -> None:
    run(Conversion(open_source(src), LLAVA_RULES), dst, dtype=None if dtype == "none" else dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-convert"))
    parser.add_argument("--scale", type=float, default=1.0, help="width scale of every tensor (1.0 = real 7B)")
    parser.add_argument("--shard-size", type=float, default=5.0, help="source shard size in GB (default 5)")
    parser.add_argument("--convert", nargs=3, metavar=("SRC", "DST", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert:
        return convert(*args.convert)

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    specs = llava_7b_shapes(args.scale)
    total = sum(s.nbytes for s in specs)
    print(f"synthesising {len(specs)} tensors, {total / 1e9:.2f} GB bf16 in {work}/src ...", flush=True)
    try:
        synthesise(work / "src", specs, int(args.shard_size * 1e9))
        rows = []
        cached = drop_caches()
        rows.append(("cp -r", *timed(["cp", "-r", str(work / "src"), str(work / "copy")])))
        shutil.rmtree(work / "copy")
        for label, dtype in (("vlmkit convert (rename + bf16->fp16)", "F16"), ("vlmkit convert (rename only)", "none")):
            drop_caches()
            rows.append((label, *timed([sys.executable, __file__, "--convert", str(work / "src"), str(work / "out"),
                                        dtype])))
            out = open_source(work / "out")
            assert len(out.keys()) == len(specs)
            shutil.rmtree(work / "out")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # never leave 40 GB behind

    copy_wall = rows[0][1]
    print(f"\ncheckpoint: {len(specs)} tensors, {total / 1e9:.2f} GB, page cache dropped: {'yes' if cached else 'no'}")
    print(f"| step | wall time (s) | x copy | peak RSS (GiB) |")
    print(f"|---|---:|---:|---:|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {wall / copy_wall:.2f} | {rss:.2f} |")
    ok = all(rss <= 1.0 for _, _, rss in rows[1:]) and rows[2][1] <= 1.05 * copy_wall
    print(f"\ntargets (RSS <= 1 GiB, rename only <= 1.05 x copy): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
