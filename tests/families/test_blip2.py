"""BLIP-2 (LAVIS, OPT and Flan-T5): every input form converted and verified through the CLI, and the failure cases."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.conversion import compile_plan, reverse
from vlmkit.conversion.engine import apply_step
from vlmkit.families.blip2 import convert as blip2_convert
from vlmkit.families.blip2 import tiny
from vlmkit.families.blip2.language_models import row
from vlmkit.tensors import open_source

from ..conftest import run_cli

SIZES = tiny.TinySizes()
PUBLISHED_PREFIXES = ("vision_model.", "qformer.", "query_tokens", "language_projection.", "language_model.")


@pytest.fixture(scope="session")
def blip2(tmp_path_factory):
    """Tiny LAVIS checkpoints of every form, the parts they need, and the --config with the head counts."""
    root = tmp_path_factory.mktemp("blip2")
    override = root / "tiny-heads.json"
    override.write_text(json.dumps(SIZES.override()))
    return {
        "root": root,
        "config": override,
        "eva": tiny.make_eva_vit(root / "eva" / "eva_vit_g.pth", SIZES),
        "opt": tiny.make_language_model(root / "opt-tiny", "opt", SIZES),
        "t5": tiny.make_language_model(root / "flan-t5-tiny", "t5", SIZES),
        "opt-tokenizer": tiny.make_language_model(root / "opt-tiny-tokenizer", "opt", SIZES, weights=False),
        "t5-tokenizer": tiny.make_language_model(root / "flan-t5-tiny-tokenizer", "t5", SIZES, weights=False),
        "release-opt": tiny.make_release(root / "lavis" / "blip2_pretrained_opt2.7b.pth", "opt", SIZES),
        "release-t5": tiny.make_release(root / "lavis" / "blip2_pretrained_flant5xl.pth", "t5", SIZES),
        # a caption model fine-tunes the ViT at its own resolution (364 for COCO): here 70 = 5 x 14
        "full-opt": tiny.make_full(root / "full-opt" / "blip2_opt_full.pth", "opt", tiny.TinySizes(image_size=70)),
        "full-t5": tiny.make_full(root / "full-t5" / "blip2_t5_full.pth", "t5", SIZES),
    }


def parts(b, lm: str, *, full: bool = False) -> list:
    if full:
        return ["--language-model", b[f"{lm}-tokenizer"], "--config", b["config"]]
    return ["--vision", b["eva"], "--language-model", b[lm], "--config", b["config"]]


def convert_and_verify(src, dst, *extra):
    r = run_cli("convert", src, dst, "--quiet", *extra)
    assert r.code == 0, r.err
    report = dst.parent / f"{dst.name}-report.json"
    v = run_cli("verify", src, dst, "--json", report, "--max-new-tokens", "4", *extra)
    data = json.loads(report.read_text())
    assert v.code == 0 and data["verdict"] == "PASS", v.out + v.err
    assert [c["name"] for c in data["checks"]] == ["pixel values", "input ids", "logits", "greedy tokens",
                                                   "batched generation"]
    return r, data


def test_opt_release_with_vision_and_language_model_parts(blip2, tmp_path):
    dst = tmp_path / "blip2-opt-tiny"
    r, data = convert_and_verify(blip2["release-opt"], dst, *parts(blip2, "opt"))
    assert "BLIP-2 OPT (parts checkpoint" in r.err
    logits = next(c for c in data["checks"] if c["name"] == "logits")
    assert logits["measured"]["max_abs_diff"] <= 1e-4

    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]
    assert config["num_query_tokens"] == 4 and config["image_token_index"] == 50261
    assert config["text_config"]["eos_token_id"] == 202  # "\n": Blip2OPT stops generating there
    assert config["vision_config"]["image_size"] == 56 and config["qformer_config"]["cross_attention_frequency"] == 2
    names = open_source(dst).keys()
    assert all(n.startswith(PUBLISHED_PREFIXES) for n in names)
    assert "language_model.lm_head.weight" not in names  # tied to embed_tokens
    # the fused qkv bias: q_bias, zeros for k, v_bias
    eva = torch.load(blip2["eva"], weights_only=True)
    bias = open_source(dst).read("vision_model.encoder.layers.1.self_attn.qkv.bias")
    assert torch.equal(bias, torch.cat([eva["blocks.1.attn.q_bias"], torch.zeros(32), eva["blocks.1.attn.v_bias"]]))
    processor = json.loads((dst / "processor_config.json").read_text())
    assert processor["num_query_tokens"] == 4 and processor["image_processor"]["size"] == {"height": 56, "width": 56}
    assert run_cli("verify-files", dst).code == 0

    from transformers import Blip2ForConditionalGeneration

    _, info = Blip2ForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_t5_release_with_vision_and_language_model_parts(blip2, tmp_path):
    dst = tmp_path / "blip2-flan-t5-tiny"
    convert_and_verify(blip2["release-t5"], dst, *parts(blip2, "t5"))
    text = json.loads((dst / "config.json").read_text())["text_config"]
    assert (text["dense_act_fn"], text["bos_token_id"], text["tie_word_embeddings"]) == ("gelu", 1, False)
    out = open_source(dst)
    assert not torch.equal(out.read("language_model.lm_head.weight"), out.read("language_model.shared.weight"))
    assert "language_model.encoder.embed_tokens.weight" not in out.keys()


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_full_state_dict_with_tokenizer_folder(blip2, tmp_path, lm):
    """original_model.state_dict() in one file: ViT and LM inside; the folder gives only config + tokenizer."""
    dst = tmp_path / f"full-{lm}"
    r, _ = convert_and_verify(blip2[f"full-{lm}"], dst, *parts(blip2, lm, full=True))
    assert "(full checkpoint" in r.err
    plan = json.loads((dst / "vlmkit-manifest.json").read_text())["plan"]
    dropped = {d["name"] for d in plan["drops"]}
    assert "Qformer.bert.embeddings.position_ids" in dropped
    assert ("opt_model.lm_head.weight" in dropped) == (lm == "opt")
    size = json.loads((dst / "preprocessor_config.json").read_text())["size"]
    assert size == ({"height": 70, "width": 70} if lm == "opt" else {"height": 56, "width": 56})


def test_release_drops_what_lavis_sets_to_none_with_reasons(blip2, tmp_path):
    r = run_cli("convert", blip2["release-opt"], tmp_path / "out", "--dry-run", *parts(blip2, "opt"))
    assert r.code == 0, r.err
    assert "Qformer.cls.predictions.decoder.weight" in r.out and "the Q-Former's language-modelling head" in r.out
    assert "Qformer.bert.encoder.layer.3.output.dense.weight" in r.out and "text feed-forward" in r.out
    assert "Qformer.bert.embeddings.word_embeddings.weight" in r.out
    assert "-> cat(q_bias, zeros, v_bias) -> vision_model.encoder.layers.0.self_attn.qkv.bias" in r.out
    assert not (tmp_path / "out").exists()


def test_rules_run_backwards_to_the_original_tensors(blip2, tmp_path):
    """reverse(rules) on the converted folder gives back every LAVIS tensor that was not dropped, bit for bit."""
    dst = tmp_path / "out"
    assert run_cli("convert", blip2["release-t5"], dst, "--quiet", *parts(blip2, "t5")).code == 0
    out = open_source(dst)
    plan = compile_plan(reverse(blip2_convert.rules_for(False, row("t5"))), [out.info(n) for n in out.keys()])
    originals = torch.load(blip2["release-t5"], weights_only=True)["model"]
    originals |= {"visual_encoder." + k: v for k, v in torch.load(blip2["eva"], weights_only=True).items()}
    dropped = {d["name"] for d in json.loads((dst / "vlmkit-manifest.json").read_text())["plan"]["drops"]}
    back = {}
    for step in plan.steps:
        back.update(zip((t.name for t in step.targets), apply_step(step, [out.read(i.name) for i in step.sources])))
    lavis = {n: t for n, t in back.items() if not n.startswith("t5_model.")}  # the LM came from its own folder
    assert set(lavis) == set(originals) - dropped
    assert all(torch.equal(t, originals[n]) for n, t in lavis.items())


def test_fp16_keeps_the_qformer_in_float32(blip2, tmp_path):
    dst = tmp_path / "fp16"
    assert run_cli("convert", blip2["release-opt"], dst, "--quiet", "--dtype", "float16", *parts(blip2, "opt")).code == 0
    out = open_source(dst)
    assert out.info("language_model.model.decoder.layers.0.fc1.weight").dtype == "F16"
    assert out.info("vision_model.encoder.layers.0.mlp.fc1.weight").dtype == "F16"
    assert out.info("qformer.encoder.layer.0.attention.attention.query.weight").dtype == "F32"
    assert out.info("query_tokens").dtype == "F32"  # Blip2's _keep_in_fp32_modules


def test_inspect_recognises_a_lavis_checkpoint(blip2):
    r = run_cli("inspect", blip2["release-t5"], "--json")
    report = json.loads(r.out)
    assert report["family"] == "blip2"
    assert report["details"]["language model"] == "Flan-T5" and report["details"]["q-former layers"] == 4


def test_verify_catches_a_wrong_qkv_bias(blip2, tmp_path):
    """Fusing as cat(q_bias, v_bias, zeros) loses the v bias (a k bias alone would change nothing: softmax
    is invariant to it, which is why EVA has none); verify fails the logits, with numbers."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "out"
    assert run_cli("convert", blip2["release-opt"], dst, "--quiet", *parts(blip2, "opt")).code == 0
    tensors = load_file(dst / "model.safetensors")
    for i in range(SIZES.vision_layers):
        name = f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"
        q, _, v = tensors[name].chunk(3)
        tensors[name] = torch.cat([q, v, torch.zeros_like(v)])
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    v = run_cli("verify", blip2["release-opt"], dst, "--max-new-tokens", "2", *parts(blip2, "opt"))
    assert v.code == 3 and "[FAIL] logits" in v.out and "verdict: FAIL" in v.out


