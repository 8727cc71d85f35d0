"""BLIP-2 through the registry, one language-model row at a time: the LAVIS checkpoint and its transformers
folder are both BLIP-2 forms that chat, with the row's prompt, and give the same greedy tokens.

Walks ``language_models.ROWS``, so a new row is covered by building its tiny model (``tiny.BUILDERS``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmkit import families
from vlmkit.families.blip2 import tiny
from vlmkit.families.blip2.language_models import ROWS
from vlmkit.options import LoadOptions
from vlmkit.runtime.model import ChatModel

from ..conftest import run_cli

CAT = Path(__file__).parents[1] / "fixtures" / "images" / "chelsea.png"
SIZES = tiny.TinySizes()


@pytest.mark.parametrize("name", list(ROWS))
def test_lavis_checkpoint_and_its_conversion_chat_through_the_registry(tmp_path, name):
    row = ROWS[name]
    release = tiny.make_release(tmp_path / "lavis" / f"blip2_pretrained_{name}.pth", name, SIZES)
    eva = tiny.make_eva_vit(tmp_path / "eva" / "eva_vit_g.pth", SIZES)
    lm = tiny.make_language_model(tmp_path / f"{name}-tiny", name, SIZES)
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps(SIZES.override()))
    hf = tmp_path / "hf"
    r = run_cli("convert", release, hf, "--quiet", "--vision", eva, "--language-model", lm, "--config", heads)
    assert r.code == 0, r.err

    replies = {}
    for path, options, form in (
            (release, LoadOptions(vision_tower=str(eva), model_base=str(lm), config=SIZES.override()), "parts"),
            (hf, LoadOptions(), "transformers")):
        found = families.require(path, "chat_backend")
        assert (found.name, found.form) == ("blip2", form)
        model = ChatModel(found.family.chat_backend(found, options))
        assert model.template == row.prompt[0]
        reply = model.chat([{"role": "user", "content": "what is this?", "images": [CAT]}], temperature=0,
                           max_new_tokens=5)
        assert reply.tokens and reply.image_tokens == SIZES.queries
        replies[form] = reply.tokens
    assert replies["parts"] == replies["transformers"]  # LAVIS's greedy tokens = the converted folder's


def test_a_transformers_blip2_folder_is_a_blip2_form_that_chats_only(tmp_path):
    """Recognised by its architecture (before any weight is read); chat yes, --to hf no (it is not a LAVIS checkpoint)."""
    tmp_path.joinpath("config.json").write_text(json.dumps({"architectures": ["Blip2ForConditionalGeneration"]}))
    found = families.find(tmp_path)
    assert (found.name, found.form) == ("blip2", "transformers")
    assert found.can("chat_backend") and not found.can("conversion")
