"""InstructBLIP (LAVIS, Vicuna and Flan-T5): recognised, planned, converted, verified and chatted with through
the same entry points a user has, against the reference of LAVIS's forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmkit import families
from vlmkit.families.blip2 import tiny as blip2_tiny
from vlmkit.families.instructblip import tiny
from vlmkit.options import LoadOptions
from vlmkit.tensors import open_source

from ..conftest import run_cli

IMAGES = Path(__file__).resolve().parents[1] / "fixtures" / "images"
PROMPT = "What is unusual about this image?"  # the prompt transformers' conversion script checks with


@pytest.fixture(scope="session")
def instructblip(tiny_instructblip):
    """A tiny release of each variant with its parts, converted once through the CLI (once per run: read-only)."""
    return tiny_instructblip


def options(parts) -> LoadOptions:
    return LoadOptions(vision_tower=str(parts["eva"]), model_base=str(parts["language_model"]),
                       config=json.loads(parts["config"].read_text()))


def reference_greedy(parts, image: Path, prompt: str, max_new_tokens: int) -> list[int]:
    from vlmkit.families.instructblip import hf_output
    from vlmkit.families.instructblip.checkpoint import open_original
    from vlmkit.families.instructblip.reference import OriginalInstructBlipModel, lavis_eval_pixels
    from vlmkit.runtime.images import load_image

    ckpt = open_original(parts["release"], options(parts))
    cfg = hf_output.target_for(ckpt, options(parts)).hf_config
    model = OriginalInstructBlipModel.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict())
    return model.greedy(lavis_eval_pixels(load_image(image), model.image_size), prompt, max_new_tokens)


# ------------------------------------------------------------------------- recognition


@pytest.mark.parametrize("variant, title", [("vicuna", "Vicuna"), ("t5", "Flan-T5")])
def test_inspect_recognises_the_release_and_the_converted_folder(instructblip, variant, title):
    parts = instructblip[variant]
    report = json.loads(run_cli("inspect", parts["release"], "--json").out)
    assert report["family"] == "instructblip"
    assert report["details"]["language model"] == title and report["details"]["q-former layers"] == 4
    found = families.find(parts["out"])
    assert (found.name, found.form) == ("instructblip", "transformers")


def test_plain_blip2_flan_t5_stays_blip2(tmp_path):
    """Both have t5_proj; the BLIP-2 release carries the stage-1 Qformer.cls head InstructBLIP sets to None."""
    release = blip2_tiny.make_release(tmp_path / "blip2_pretrained_flant5xl.pth", "t5")
    assert families.find(release).name == "blip2"


def test_dry_run_plans_the_text_side_the_new_rows_and_the_buffers(instructblip, tmp_path):
    parts = instructblip["vicuna"]
    r = run_cli("convert", parts["release"], tmp_path / "out", "--dry-run", *parts["flags"])
    assert r.code == 0, r.err
    assert "Qformer.bert.embeddings.word_embeddings.weight [253, 32] F32\n    -> rename -> " \
           "qformer.embeddings.word_embeddings.weight" in r.out
    assert "-> rename -> qformer.encoder.layer.3.intermediate.dense.weight" in r.out  # the text feed-forward
    assert "llm_model.model.embed_tokens.weight [32000, 64] F32\n    -> rows 32000->32002 -> " in r.out
    assert "llm_model.model.layers.1.self_attn.rotary_emb.inv_freq [16] F32\n    -> dropped: a buffer" in r.out
    assert "-> cat(q_bias, zeros, v_bias) -> vision_model.encoder.layers.0.self_attn.qkv.bias" in r.out
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- conversion and verify


def test_vicuna_folder_has_lavis_tokens_and_the_published_layout(instructblip):
    parts = instructblip["vicuna"]
    dst = parts["out"]
    assert "embedding 32000 -> 32002 rows" in parts["summary"]
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["InstructBlipForConditionalGeneration"]
    assert (config["image_token_index"], config["text_config"]["vocab_size"]) == (32001, 32002)
    assert config["qformer_config"]["vocab_size"] == 253

    from transformers import AutoProcessor, InstructBlipForConditionalGeneration

    processor = AutoProcessor.from_pretrained(dst)
    ids = processor.tokenizer(PROMPT).input_ids
    assert ids[0] == 2 and processor.tokenizer.pad_token_id == 32000  # </s> as BOS, [PAD] added
    assert processor.qformer_tokenizer.bos_token == "[DEC]"
    model, info = InstructBlipForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    vicuna = open_source(parts["language_model"]).read("model.embed_tokens.weight")
    embed = open_source(dst).read("language_model.model.embed_tokens.weight")
    assert torch.equal(embed[:32000], vicuna)
    assert torch.allclose(embed[32000], vicuna.mean(0)) and torch.equal(embed[32000], embed[32001])

    # transformers' generate, greedy as asked explicitly, gives the reference's greedy tokens
    image = IMAGES / "chelsea.png"
    from PIL import Image

    inputs = processor(images=Image.open(image), text=PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=1, do_sample=False, num_beams=1,
                         repetition_penalty=1.0)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == reference_greedy(parts, image, PROMPT, 5)


def test_qformer_tokenizer_is_lavis_s(instructblip):
    """The converted processor's Q-Former tokenizer gives the ids of LAVIS's slow BertTokenizer + [DEC]
    (the reference's, written from 4.x's definition), cut to 128 tokens from the left as LAVIS cuts them."""
    from transformers import AutoProcessor

    from vlmkit.families.instructblip.reference import LavisBertTokenizer

    parts = instructblip["t5"]
    lavis = LavisBertTokenizer(parts["release"].parent / "bert-base-uncased")
    converted = AutoProcessor.from_pretrained(parts["out"]).qformer_tokenizer
    texts = [PROMPT, "Describe the colours -- then the SKY!! (rocket) café naïve", "这是 photo [DEC] of a [SEP] cat",
             "tab\there\nnewline\u00a0nbsp zzqx", " ".join(["a photo of two cats on a red sofa."] * 20)]
    for text in texts:
        assert converted(text, truncation=True).input_ids == lavis.encode(text, 128), text
    assert len(lavis.encode(texts[-1], 128)) == 128 and len(converted) == len(lavis)


def test_rules_run_backwards_to_the_original_tensors(instructblip):
    """reverse(rules) on the converted folder gives back every LAVIS tensor that was not dropped, bit for bit
    (Vicuna's 32,000 trained rows included: the two new rows are cut again)."""
    from vlmkit.conversion import compile_plan, reverse
    from vlmkit.conversion.engine import apply_step
    from vlmkit.families.instructblip import convert, hf_output
    from vlmkit.families.instructblip.checkpoint import open_original

    parts = instructblip["vicuna"]
    ckpt = open_original(parts["release"], options(parts))
    out = open_source(parts["out"])
    plan = compile_plan(reverse(convert.rules_for(ckpt, hf_output.target_for(ckpt, options(parts)))),
                        [out.info(n) for n in out.keys()])
    back = {}
    for step in plan.steps:
        back.update(zip((t.name for t in step.targets), apply_step(step, [out.read(i.name) for i in step.sources])))
    dropped = {d["name"] for d in json.loads((parts["out"] / "vlmkit-manifest.json").read_text())["plan"]["drops"]}
    assert set(back) == set(ckpt.source.keys()) - dropped
    assert all(torch.equal(t, ckpt.source.read(n)) for n, t in back.items())


@pytest.mark.parametrize("variant", ["vicuna", "t5"])
def test_verify_passes(instructblip, variant, tmp_path):
    parts = instructblip[variant]
    report = tmp_path / "report.json"
    v = run_cli("verify", parts["release"], parts["out"], "--json", report, "--max-new-tokens", "4", *parts["flags"])
    data = json.loads(report.read_text())
    assert v.code == 0 and data["verdict"] == "PASS", v.out + v.err
    names = [c["name"] for c in data["checks"]]
    untrained = ["untrained rows"] if variant == "vicuna" else []
    expected = ["pixel values", "input ids", "q-former ids", "logits", *untrained, "greedy tokens", "batched generation"]
    assert names == expected
    logits = next(c for c in data["checks"] if c["name"] == "logits")
    assert logits["measured"]["max_abs_diff"] <= 1e-4


def test_a_lavis_runner_fine_tune_with_its_own_vit(instructblip, tmp_path):
    """LAVIS's runner saves {"model", "optimizer", "scheduler", "config", "scaler", "epoch"}; with
    freeze_vit: False the fine-tuned ViT is inside, and wins over --vision (none is needed)."""
    import shutil

    from vlmkit.families.blip2.tiny import eva_vit_state

    parts = instructblip["vicuna"]
    state = torch.load(parts["release"], weights_only=True)["model"]
    state |= {"visual_encoder." + k: v for k, v in eva_vit_state(tiny.SIZES, seed=7).items()}
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 1e-5, "params": [0]}]}
    run = tmp_path / "output" / "20240101"
    shutil.copytree(parts["release"].parent / "bert-base-uncased", run / "bert-base-uncased")
    torch.save({"model": state, "optimizer": optimizer, "scheduler": None, "config": {"model": {"arch":
               "blip2_vicuna_instruct"}}, "scaler": None, "epoch": 2}, run / "checkpoint_best.pth")
    flags = ["--language-model", parts["language_model"], "--config", parts["config"]]
    dst = tmp_path / "hf"
    r = run_cli("convert", run / "checkpoint_best.pth", dst, "--quiet", *flags)
    assert r.code == 0 and "holds its own visual encoder" in r.err, r.err
    v = run_cli("verify", run / "checkpoint_best.pth", dst, "--max-new-tokens", "2", *flags)
    assert v.code == 0 and "verdict: PASS" in v.out, v.out + v.err


