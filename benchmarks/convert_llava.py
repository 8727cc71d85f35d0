"""Original LLaVA-1.5-7B -> transformers with ``vlmkit convert``: wall time and peak RSS vs copying.

Synthesises (random values, no model code) an ORIGINAL LLaVA-1.5-7B checkpoint: the
tensors of ``convert_stream.py`` (LLaMA-2-7B + mlp2x_gelu projector) as the release ships
them, fp16 ``pytorch_model-*.bin`` shards + index, with the original ``config.json`` and
the real LLaMA tokenizer, plus a CLIP-L/336 tower
folder (``openai/clip-vit-large-patch14-336``'s shapes, full CLIPModel, fp16). Then, in
one run, each as its own process under ``/usr/bin/time -v``:

* ``cp -r`` of both folders;
* ``vlmkit convert LLAVA OUT --vision-tower CLIP`` (the full conversion: renames,
  vocabulary growth 32000 -> 32064 from the embeddings' statistics, tower, processor).

Targets (issue 22): peak RSS <= 1 GiB, wall time <= 1.2 x the copy's.

Usage:
    .venv/bin/python benchmarks/convert_llava.py                # full size (~14.1 GB, needs ~45 GB free)
    .venv/bin/python benchmarks/convert_llava.py --scale 0.1    # quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from convert_stream import drop_caches, llava_7b_shapes, scaled_head, synthesise_bin, timed, vit_layer_specs
from vlmkit.families.llava import tiny
from vlmkit.tensors.safetensors_io import SafetensorsWriter, TensorSpec, layout_shards


def clip_l336_specs(scale: float) -> list[TensorSpec]:
    """openai/clip-vit-large-patch14-336: ViT-L/14 at 336 (24 layers, 16 heads of 64) + text tower (12 layers,
    12 heads of 64), MLPs 4 x the width, fp16; ``scale`` scales the head sizes (``scaled_head``)."""
    v, t = 16 * scaled_head(64, scale), 12 * scaled_head(64, scale)
    vf, tf = 4 * v, 4 * t
    specs = [TensorSpec("vision_model.embeddings.class_embedding", (v,), "F16"),
             TensorSpec("vision_model.embeddings.patch_embedding.weight", (v, 3, 14, 14), "F16"),
             TensorSpec("vision_model.embeddings.position_embedding.weight", (577, v), "F16"),
             TensorSpec("vision_model.pre_layrnorm.weight", (v,), "F16"),
             TensorSpec("vision_model.pre_layrnorm.bias", (v,), "F16")]
    for tower, width, ff, layers in (("vision_model", v, vf, 24), ("text_model", t, tf, 12)):
        for i in range(layers):
            specs += vit_layer_specs(f"{tower}.encoder.layers.{i}.", width, ff, "F16")
    specs += [TensorSpec("vision_model.post_layernorm.weight", (v,), "F16"),
              TensorSpec("vision_model.post_layernorm.bias", (v,), "F16"),
              TensorSpec("text_model.embeddings.token_embedding.weight", (49408, t), "F16"),
              TensorSpec("text_model.embeddings.position_embedding.weight", (77, t), "F16"),
              TensorSpec("text_model.final_layer_norm.weight", (t,), "F16"),
              TensorSpec("text_model.final_layer_norm.bias", (t,), "F16"),
              TensorSpec("visual_projection.weight", (768, v), "F16"),
              TensorSpec("text_projection.weight", (768, t), "F16"),
              TensorSpec("logit_scale", (), "F16")]
    return specs


def make_clip(folder: Path, scale: float) -> None:
    folder.mkdir(parents=True)
    specs = clip_l336_specs(scale)
    rng = np.random.default_rng(1)
    with SafetensorsWriter(folder, layout_shards(specs, 1 << 40)) as writer:
        for spec in specs:
            values = np.asarray(rng.standard_normal(spec.shape, dtype=np.float32) * 0.02)
            writer.write(spec.name, torch.from_numpy(values).half())
    v, t = specs[0].shape[0], specs[-4].shape[0]
    vision = {"hidden_size": v, "intermediate_size": 4 * v,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    text = {"hidden_size": t, "intermediate_size": 4 * t, "num_hidden_layers": 12,
            "num_attention_heads": 12, "vocab_size": 49408, "projection_dim": 768}
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "model_type": "clip",
                                                    "projection_dim": 768, "vision_config": vision, "text_config": text}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3, "size": 336,
        "image_mean": tiny.CLIP_MEAN, "image_std": tiny.CLIP_STD}))


def make_llava(folder: Path, clip: Path, scale: float) -> None:
    specs = llava_7b_shapes(scale)
    synthesise_bin(folder, specs, int(2e9))
    shapes = {spec.name: spec.shape for spec in specs}
    h, vision = shapes["model.mm_projector.0.weight"]
    sizes = tiny.TinySizes(hidden=h, intermediate=shapes["model.layers.0.mlp.up_proj.weight"][0], layers=32, heads=32,
                           kv_heads=32, vision_hidden=vision)
    config = tiny.llava_config("llama", sizes, clip, next_=False)
    config.update(torch_dtype="float16", mm_vision_tower="openai/clip-vit-large-patch14-336")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tiny.copy_tokenizer(folder, "llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-llava"))
    parser.add_argument("--scale", type=float, default=1.0, help="width scale of every tensor (1.0 = real 7B)")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    try:
        make_clip(work / "clip-vit-large-patch14-336", args.scale)
        make_llava(work / "llava-v1.5-7b", work / "clip-vit-large-patch14-336", args.scale)
        size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        print(f"synthesised {size / 1e9:.2f} GB in {work}", flush=True)
        cached = drop_caches()
        (work / "copy").mkdir()
        rows = [("cp -r (checkpoint + tower)",
                 *timed(["cp", "-r", str(work / "llava-v1.5-7b"), str(work / "clip-vit-large-patch14-336"),
                         str(work / "copy")]))]
        shutil.rmtree(work / "copy")  # the disk holds the source and one output at a time
        drop_caches()
        vlmkit = str(Path(sys.executable).parent / "vlmkit")
        rows.append(("vlmkit convert (original -> transformers)",
                     *timed([vlmkit, "convert", str(work / "llava-v1.5-7b"), str(work / "out"), "--quiet",
                             "--vision-tower", str(work / "clip-vit-large-patch14-336")])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    copy_wall = rows[0][1]
    print(f"\nsource: {size / 1e9:.2f} GB, page cache dropped: {'yes' if cached else 'no'}")
    print("| step | wall time (s) | x copy | peak RSS (GiB) |")
    print("|---|---:|---:|---:|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {wall / copy_wall:.2f} | {rss:.2f} |")
    ok = rows[1][2] <= 1.0 and rows[1][1] <= 1.2 * copy_wall
    print(f"\ntargets (RSS <= 1 GiB, wall <= 1.2 x copy): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
