"""Original LLaVA-OneVision-7B -> transformers ``LlavaOnevision``: wall time and peak RSS beside LLaVA-1.5-7B's.

Synthesises (random bf16 values, no model code) an ORIGINAL ``lmms-lab/llava-onevision-qwen2-7b-ov``
checkpoint as the release lays it out: Qwen2-7B (3584 wide, 28 layers, 28 heads / 4 KV heads, q/k/v
biases, 152,064 untied rows), the trimmed SigLIP so400m tower inside (26 layers, 729 positions,
``post_layernorm``, no head), the mlp2x_gelu projector and ``model.image_newline``, in bf16
``model-*.safetensors`` shards + index, with the release's ``config.json`` (``tests/fixtures/configs``)
at the synthesised sizes. Then, each as its own process under ``/usr/bin/time -v``:

* ``cp -r`` of the checkpoint;
* ``vlmkit convert`` of it (``families/llava/onevision.py``: config, tensors in the llava-hf layout, the
  real Qwen2 tokenizer with ``<image>`` and ``<video>`` added, the vocabulary grown to 152,128 rows, processor);
* ``benchmarks/convert_llava.py``'s LLaVA-1.5-7B checkpoint through ``vlmkit convert``, for comparison.

Target (issue 20): the OneVision conversion streams with the same peak memory as LLaVA-1.5's.

Usage:
    .venv/bin/python benchmarks/convert_onevision.py                # full size (~16 GB + LLaVA-1.5's 14 GB)
    .venv/bin/python benchmarks/convert_onevision.py --scale 0.0625 # quick run (widths scaled, depths kept)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from convert_llava import make_clip, make_llava
from convert_stream import drop_caches, scaled_head, synthesise, timed, vit_layer_specs
from vlmkit.families.llava import tiny
from vlmkit.tensors.safetensors_io import TensorSpec

RELEASE = Path(__file__).parent.parent / "tests" / "fixtures" / "configs" / "llava-onevision-qwen2-7b-ov.json"
TOWER = "model.vision_tower.vision_tower.vision_model."


def onevision_7b_shapes(scale: float) -> tuple[list[TensorSpec], dict]:
    """The release's tensors (bf16) at ``scale`` of every width (head counts kept, head sizes scaled)."""
    head = scaled_head(128, scale)
    h, kv, ff, vocab = 28 * head, 4 * head, max(8, int(18944 * scale)), 152064
    vhead = scaled_head(72, scale)
    v, vff = 16 * vhead, max(8, int(4304 * scale))
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), "BF16")]
    for i in range(28):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + "self_attn.q_proj.weight", (h, h), "BF16"),
                  TensorSpec(p + "self_attn.q_proj.bias", (h,), "BF16"),
                  TensorSpec(p + "self_attn.k_proj.weight", (kv, h), "BF16"),
                  TensorSpec(p + "self_attn.k_proj.bias", (kv,), "BF16"),
                  TensorSpec(p + "self_attn.v_proj.weight", (kv, h), "BF16"),
                  TensorSpec(p + "self_attn.v_proj.bias", (kv,), "BF16"),
                  TensorSpec(p + "self_attn.o_proj.weight", (h, h), "BF16"),
                  TensorSpec(p + "mlp.gate_proj.weight", (ff, h), "BF16"),
                  TensorSpec(p + "mlp.up_proj.weight", (ff, h), "BF16"),
                  TensorSpec(p + "mlp.down_proj.weight", (h, ff), "BF16"),
                  TensorSpec(p + "input_layernorm.weight", (h,), "BF16"),
                  TensorSpec(p + "post_attention_layernorm.weight", (h,), "BF16")]
    specs += [TensorSpec("model.norm.weight", (h,), "BF16"), TensorSpec("model.image_newline", (h,), "BF16"),
              TensorSpec(TOWER + "embeddings.patch_embedding.weight", (v, 3, 14, 14), "BF16"),
              TensorSpec(TOWER + "embeddings.patch_embedding.bias", (v,), "BF16"),
              TensorSpec(TOWER + "embeddings.position_embedding.weight", (729, v), "BF16")]
    for i in range(26):  # the original deletes the 27th layer before training and saving
        specs += vit_layer_specs(f"{TOWER}encoder.layers.{i}.", v, vff, "BF16")
    specs += [TensorSpec(TOWER + "post_layernorm.weight", (v,), "BF16"),
              TensorSpec(TOWER + "post_layernorm.bias", (v,), "BF16"),
              TensorSpec("model.mm_projector.0.weight", (h, v), "BF16"),
              TensorSpec("model.mm_projector.0.bias", (h,), "BF16"),
              TensorSpec("model.mm_projector.2.weight", (h, h), "BF16"),
              TensorSpec("model.mm_projector.2.bias", (h,), "BF16"),
              TensorSpec("lm_head.weight", (vocab, h), "BF16")]
    sizes = {"hidden_size": h, "intermediate_size": ff, "mm_hidden_size": v, "vision_heads": 16}
    return specs, sizes