def test_verify_fails_when_the_qformer_text_side_is_wrong(instructblip, tmp_path):
    """A text feed-forward that is not LAVIS's changes what the queries see of the instruction: logits FAIL."""
    import shutil

    from safetensors.torch import load_file, save_file

    parts = instructblip["t5"]
    dst = tmp_path / "out"
    shutil.copytree(parts["out"], dst)
    tensors = load_file(dst / "model.safetensors")
    name = "qformer.encoder.layer.0.intermediate.dense.weight"
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    v = run_cli("verify", parts["release"], dst, "--max-new-tokens", "2", *parts["flags"])
    assert v.code == 3 and "[FAIL] logits" in v.out and "verdict: FAIL" in v.out


def test_missing_qformer_tokenizer_is_one_clear_error(instructblip, tmp_path):
    import shutil

    parts = instructblip["t5"]
    release = tmp_path / "lavis" / parts["release"].name
    release.parent.mkdir()
    shutil.copyfile(parts["release"], release)
    r = run_cli("convert", release, tmp_path / "out", "--quiet", *parts["flags"])
    assert r.code == 1 and "Traceback" not in r.err
    assert "bert-base-uncased" in r.err and "vocab.txt" in r.err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- a full state dict


@pytest.fixture(scope="session")
def instructblip_full(tmp_path_factory):
    """``model.state_dict()`` of the whole LAVIS model, each language model, with the folder it was built from."""
    root = tmp_path_factory.mktemp("instructblip-full")
    return {lm: tiny.tiny(root / lm, f"{lm}-full") for lm in ("vicuna", "t5")}


