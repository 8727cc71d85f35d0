"""BLIP-2 retrieval (LAVIS stage-1 Q-Former): recognised, converted, verified, scored, through the CLI a user runs."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit import families
from vlmkit.api import DEFAULT_PROBES
from vlmkit.conversion import compile_plan, reverse
from vlmkit.conversion.engine import apply_step
from vlmkit.families.blip2 import tiny as blip2_tiny
from vlmkit.families.blip2_retrieval import convert as retrieval_convert
from vlmkit.families.blip2_retrieval import tiny
from vlmkit.tensors import open_source

from ..conftest import run_cli

PUBLISHED_PREFIXES = ("vision_model.", "query_tokens", "embeddings.", "qformer.", "vision_projection.",
                      "text_projection.", "itm_head.")
IMAGE = DEFAULT_PROBES[0][0]  # chelsea.png: a cat
TEXTS = ["a cat sitting on a red sofa", "a rocket at the launch pad at night", "two dogs"]


@pytest.fixture(scope="session")
def lavis(tmp_path_factory):
    """Tiny LAVIS stage-1 checkpoints (pretrained: ViT from --vision; COCO fine-tune: ViT inside, 70 px)."""
    root = tmp_path_factory.mktemp("blip2-retrieval")
    vocab = tiny.make_tokenizer(root / "bert-base-uncased")
    heads = root / "tiny-heads.json"
    heads.write_text(json.dumps(tiny.TinySizes().override()))
    b = {"root": root, "bert": root / "bert-base-uncased", "config": heads, "vocab": vocab,
         "eva": tiny.make_eva_vit(root / "eva" / "eva_vit_g.pth"),
         "pretrained": tiny.make_pretrained(root / "lavis" / "blip2_pretrained.pth", vocab),
         "coco": tiny.make_finetuned(root / "coco" / "blip2_finetune_coco.pth", vocab,
                                     tiny.TinyStage1(tiny.TinySizes(image_size=70)))}
    b["converted"] = root / "blip2-itm-tiny"
    r = run_cli("convert", b["pretrained"], b["converted"], "--quiet", *parts(b))
    assert r.code == 0, r.err
    return b


def parts(b, *, vit_inside: bool = False) -> list:
    vision = [] if vit_inside else ["--vision", b["eva"]]
    return [*vision, "--language-model", b["bert"], "--config", b["config"]]


def verify_passes(src, dst, *extra) -> dict:
    report = dst.parent / f"{dst.name}-report.json"
    v = run_cli("verify", src, dst, "--json", report, *extra)
    data = json.loads(report.read_text())
    assert v.code == 0 and data["verdict"] == "PASS", v.out + v.err
    assert [c["name"] for c in data["checks"]] == ["pixel values", "input ids", "ITM logits", "ITM probabilities",
                                                   "ITC similarities", "image embeddings", "text embeddings"]
    return data


def test_recognised_forms_and_the_blip2_family_keeps_its_own(lavis, tmp_path):
    found = {k: families.find(lavis[k]) for k in ("pretrained", "coco", "converted")}
    assert {k: (f.name, f.form) for k, f in found.items()} == {
        "pretrained": ("blip2_retrieval", "parts"), "coco": ("blip2_retrieval", "full"),
        "converted": ("blip2_retrieval", "transformers")}
    assert found["converted"].abilities() == ["describe", "card_kind", "score"]
    opt = blip2_tiny.make_release(tmp_path / "blip2_pretrained_opt2.7b.pth", "opt")  # opt_proj: not retrieval
    assert families.find(opt).name == "blip2"
    details = json.loads(run_cli("inspect", lavis["pretrained"], "--json").out)["details"]
    assert details == {"blip2 retrieval form": "parts", "query tokens": 4, "q-former layers": 4,
                       "embedding width": 16, "visual encoder inside": False}


def test_dry_run_plan_renames_to_the_published_layout_and_drops_with_reasons(lavis, tmp_path):
    r = run_cli("convert", lavis["pretrained"], tmp_path / "out", "--dry-run", *parts(lavis))
    assert r.code == 0, r.err
    rows = lavis["vocab"]  # bert's tokens + [DEC]: LAVIS resizes the word embeddings to the tokenizer
    for line in (f"Qformer.bert.embeddings.word_embeddings.weight [{rows}, 32] F32\n    -> rename -> "
                 "embeddings.word_embeddings.weight",
                 "Qformer.bert.embeddings.LayerNorm.weight [32] F32\n    -> rename -> qformer.layernorm.weight",
                 "Qformer.bert.encoder.layer.3.output.dense.weight [32, 64] F32\n    -> rename -> "
                 "qformer.encoder.layer.3.output.dense.weight",
                 "vision_proj.weight [16, 32] F32\n    -> rename -> vision_projection.weight",
                 "text_proj.bias [16] F32\n    -> rename -> text_projection.bias",
                 "temp [] F32\n    -> dropped: the contrastive temperature",
                 f"Qformer.cls.predictions.decoder.weight [{rows}, 32] F32\n    -> dropped: the Q-Former's "
                 "language-modelling head",
                 "-> cat(q_bias, zeros, v_bias) -> vision_model.encoder.layers.0.self_attn.qkv.bias"):
        assert line in r.out, line
    assert not (tmp_path / "out").exists()


def test_pretrained_with_vision_part_converts_and_verifies(lavis):
    dst = lavis["converted"]
    data = verify_passes(lavis["pretrained"], dst, *parts(lavis), "--write-card")
    card = (dst / "README.md").read_text()
    assert "library_name: transformers" in card and "`Blip2ForImageTextRetrieval`" in card
    assert "vlmkit score image.jpg" in card and "ITM probabilities | pass" in card
    assert all(c["measured"]["max_abs_diff"] <= 1e-4 for c in data["checks"] if "max_abs_diff" in c["measured"])
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForImageTextRetrieval"] and config["image_token_index"] is None
    assert config["qformer_config"]["use_qformer_text_input"] is True
    assert config["qformer_config"]["vocab_size"] == lavis["vocab"] and config["image_text_hidden_size"] == 16
    assert config["vision_config"]["image_size"] == 56 and config["num_query_tokens"] == 4
    names = open_source(dst).keys()
    assert all(n.startswith(PUBLISHED_PREFIXES) for n in names)
    assert "embeddings.position_embeddings.weight" in names
    assert "qformer.encoder.layer.2.intermediate.dense.bias" in names  # the text feed-forward, kept


def test_coco_finetune_with_the_vit_inside(lavis, tmp_path):
    dst = tmp_path / "coco-hf"
    r = run_cli("convert", lavis["coco"], dst, "--quiet", *parts(lavis, vit_inside=True))
    assert r.code == 0 and "BLIP-2 retrieval (full checkpoint; image 70px" in r.err, r.err
    verify_passes(lavis["coco"], dst, *parts(lavis, vit_inside=True))
    assert json.loads((dst / "preprocessor_config.json").read_text())["size"] == {"height": 70, "width": 70}


def test_transformers_loads_the_folder_and_gives_lavis_numbers(lavis):
    """transformers alone (its docstring's usage, one text at a time) vs LAVIS's forward on the original checkpoint."""
    from PIL import Image
    from transformers import (AutoProcessor, Blip2ForImageTextRetrieval, Blip2TextModelWithProjection,
                              Blip2VisionModelWithProjection)

    model, info = Blip2ForImageTextRetrieval.from_pretrained(lavis["converted"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for half in (Blip2VisionModelWithProjection, Blip2TextModelWithProjection):  # the embedding models: a subset
        assert not half.from_pretrained(lavis["converted"], output_loading_info=True)[1]["missing_keys"]
    processor = AutoProcessor.from_pretrained(lavis["converted"])
    image = Image.open(IMAGE).convert("RGB")
    theirs = []
    with torch.no_grad():
        for text in TEXTS:
            inputs = processor(images=image, text=text, return_tensors="pt")
            itm = model(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(dim=1)[0, 1]
            itc = model(**inputs, use_image_text_matching_head=False).logits_per_image[0, 0]
            theirs.append((float(itm), float(itc)))
    lavis_scores = json.loads(run_cli("score", IMAGE, *TEXTS, lavis["pretrained"], "--json", *parts(lavis)).out)
    for (itm, itc), ref in zip(theirs, lavis_scores):
        assert abs(itm - ref["itm"]) <= 1e-4 and abs(itc - ref["itc"]) <= 1e-4, (itm, itc, ref)
    assert len({round(r["itm"], 4) for r in lavis_scores}) == len(TEXTS)  # the texts are told apart


def test_verify_fails_when_one_converted_tensor_is_perturbed(lavis, tmp_path):
    """A text feed-forward weight (what Blip2OPT drops and this model runs) off by a little: verify says so."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "perturbed"
    shutil.copytree(lavis["converted"], dst)
    tensors = load_file(dst / "model.safetensors")
    name = "qformer.encoder.layer.1.intermediate.dense.weight"
    tensors[name] = tensors[name] + 0.01 * torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    v = run_cli("verify", lavis["pretrained"], dst, *parts(lavis))
    assert v.code == 3 and "verdict: FAIL" in v.out, v.out + v.err
    assert "[FAIL] ITC similarities" in v.out and "[FAIL] text embeddings" in v.out
    assert "[pass] pixel values" in v.out and "[pass] image embeddings" in v.out  # the image path is untouched


def test_score_cli_table_and_json(lavis):
    r = run_cli("score", IMAGE, *TEXTS, lavis["converted"])
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["ITM", "ITC", "text"] and len(lines) == 1 + len(TEXTS)
    rows = json.loads(run_cli("score", IMAGE, *TEXTS, lavis["converted"], "--json").out)
    assert [row["text"] for row in rows] == TEXTS
    for line, row in zip(lines[1:], rows):
        assert line.split(maxsplit=2) == [f"{row['itm']:.4f}", f"{row['itc']:.4f}", row["text"]]
        assert 0 < row["itm"] < 1 and -1 <= row["itc"] <= 1


def test_a_long_text_is_cut_where_lavis_cuts_it(lavis):
    """Blip2ITM.forward truncates at max_txt_len=32 tokens; the converted tokenizer says 32, so the scores agree."""
    long = " ".join(["a red cat sitting on the blue sofa at night"] * 5)  # 50 words: 52 tokens
    converted = json.loads(run_cli("score", IMAGE, long, lavis["converted"], "--json").out)[0]
    original = json.loads(run_cli("score", IMAGE, long, lavis["pretrained"], "--json", *parts(lavis)).out)[0]
    assert abs(converted["itm"] - original["itm"]) <= 1e-4 and abs(converted["itc"] - original["itc"]) <= 1e-4
    short = json.loads(run_cli("score", IMAGE, " ".join(long.split()[:30]), lavis["converted"], "--json").out)[0]
    assert abs(short["itc"] - converted["itc"]) <= 1e-6  # the first 30 words + [CLS], [SEP]: the same 32 tokens


def test_score_refuses_what_cannot_score(lavis, tmp_path):
    opt = blip2_tiny.make_release(tmp_path / "blip2_pretrained_opt2.7b.pth", "opt")
    r = run_cli("score", IMAGE, "a cat", opt)
    assert r.code == 1 and "a blip2 checkpoint (parts form); vlmkit cannot score images against texts" in r.err
    r = run_cli("score", IMAGE, "a cat", lavis["pretrained"], "--language-model", lavis["bert"])
    assert r.code == 1 and "holds no visual encoder" in r.err and "--vision" in r.err and "Traceback" not in r.err
    r = run_cli("convert", lavis["pretrained"], tmp_path / "out", "--vision", lavis["eva"])
    assert r.code == 1 and "--language-model" in r.err and "bert-base-uncased" in r.err
    assert not (tmp_path / "out").exists()


def test_rules_run_backwards_to_the_original_tensors(lavis):
    """REVERSIBLE: reverse(rules) on the converted folder gives back every LAVIS tensor not dropped, bit for bit."""
    out = open_source(lavis["converted"])
    plan = compile_plan(reverse(retrieval_convert.RULES), [out.info(n) for n in out.keys()])
    originals = torch.load(lavis["pretrained"], weights_only=True)["model"]
    originals |= {"visual_encoder." + k: v for k, v in torch.load(lavis["eva"], weights_only=True).items()}
    manifest = json.loads((lavis["converted"] / "vlmkit-manifest.json").read_text())
    dropped = {d["name"] for d in manifest["plan"]["drops"]}
    back = {}
    for step in plan.steps:
        back.update(zip((t.name for t in step.targets), apply_step(step, [out.read(i.name) for i in step.sources])))
    assert set(back) == set(originals) - dropped
    assert all(torch.equal(t, originals[n]) for n, t in back.items())
