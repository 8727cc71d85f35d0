"""LLaVA: every original input form converted and verified through the CLI, and the failure cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vlmkit.families.llava import tiny
from vlmkit.tensors import TensorInfo, open_source

from ..conftest import run_cli, save_with_transformers

PUBLISHED_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                      "multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.", "image_newline")


def convert_and_verify(src, dst, *extra):
    r = run_cli("convert", src, dst, "--quiet", *extra)
    assert r.code == 0, r.err
    report = dst.parent / f"{dst.name}-report.json"
    v = run_cli("verify", src, dst, "--json", report, *extra)
    data = json.loads(report.read_text())
    return r, v, data


def assert_passed(v, data):
    assert v.code == 0, v.out + v.err
    assert data["verdict"] == "PASS", v.out
    names = [c["name"] for c in data["checks"]]
    assert names == ["pixel values", "input ids", "logits", "greedy tokens", "batched generation"]


def test_llava15_bin_shards_with_external_clip(llava_parts, tmp_path):
    dst = tmp_path / "llava-1.5-tiny-hf"
    _, v, data = convert_and_verify(llava_parts["v15"], dst)
    assert_passed(v, data)
    logits = next(c for c in data["checks"] if c["name"] == "logits")
    assert logits["measured"]["max_abs_diff"] <= 1e-4

    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == 32000 and config["text_config"]["vocab_size"] == 32064
    assert config["pad_token_id"] == 32001 and config["torch_dtype"] == "float32"
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    names = open_source(dst).keys()
    assert all(n.startswith(PUBLISHED_PREFIXES) for n in names), [n for n in names if not n.startswith(PUBLISHED_PREFIXES)]
    assert "image_newline" not in names
    assert run_cli("verify-files", dst).code == 0


def test_published_layout_is_what_transformers_loads(llava_parts, tmp_path):
    """The folder loads into transformers 5 with every weight placed (nothing randomly initialised)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dst = tmp_path / "out"
    assert run_cli("convert", llava_parts["v15"], dst, "--quiet").code == 0
    model, info = LlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    src = open_source(llava_parts["v15"])
    assert torch.equal(model.lm_head.weight[:32000], src.read("lm_head.weight"))
    processor = AutoProcessor.from_pretrained(dst)
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    assert "vlmkit template: llava_v1" in processor.chat_template


