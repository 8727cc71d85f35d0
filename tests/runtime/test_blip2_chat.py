"""vlmkit.load / chat on a converted BLIP-2 (OPT) folder: the same tokens as transformers' own generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.errors import VlmkitError
from vlmkit.families.blip2 import tiny

from ..conftest import run_cli

CAT = Path(__file__).parents[1] / "fixtures" / "images" / "chelsea.png"


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2-runtime")
    sizes = tiny.TinySizes()
    override = root / "heads.json"
    override.write_text(json.dumps(sizes.override()))
    release = tiny.make_release(root / "lavis" / "blip2_pretrained_opt2.7b.pth", "opt", sizes)
    eva = tiny.make_eva_vit(root / "eva" / "eva_vit_g.pth", sizes)
    opt = tiny.make_language_model(root / "opt-tiny", "opt", sizes)
    out = root / "blip2-opt-hf"
    r = run_cli("convert", release, out, "--quiet", "--vision", eva, "--language-model", opt, "--config", override)
    assert r.code == 0, r.err
    return out


def test_chat_equals_transformers_generate(blip2_folder):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from vlmkit.runtime.images import load_image

    model = vlmkit.load(blip2_folder)
    reply = model.chat([{"role": "user", "content": "what is this?", "images": [CAT]}], temperature=0,
                       max_new_tokens=6)
    processor = AutoProcessor.from_pretrained(blip2_folder)
    hf = Blip2ForConditionalGeneration.from_pretrained(blip2_folder).eval()
    inputs = processor(images=[load_image(CAT)], text=["Question: what is this? Answer:"], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = hf.generation_config.eos_token_id
    expected = expected[:expected.index(eos) + 1] if eos in expected else expected
    assert reply.tokens == expected and reply.image_tokens == hf.config.num_query_tokens
    assert model.template == "blip2_qa"
    streamed = "".join(model.stream([{"role": "user", "content": "what is this?", "images": [CAT]}],
                                    temperature=0, max_new_tokens=6))
    assert streamed == reply.text


def test_blip2_reads_one_image(blip2_folder):
    model = vlmkit.load(blip2_folder)
    with pytest.raises(VlmkitError, match="one image"):
        model.chat([{"role": "user", "content": "?", "images": [CAT, CAT]}])


def test_cli_chat_on_blip2(blip2_folder):
    r = run_cli("chat", blip2_folder, "--image", CAT, "--prompt", "what is this?", "--temperature", "0",
                "--max-new-tokens", "6")
    assert r.code == 0
    assert r.out.strip() == vlmkit.load(blip2_folder).chat(
        [{"role": "user", "content": "what is this?", "images": [CAT]}], temperature=0, max_new_tokens=6).text.strip()