def make_onevision(folder: Path, scale: float) -> None:
    specs, sizes = onevision_7b_shapes(scale)
    synthesise(folder, specs, int(4.9e9))
    config = json.loads(RELEASE.read_text())
    config.update(hidden_size=sizes["hidden_size"], intermediate_size=sizes["intermediate_size"],
                  mm_hidden_size=sizes["mm_hidden_size"])
    if scale != 1.0:  # not the published so400m shapes: a siglip name the table lacks, heads given below
        config["mm_vision_tower"] = "bench/siglip-scaled-patch14-384"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tiny.copy_tokenizer(folder, "qwen2")  # the real Qwen2 vocabulary: <image> and <video> grow the rows, as for the release


def convert_command(src: Path, dst: Path, scale: float) -> list[str]:
    """``vlmkit convert`` as a user runs it on the release (the tower's head count given when it is scaled)."""
    heads = []
    if scale != 1.0:
        (src.parent / "heads.json").write_text(json.dumps({"vision_config": {"num_attention_heads": 16}}))
        heads = ["--config", str(src.parent / "heads.json")]
    return [str(Path(sys.executable).parent / "vlmkit"), "convert", str(src), str(dst), "--quiet", *heads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-onevision"))
    parser.add_argument("--scale", type=float, default=1.0, help="width scale of every tensor (1.0 = real 7B)")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    try:
        make_onevision(work / "llava-onevision-qwen2-7b-ov", args.scale)
        size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        print(f"synthesised {size / 1e9:.2f} GB in {work}", flush=True)
        cached = drop_caches()
        rows.append(("OneVision: cp -r", *timed(["cp", "-r", str(work / "llava-onevision-qwen2-7b-ov"),
                                                 str(work / "copy")])))
        shutil.rmtree(work / "copy")
        drop_caches()
        rows.append(("OneVision: convert (original -> LlavaOnevision)",
                     *timed(convert_command(work / "llava-onevision-qwen2-7b-ov", work / "out", args.scale))))
        shutil.rmtree(work, ignore_errors=True)
        make_clip(work / "clip-vit-large-patch14-336", args.scale)
        make_llava(work / "llava-v1.5-7b", work / "clip-vit-large-patch14-336", args.scale)
        drop_caches()
        vlmkit = str(Path(sys.executable).parent / "vlmkit")
        rows.append(("LLaVA-1.5: vlmkit convert (original -> Llava)",
                     *timed([vlmkit, "convert", str(work / "llava-v1.5-7b"), str(work / "out"), "--quiet",
                             "--vision-tower", str(work / "clip-vit-large-patch14-336")])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nOneVision source: {size / 1e9:.2f} GB (scale {args.scale}), page cache dropped: "
          f"{'yes' if cached else 'no'}")
    print("| step | wall time (s) | peak RSS (GiB) |")
    print("|---|---:|---:|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} |")
    onevision, llava = rows[1][2], rows[2][2]
    verdict = "met" if onevision <= 1.1 * llava else f"NOT met (+{onevision - llava:.2f} GiB)"
    print(f"\ntarget (issue 20: OneVision's peak RSS the same as LLaVA-1.5's, within 10 %): {verdict}")
    print(f"bound (issue 22: any conversion's peak RSS <= 1 GiB): {'met' if onevision <= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