def test_llava_next_mistral_safetensors_tower_inside(llava_parts, tmp_path):
    dst = tmp_path / "llava-next-tiny-hf"
    _, v, data = convert_and_verify(llava_parts["next"], dst, "--vision-tower", llava_parts["clip"])
    assert_passed(v, data)
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "mistral" and "image_newline" in open_source(dst).keys()
    # the tower comes from the checkpoint (fine-tuned), not from the CLIP folder
    tower = open_source(dst).read("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
    clip = torch.load(llava_parts["clip"] / "pytorch_model.bin", weights_only=True)
    assert not torch.equal(tower, clip["vision_model.encoder.layers.0.mlp.fc1.weight"])


def test_llava_next_without_tower_folder_derives_the_vision_config(llava_parts, tmp_path):
    """mm_vision_tower unreachable and unknown: shapes, head count from --config, the rest assumed when asked."""
    src = tmp_path / "next-moved"
    shutil.copytree(llava_parts["next"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_vision_tower"] = "someone/clip-vit-unknown"
    (src / "config.json").write_text(json.dumps(cfg))
    override = tmp_path / "target.json"
    override.write_text(json.dumps({"vision_config": {"num_attention_heads": 2}}))
    r = run_cli("convert", src, tmp_path / "out", "--quiet", "--config", override, "--assume-clip-defaults")
    assert r.code == 0, r.err
    vision = json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["image_size"], vision["num_attention_heads"]) \
        == (32, 3, 56, 2)


def test_lora_checkpoint_merged_with_base(llava_parts, llava_lora, tmp_path):
    dst = tmp_path / "lora-merged-hf"
    _, v, data = convert_and_verify(llava_lora, dst, "--model-base", llava_parts["base"])
    assert_passed(v, data)  # the reference merges with peft, the converter with its own op
    merged = open_source(dst).read("language_model.model.layers.0.self_attn.q_proj.weight")
    base = open_source(llava_parts["base"]).read("model.layers.0.self_attn.q_proj.weight")
    assert not torch.equal(merged, base)


def test_projector_only_with_parts(llava_parts, llava_projector, tmp_path):
    dst = tmp_path / "pretrain-hf"
    _, v, data = convert_and_verify(llava_projector, dst, "--model-base", llava_parts["base"])
    assert_passed(v, data)
    projector = torch.load(llava_projector / "mm_projector.bin", weights_only=True)
    assert torch.equal(open_source(dst).read("multi_modal_projector.linear_2.bias"), projector["model.mm_projector.2.bias"])


def test_vocabulary_growth_is_reproducible_with_seed(llava_parts, tmp_path):
    rows = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert run_cli("convert", llava_parts["v15"], tmp_path / name, "--quiet", "--seed", seed).code == 0
        rows[name] = open_source(tmp_path / name).read("language_model.model.embed_tokens.weight")[32000:]
    assert rows["a"].shape == (64, 64)
    assert torch.equal(rows["a"], rows["b"]) and not torch.equal(rows["a"], rows["c"])
    original = open_source(llava_parts["v15"]).read("model.embed_tokens.weight")
    # drawn around the embeddings' mean with 1e-5 x their covariance: far closer to the mean than any row
    assert (rows["a"] - original.mean(0)).abs().max() < original.std() * 0.05


def test_fp16_output(llava_parts, tmp_path):
    dst = tmp_path / "fp16"
    assert run_cli("convert", llava_parts["v15"], dst, "--quiet", "--dtype", "float16").code == 0
    assert open_source(dst).info("language_model.model.layers.0.mlp.up_proj.weight").dtype == "F16"
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float16"


# ------------------------------------------------------------------------- failures


def _fails(src, dst, *extra) -> str:
    r = run_cli("convert", src, dst, "--quiet", *extra)
    assert r.code == 1, (r.out, r.err)
    assert "Traceback" not in r.err
    assert not dst.exists() and not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())
    return r.err


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_vision_tower(llava_parts, tmp_path):
    src = _edited_copy(llava_parts["v15"], tmp_path / "llava-v1.5-x", mm_vision_tower=str(tmp_path / "nowhere"))
    err = _fails(src, tmp_path / "out")
    assert "vision tower" in err and "--vision-tower" in err


def test_mm_hidden_size_not_matching_tower(llava_parts, tmp_path):
    src = _edited_copy(llava_parts["v15"], tmp_path / "llava-v1.5-x", mm_hidden_size=48)
    err = _fails(src, tmp_path / "out")
    assert "mm_hidden_size is 48 but the vision tower is 32 wide" in err


def test_unknown_projector_type(llava_parts, tmp_path):
    src = _edited_copy(llava_parts["v15"], tmp_path / "llava-v1.5-x", mm_projector_type="resampler")
    err = _fails(src, tmp_path / "out")
    assert "unknown mm_projector_type 'resampler'" in err


def test_lora_without_base(llava_lora, tmp_path):
    err = _fails(llava_lora, tmp_path / "out")
    assert "LoRA adapter" in err and "--model-base" in err


def test_mismatched_vocabulary(llava_parts, tmp_path):
    src = _edited_copy(llava_parts["v15"], tmp_path / "llava-v1.5-x", vocab_size=32064)
    err = _fails(src, tmp_path / "out")
    assert "vocabulary does not match" in err and "vocab_size is 32064" in err


def test_lora_on_the_wrong_base(llava_parts, llava_lora, tmp_path):
    wrong = tiny.make_base_llm(tmp_path / "other-base", tiny.TinySizes(hidden=96, intermediate=192, heads=3, kv_heads=3))
    err = _fails(llava_lora, tmp_path / "out", "--model-base", wrong)
    assert "LoRA factors" in err or "problem" in err


def test_verify_catches_a_wrong_conversion(llava_parts, tmp_path):
    """The parity report is not a rubber stamp: a perturbed projector bias fails logits and says so."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "out"
    r = run_cli("convert", llava_parts["v15"], dst, "--quiet", "--verify")
    assert r.code == 0 and "verdict: PASS" in r.out
    tensors = load_file(dst / "model.safetensors")
    tensors["multi_modal_projector.linear_2.bias"] += 0.05
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    v = run_cli("verify", llava_parts["v15"], dst)
    assert v.code == 3
    assert "[FAIL] logits" in v.out and "verdict: FAIL" in v.out
    assert "[pass] input ids" in v.out and "[pass] pixel values" in v.out


def test_verify_reads_the_dtype_transformers_5_saves(llava_parts, tmp_path):
    """transformers 5's save_pretrained writes "dtype" where 4.x (and vlmkit) write "torch_dtype": a float16
    folder it saved is judged at float16's tolerances, not float32's."""
    import vlmkit

    f16 = tmp_path / "f16"
    assert run_cli("convert", llava_parts["v15"], f16, "--quiet", "--dtype", "float16").code == 0
    saved = save_with_transformers(f16, tmp_path / "saved", "modules")
    config = json.loads((saved / "config.json").read_text())
    assert config["dtype"] == "float16" and "torch_dtype" not in config
    report = vlmkit.verify(llava_parts["v15"], saved, max_new_tokens=2)
    logits = next(c for c in report.checks if c.name == "logits")
    assert logits.passed and logits.tolerance == "max abs diff <= 0.05, cosine >= 0.999", logits


def test_new_rows_follow_the_scripts_distribution():
    """The rows are N(mu, 1e-5 * Sigma) of the embeddings (Sigma biased, / n), as transformers' scripts draw them.

    The reference statistics are torch's own mean and covariance of the embedding matrix.
    """
    from vlmkit.families.llava.convert import EmbeddingDistribution

    g = torch.Generator().manual_seed(3)
    e = (torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g) + 2.0).half()

    class Source:  # a reader without row reads: read whole once
        def info(self, name):
            return TensorInfo(name, tuple(e.shape), "F16", e.numel() * 2, Path("embed.bin"))

        def read(self, name):
            assert name == "embed"
            return e.clone()

    draws = EmbeddingDistribution(Source(), "embed")(e, 40000, torch.Generator().manual_seed(0))
    mu = e.double().mean(0)
    sigma = 1e-5 * torch.cov(e.double().T, correction=0)
    assert draws.shape == (40000, 6)
    assert torch.allclose(draws.double().mean(0), mu, atol=4 * sigma.diag().max().sqrt().item() / 200)
    # the sample covariance of 40000 draws is within a few percent of the distribution's
    assert torch.allclose(torch.cov(draws.double().T), sigma, atol=0.05 * sigma.diag().max().item())