@pytest.mark.parametrize("lm", ["vicuna", "t5"])
def test_a_full_state_dict_converts_without_vision_and_verifies(instructblip_full, lm, tmp_path):
    """ViT and language model inside: no --vision; --language-model gives the config and the tokenizer, the file's
    weights win over its (Vicuna: LAVIS's [PAD] row, which only a full state dict holds, is kept, not made up)."""
    parts = instructblip_full[lm]
    flags = ["--language-model", parts["language_model"], "--config", parts["config"]]
    report = json.loads(run_cli("inspect", parts["release"], "--json").out)
    assert report["family"] == "instructblip" and report["details"]["instructblip form"] == "full"
    dst = tmp_path / "hf"
    r = run_cli("convert", parts["release"], dst, "--quiet", *flags)
    assert r.code == 0, r.err
    assert "holds the language model's weights, which win over --language-model's" in r.err
    v = run_cli("verify", parts["release"], dst, "--json", tmp_path / "report.json", "--max-new-tokens", "4", *flags)
    data = json.loads((tmp_path / "report.json").read_text())
    assert v.code == 0 and data["verdict"] == "PASS", v.out + v.err
    logits = next(c for c in data["checks"] if c["name"] == "logits")
    assert logits["measured"]["max_abs_diff"] <= 1e-4
    if lm == "vicuna":
        assert "embedding 32001 -> 32002 rows (<image>: the mean" in r.err
        state = torch.load(parts["release"], weights_only=True)  # a bare state dict, as model.state_dict() saves
        out = open_source(dst)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            lavis = state["llm_model." + name]
            assert lavis.shape[0] == 32001
            assert torch.equal(out.read("language_model." + name)[:32001], lavis), name


