"""LLaVA -> GGUF (language model + mmproj): vlmkit's one command vs llama.cpp's own tools, wall time and peak RSS.

Synthesises (random bf16 values, no model code) a transformers ``LlavaForConditionalGeneration``
folder in the published llava-hf layout, ~1.4 B parameters in 1 GB safetensors shards:
a TinyLlama-1.1B-shaped language model (22 layers, 2048 wide, 5632 MLP, 32 heads / 4 KV heads,
vocabulary 32064 with the real LLaMA ``tokenizer.model`` + ``<image>``/``<pad>``), a
CLIP-L/336-shaped tower (24 x 1024, 336 px, patch 14) and an mlp2x_gelu projector; plus the
CLIP-L/336 folder it was trained from (full ``CLIPModel``, fp16), which llama.cpp's LLaVA-1.5
route reads. Then, each step its own process under ``/usr/bin/time -v``:

* vlmkit: ``vlmkit convert LLAVA OUT --to gguf --dtype f16`` (both files, one command);
* llama.cpp: ``convert_hf_to_gguf.py --outtype f16`` (the language model),
  ``llava_surgery_v2.py`` (extracts ``llava.projector``), ``convert_image_encoder_to_gguf.py
  --llava-projector`` (the mmproj) - all from the llama-cpp-python source distribution.

Targets: vlmkit's wall time <= the sum of llama.cpp's steps (issue 6); vlmkit's peak RSS <= 0.7 GiB (issue 22).

Usage:
    .venv/bin/python benchmarks/gguf_export.py                  # full size (~3.7 GB source, ~12 GB free disk)
    .venv/bin/python benchmarks/gguf_export.py --scale 0.25     # quick run
    .venv/bin/python benchmarks/gguf_export.py --llama-cpp DIR  # an unpacked llama.cpp tree (else downloaded once)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from convert_llava import make_clip
from convert_stream import drop_caches, scaled_head, timed, vit_layer_specs
from vlmkit.families.llava import tiny
from vlmkit.tensors.safetensors_io import SafetensorsWriter, TensorSpec, layout_shards

VOCAB = 32064  # 32000 + <image> + <pad>, padded to a multiple of 64 as the llava-hf conversion does


def llava_specs(scale: float) -> tuple[list[TensorSpec], dict]:
    """TinyLlama-1.1B (32 heads / 4 KV heads of 64) + CLIP-L/336 tower (16 heads of 64) + mlp2x_gelu projector,
    published llava-hf names, bf16; ``scale`` scales the head sizes, the MLPs keep their ratio to the width."""
    head = scaled_head(64, scale)
    h, kv, v = 32 * head, 4 * head, 16 * head
    ff, vf = 5632 * h // 2048, 4 * v
    lm, tower = "language_model.model.", "vision_tower.vision_model."
    specs = [TensorSpec(lm + "embed_tokens.weight", (VOCAB, h), "BF16")]
    for i in range(22):
        p = f"{lm}layers.{i}."
        specs += [TensorSpec(p + "self_attn.q_proj.weight", (h, h), "BF16"),
                  TensorSpec(p + "self_attn.k_proj.weight", (kv, h), "BF16"),
                  TensorSpec(p + "self_attn.v_proj.weight", (kv, h), "BF16"),
                  TensorSpec(p + "self_attn.o_proj.weight", (h, h), "BF16"),
                  TensorSpec(p + "mlp.gate_proj.weight", (ff, h), "BF16"),
                  TensorSpec(p + "mlp.up_proj.weight", (ff, h), "BF16"),
                  TensorSpec(p + "mlp.down_proj.weight", (h, ff), "BF16"),
                  TensorSpec(p + "input_layernorm.weight", (h,), "BF16"),
                  TensorSpec(p + "post_attention_layernorm.weight", (h,), "BF16")]
    specs += [TensorSpec(lm + "norm.weight", (h,), "BF16"), TensorSpec("language_model.lm_head.weight", (VOCAB, h), "BF16")]
    specs += [TensorSpec(tower + "embeddings.class_embedding", (v,), "BF16"),
              TensorSpec(tower + "embeddings.patch_embedding.weight", (v, 3, 14, 14), "BF16"),
              TensorSpec(tower + "embeddings.position_embedding.weight", (577, v), "BF16"),
              TensorSpec(tower + "pre_layrnorm.weight", (v,), "BF16"), TensorSpec(tower + "pre_layrnorm.bias", (v,), "BF16")]
    for i in range(24):
        specs += vit_layer_specs(f"{tower}encoder.layers.{i}.", v, vf, "BF16")
    specs += [TensorSpec(tower + "post_layernorm.weight", (v,), "BF16"),
              TensorSpec(tower + "post_layernorm.bias", (v,), "BF16"),
              TensorSpec("multi_modal_projector.linear_1.weight", (h, v), "BF16"),
              TensorSpec("multi_modal_projector.linear_1.bias", (h,), "BF16"),
              TensorSpec("multi_modal_projector.linear_2.weight", (h, h), "BF16"),
              TensorSpec("multi_modal_projector.linear_2.bias", (h,), "BF16")]
    dims = {"hidden": h, "intermediate": ff, "kv_heads": 4, "heads": 32, "vision": v, "vision_intermediate": vf,
            "vision_heads": 16}
    return specs, dims


def make_llava(folder: Path, scale: float) -> None:
    specs, d = llava_specs(scale)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with SafetensorsWriter(folder, layout_shards(specs, int(1e9))) as writer:
        for spec in specs:
            bits = rng.integers(0x3C00, 0x3F80, size=spec.shape, dtype=np.int16)  # finite, near +-1
            bits = np.where(rng.random(spec.shape) < 0.5, bits, bits | np.int16(-0x8000)).astype(np.int16)
            writer.write(spec.name, torch.from_numpy(bits).view(torch.bfloat16) * 0.02)
    text = {"model_type": "llama", "hidden_size": d["hidden"], "intermediate_size": d["intermediate"],
            "num_hidden_layers": 22, "num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"],
            "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001}
    vision = {"model_type": "clip_vision_model", "hidden_size": d["vision"], "intermediate_size": d["vision_intermediate"],
              "num_hidden_layers": 24, "num_attention_heads": d["vision_heads"], "image_size": 336,
              "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
              "vision_config": vision, "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 576,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": tiny.CLIP_MEAN, "image_std": tiny.CLIP_STD, "resample": 3, "size": {"shortest_edge": 336},
        "image_processor_type": "CLIPImageProcessor"}))
    tiny.copy_tokenizer(folder, "llama")
    (folder / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<pad>": 32001}))


def llama_cpp_tree(given: Path | None) -> Path:
    """llama.cpp's source tree: ``given``, else the one ``scripts/llama-cpp-source.sh`` keeps (the llama.cpp
    build's, fetched once into ~/.cache/vlmkit)."""
    if given:
        return given
    script = Path(__file__).parents[1] / "scripts" / "llama-cpp-source.sh"
    return Path(subprocess.run(["bash", str(script), sys.executable], check=True, capture_output=True,
                               text=True).stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-gguf"))
    parser.add_argument("--scale", type=float, default=1.0, help="width scale of every tensor (1.0 = full size)")
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree (default: from the sdist, cached)")
    args = parser.parse_args()
    tree = llama_cpp_tree(args.llama_cpp)
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    llava, clip = work / "llava-1.4b-hf", work / "clip-vit-large-patch14-336"
    python, vlmkit = sys.executable, str(Path(sys.executable).parent / "vlmkit")
    env_gguf = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    try:
        make_llava(llava, args.scale)
        make_clip(clip, args.scale)
        size = sum(f.stat().st_size for f in llava.rglob("*") if f.is_file())
        params = size / 2
        print(f"synthesised {params / 1e9:.2f} B parameters ({size / 1e9:.2f} GB bf16) in {llava}", flush=True)
        rows = []
        cached = drop_caches()
        rows.append(("vlmkit convert --to gguf --dtype f16 (both files)",
                     *timed([vlmkit, "convert", str(llava), str(work / "vlmkit"), "--to", "gguf", "--quiet"])))
        drop_caches()
        rows.append(("llama.cpp convert_hf_to_gguf.py --outtype f16 (language model)",
                     *timed([python, str(tree / "convert_hf_to_gguf.py"), str(llava), "--outtype", "f16",
                             "--outfile", str(work / "llama-cpp-lm-f16.gguf")])))
        drop_caches()
        legacy = tree / "tools" / "mtmd" / "legacy-models"
        os.environ["PYTHONPATH"] = env_gguf["PYTHONPATH"]  # the legacy scripts import the tree's gguf-py
        rows.append(("llama.cpp llava_surgery_v2.py (llava.projector)",
                     *timed([python, str(legacy / "llava_surgery_v2.py"), "-m", str(llava)])))
        drop_caches()
        rows.append(("llama.cpp convert_image_encoder_to_gguf.py (mmproj)",
                     *timed([python, str(legacy / "convert_image_encoder_to_gguf.py"), "-m", str(clip),
                             "--llava-projector", str(llava / "llava.projector"), "--output-dir",
                             str(work / "llama-cpp-mmproj")])))
        outputs = {p.name: p.stat().st_size for p in [*work.glob("vlmkit/*.gguf"), *work.glob("llama-cpp-*.gguf"),
                                                       *work.glob("llama-cpp-mmproj/*.gguf")]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, theirs = rows[0], rows[1:]
    total = sum(r[1] for r in theirs)
    print(f"\nsource: {params / 1e9:.2f} B parameters, bf16, 1 GB shards; page cache dropped: {'yes' if cached else 'no'}")
    print("outputs: " + ", ".join(f"{n} {s / 1e9:.2f} GB" for n, s in sorted(outputs.items())))
    print("| step | wall time (s) | peak RSS (GiB) |")
    print("|---|---:|---:|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} |")
    print(f"| llama.cpp, all three steps | {total:.1f} | {max(r[2] for r in theirs):.2f} (max) |")
    print(f"\ntargets: vlmkit wall <= llama.cpp's sum {total:.1f} s (issue 6): {'met' if ours[1] <= total else 'NOT met'}; "
          f"vlmkit peak RSS <= 0.7 GiB (issue 22; 1 GiB in issue 6): {'met' if ours[2] <= 0.7 else 'NOT met'}")


if __name__ == "__main__":
    main()
