"""The handbook's Wukong flow end to end: CSV -> records -> check -> tokenize, on real photos and Chinese
captions, with tiny LLaVA models (original and converted)."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.data.convert import convert
from vlmkit.data.examples import tokenize_file
from vlmkit.data.model import load_data_model
from vlmkit.data.tables import TableMapping
from vlmkit.options import LoadOptions

from .conftest import DATA, IMAGES

PROMPT = "为该图片生成标注。"


def test_wukong_flow(tmp_path, tiny_models, vlmkit_data):
    records = tmp_path / "wukong.json"
    made = vlmkit_data("convert", DATA / "wukong_tiny.csv", records, "--image-column", "dir",
                       "--text-column", "text", "--prompt", PROMPT)
    assert made.code == 0, made.err
    assert "wrote" in made.out and "4 llava record(s)" in made.out
    data = json.loads(records.read_text(encoding="utf-8"))
    assert [r["image"] for r in data] == ["chelsea.png", "astronaut.png", "coffee.png", "rocket.png"]
    assert data[2]["conversations"][1]["value"] == "白色杯子里的一杯拿铁咖啡，放在木桌上。"

    checked = vlmkit_data("check", records, "--image-folder", IMAGES, "--model", tiny_models["v15"])
    assert checked.code == 0, checked.out + checked.err
    assert "4 record(s) (llava): 4 ok, 0 with errors" in checked.out
    assert "every label masked: 0" in checked.out

    tokens = tmp_path / "wukong.tokens.jsonl"
    result = vlmkit_data("tokenize", records, "--model", tiny_models["v15"], "--out", tokens, "--show", 2)
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in tokens.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["000000000", "000000001", "000000002", "000000003"]
    first = lines[0]
    assert first["input_ids"][0] == 1 and first["input_ids"].count(-200) == 1
    assert first["input_ids"][-1] == 2 and first["labels"][-1] == 2  # "</s>" is trained (v1)
    assert set(first["labels"][:first["input_ids"].index(-200) + 1]) == {-100}
    # --show: the answer highlighted, the prompt not
    assert "⟦ 一只橘色的虎斑猫趴在地上，看着镜头。</s>⟧" in result.out
    assert "USER: <image×16> \n为该图片生成标注。 ASSISTANT:" in result.out  # the "▁" piece after the image
    assert "4 example(s), 0 refused" in result.err


@pytest.fixture(scope="module")
def both(tiny_models):
    """The tiny LLaVA-1.5 as its original checkpoint and as its transformers conversion."""
    return load_data_model(tiny_models["v15"]), load_data_model(tiny_models["v15-hf"])


def test_converted_model_gives_the_same_examples(tmp_path, both):
    records = tmp_path / "wukong.jsonl"
    convert(DATA / "wukong_tiny.csv", records, mapping=TableMapping(prompts=(PROMPT,)))
    original, converted = both
    assert (converted.kind, converted.template, converted.fixed_image_tokens) == ("transformers", "llava_v1", 16)
    for model in both:
        tokenize_file(records, tmp_path / f"{model.kind}.jsonl", model)
    assert (tmp_path / "original.jsonl").read_text() == (tmp_path / "transformers.jsonl").read_text()


def test_converted_tokenizer_agrees_on_awkward_text(both):
    from vlmkit.data.tokenize import tokenize

    from .conftest import record

    original, converted = both
    records = [
        record("<image>\n  two leading spaces", "Tabs\tand\nnew\n\nlines  ", images=("a.png",)),
        record("Emoji 🐱 and 中文混合 text", "好的。 Fine.", "  ", "x"),
        record("<image>", "caption only, pre-training style", images=("a.png",)),
        record("Multi", "turn", "with </s> in the text?", "yes"),
        record("<image>\nA text-only record", "whose <image> is text", "<image>", "again"),
    ]
    for rec in records:
        for template in ("llava_v1", "llava_llama_2", "plain"):
            try:
                a = tokenize(rec, template, original.encoder, max_length=2048)
            except Exception as e:  # noqa: BLE001 - then the converted one must refuse it the same way
                a = str(e)
            try:
                b = tokenize(rec, template, converted.encoder, max_length=2048)
            except Exception as e:  # noqa: BLE001
                b = str(e)
            assert a == b, (template, rec)


def test_plain_template_for_projector_pretraining(tmp_path, tiny_models, vlmkit_data):
    records = tmp_path / "wukong.jsonl"
    assert vlmkit_data("convert", DATA / "wukong_tiny.csv", records, "--prompt", PROMPT).code == 0
    out = tmp_path / "plain.jsonl"
    result = vlmkit_data("tokenize", records, "--model", tiny_models["v15"], "--template", "plain", "--out", out)
    assert result.code == 0, result.err
    first = json.loads(out.read_text().splitlines()[0])
    assert first["input_ids"][:2] == [1, -200] and first["labels"][:2] == [-100, -100]
    assert first["labels"][2:] == first["input_ids"][2:] and first["input_ids"][-1] == 13  # caption + "\n"


def test_refused_records_are_written_as_errors(tmp_path, tiny_models, vlmkit_data):
    rows = [{"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"id": "bad", "conversations": [{"from": "human", "value": "Hi"},
                                            {"from": "gpt", "value": "USER: x ASSISTANT: y"}]}]
    source = tmp_path / "r.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.jsonl"
    result = vlmkit_data("tokenize", source, "--model", tiny_models["v15"], "--out", out)
    assert result.code == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(lines[0]) == {"id", "input_ids", "labels"}
    assert lines[1]["id"] == "bad" and "record 'bad'" in lines[1]["error"] and "'llava_v1'" in lines[1]["error"]
    assert "tokenization mismatch" in lines[1]["error"]
    assert "1 example(s), 1 refused" in result.err
    again = vlmkit_data("tokenize", source, "--model", tiny_models["v15"], "--out", out)
    assert again.code == 1 and "already exists" in again.err


def test_anyres_feature_count_matches_the_reference_model(tiny_models):
    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.families.llava.reference import OriginalLlava
    from vlmkit.runtime import images

    model = load_data_model(tiny_models["next"])
    assert model.template == "mistral_instruct" and model.fixed_image_tokens is None
    reference = OriginalLlava.load(open_original(tiny_models["next"], LoadOptions()), dtype=torch.float32)
    for name in ("chelsea.png", "rocket.png", "astronaut.png"):
        pixels, sizes = images.preprocess([IMAGES / name], reference.image_config)
        features = reference.image_features(pixels, sizes)[0]
        assert model.image_tokens(sizes[0]) == features.shape[0], name


def test_data_command_lists_its_verbs_with_examples(vlmkit_data):
    bare = vlmkit_data()
    assert bare.code == 2 and all(verb in bare.out for verb in ("convert", "check", "tokenize", "download"))
    for verb in ("convert", "check", "tokenize", "download"):
        try:
            vlmkit_data(verb, "--help")
        except SystemExit as e:  # argparse exits after printing help
            assert e.code == 0
    bad = vlmkit_data("convert", DATA / "wukong_tiny.csv", "/tmp/never-written.jsonl")
    assert bad.code == 1 and "is a table" in bad.err and "--prompt" in bad.err