# ------------------------------------------------------------------------- failures


def _fails(src, dst, *extra) -> str:
    r = run_cli("convert", src, dst, "--quiet", *extra)
    assert r.code == 1, (r.out, r.err)
    assert "Traceback" not in r.err
    assert not dst.exists() and not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())
    return r.err


def test_missing_vision_part(blip2, tmp_path):
    err = _fails(blip2["release-opt"], tmp_path / "out", "--language-model", blip2["opt"], "--config", blip2["config"])
    assert "holds no visual encoder" in err and "--vision" in err


def test_missing_language_model_part(blip2, tmp_path):
    err = _fails(blip2["release-t5"], tmp_path / "out", "--vision", blip2["eva"], "--config", blip2["config"])
    assert "--language-model" in err and "tokenizer" in err
    err = _fails(blip2["release-t5"], tmp_path / "out", "--vision", blip2["eva"], "--language-model",
                 blip2["t5-tokenizer"], "--config", blip2["config"])
    assert "no weights" in err


def test_wrong_language_model(blip2, tmp_path):
    err = _fails(blip2["release-opt"], tmp_path / "out", *parts(blip2, "t5"))
    assert "model_type 't5'" in err and "OPT" in err


def test_wrong_qformer_depth(blip2, tmp_path):
    config = tmp_path / "deeper.json"
    config.write_text(json.dumps({"qformer_config": {"num_hidden_layers": 12, "num_attention_heads": 2},
                                  "vision_config": {"num_attention_heads": 2}}))
    err = _fails(blip2["release-opt"], tmp_path / "out", "--vision", blip2["eva"], "--language-model", blip2["opt"],
                 "--config", config)
    assert "qformer_config.num_hidden_layers=12" in err and "has 4" in err


def test_qformer_with_a_missing_layer(blip2, tmp_path):
    state = torch.load(blip2["release-opt"], weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if ".layer.2." not in k}
    src = tmp_path / "cut.pth"
    torch.save(state, src)
    err = _fails(src, tmp_path / "out", *parts(blip2, "opt"))
    assert "layers are [0, 1, 3]" in err