def test_a_full_state_dict_chats_with_the_reference_greedy_tokens(instructblip_full):
    import vlmkit
    from vlmkit.families.instructblip import hf_output
    from vlmkit.families.instructblip.checkpoint import open_original
    from vlmkit.families.instructblip.reference import OriginalInstructBlipModel, lavis_eval_pixels
    from vlmkit.runtime.images import load_image

    parts = instructblip_full["vicuna"]
    opts = LoadOptions(model_base=str(parts["language_model"]), config=json.loads(parts["config"].read_text()))
    ckpt = open_original(parts["release"], opts)
    cfg = hf_output.target_for(ckpt, opts).hf_config
    reference = OriginalInstructBlipModel.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict())
    assert reference.language_model.get_input_embeddings().weight.shape[0] == 32001  # LAVIS's resized Vicuna
    image = IMAGES / "chelsea.png"
    wanted = reference.greedy(lavis_eval_pixels(load_image(image), reference.image_size), PROMPT, 5)
    reply = vlmkit.load(parts["release"], options=opts).chat(
        [{"role": "user", "content": PROMPT, "images": [image]}], max_new_tokens=5)
    assert reply.tokens == wanted[:5]


def test_a_full_state_dict_says_which_part_wins_and_what_it_still_needs(instructblip_full, tmp_path):
    parts = instructblip_full["t5"]
    eva = blip2_tiny.make_eva_vit(tmp_path / "eva" / "eva_vit_g.pth", tiny.SIZES, seed=5)
    r = run_cli("convert", parts["release"], tmp_path / "hf", "--quiet", "--vision", eva, "--language-model",
                parts["language_model"], "--config", parts["config"])
    assert r.code == 0 and "holds its own visual encoder (fine-tuned); it wins over --vision" in r.err, r.err
    r = run_cli("convert", parts["release"], tmp_path / "none", "--quiet", "--config", parts["config"])
    assert r.code == 1 and "Traceback" not in r.err and not (tmp_path / "none").exists()
    assert str(parts["release"]) in r.err and "--language-model" in r.err and "config.json + tokenizer)" in r.err


# ------------------------------------------------------------------------- chat


@pytest.mark.parametrize("variant", ["vicuna", "t5"])
def test_chat_answers_with_the_reference_greedy_tokens(instructblip, variant):
    """vlmkit.load on the release (run through the reference) and on its conversion answers with LAVIS's
    greedy tokens; another instruction on the same image gives other features (the Q-Former reads it)."""
    import vlmkit

    parts = instructblip[variant]
    image = IMAGES / "chelsea.png"
    wanted = reference_greedy(parts, image, PROMPT, 5)
    other = reference_greedy(parts, image, "Describe the colours of this picture.", 5)
    for path in (parts["release"], parts["out"]):
        model = vlmkit.load(path, options=options(parts))
        assert model.backend.kind == "instructblip"
        reply = model.chat([{"role": "user", "content": PROMPT, "images": [image]}], max_new_tokens=5)
        assert reply.tokens == wanted[:5], path
        again = model.chat([{"role": "user", "content": "Describe the colours of this picture.", "images": [image]}],
                           max_new_tokens=5)
        assert again.tokens == other[:5], path


def test_vlmkit_chat_on_the_release_prints_the_reference_answer(instructblip):
    from vlmkit.families.instructblip.checkpoint import open_original
    from vlmkit.families.instructblip.reference import lavis_llm_tokenizer

    parts = instructblip["vicuna"]
    image = IMAGES / "chelsea.png"
    tokens = reference_greedy(parts, image, PROMPT, 6)
    text = lavis_llm_tokenizer(open_original(parts["release"], options(parts))).decode(
        [t for t in tokens if t != 2], skip_special_tokens=True)
    r = run_cli("chat", parts["release"], "--image", image, "--prompt", PROMPT, "--temperature", "0",
                "--max-new-tokens", "6", *parts["flags"])
    assert r.code == 0 and r.out == text + "\n", (r.out, r.err)
