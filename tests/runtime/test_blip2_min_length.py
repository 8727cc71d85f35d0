"""LAVIS's ``generate(min_length=1)``: OPT cannot answer EOS first, Flan-T5 can (its start token counts).

The language model is given a head row that makes EOS the most likely first token (its row is
twice the row of the token greedy decoding picks first), as a real model can have it; the
original checkpoint and its conversion must both answer as vlmkit's reference of LAVIS's
``generate`` does.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit.families.blip2 import hf_output, tiny
from vlmkit.families.blip2.checkpoint import open_original
from vlmkit.families.blip2.reference import OriginalBlip2Model, lavis_eval_pixels
from vlmkit.options import LoadOptions
from vlmkit.runtime.images import load_image

from ..conftest import run_cli
from .test_blip2_t5_chat import CAT

PROMPTS = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}  # as BLIP-2's OPT / LAVIS's Flan-T5
HEAD = {"opt": "model.decoder.embed_tokens.weight", "t5": "lm_head.weight"}  # OPT's head is its embedding


def lavis_reference(release, options: LoadOptions) -> OriginalBlip2Model:
    ckpt = open_original(release, options)
    cfg = hf_output.target_for(ckpt, options).hf_config
    return OriginalBlip2Model.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict(), cfg.text_config)


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_an_eos_first_answer_follows_lavis_min_length(lm, tmp_path):
    sizes = tiny.TinySizes()
    release = tiny.make_release(tmp_path / "lavis" / f"blip2_{lm}.pth", lm, sizes)
    eva = tiny.make_eva_vit(tmp_path / "eva_vit_g.pth", sizes)
    folder = tiny.make_language_model(tmp_path / f"{lm}-tiny", lm, sizes)
    options = LoadOptions(vision_tower=str(eva), model_base=str(folder), config=sizes.override())
    prompt = PROMPTS[lm].format("what is this?")

    def pixels(model):
        return lavis_eval_pixels(load_image(CAT), model.image_size)

    reference = lavis_reference(release, options)
    first = reference.greedy(pixels(reference), prompt, 1)[0]
    eos = reference.eos_token_id
    weights = load_file(folder / "model.safetensors")
    head = weights[HEAD[lm]]
    head[eos] = 2 * head[first]  # EOS's logit: twice the first token's
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    reference = lavis_reference(release, options)
    with torch.no_grad():  # the first logits alone put EOS on top
        embeds, mask = reference._embed(pixels(reference), prompt)
        lm_model = reference.language_model
        logits = (lm_model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1] if lm == "opt" else
                  lm_model(inputs_embeds=embeds, attention_mask=mask,
                           decoder_input_ids=torch.tensor([[lm_model.config.decoder_start_token_id]])).logits[0, -1])
    assert int(logits.argmax()) == eos
    expected = reference.greedy(pixels(reference), prompt, 6)
    assert (expected[0] != eos) if lm == "opt" else (expected == [eos])

    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps(sizes.override()))
    converted = tmp_path / "hf"
    assert run_cli("convert", release, converted, "--quiet", "--vision", eva, "--language-model", folder,
                   "--config", heads).code == 0
    question = [{"role": "user", "content": "what is this?", "images": [CAT]}]
    for model in (vlmkit.load(release, options=options), vlmkit.load(converted)):
        assert model.chat(question, temperature=0, max_new_tokens=6).tokens == expected
