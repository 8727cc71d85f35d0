"""``vlmkit.load`` and the data model reach a family only through the registry (``families.require``)."""

from __future__ import annotations

import json

import pytest

import vlmkit
from vlmkit import families
from vlmkit.errors import ConfigError
from vlmkit.families.llava import tiny


def test_transformers_llava_folders_have_a_chat_backend(tmp_path):
    for architecture in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"):
        folder = tmp_path / architecture
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [architecture]}))
        found = families.require(folder, "chat_backend")
        assert (found.name, found.form) == ("llava", "transformers")


def test_a_model_that_cannot_chat_is_refused_by_the_registry(tmp_path):
    clip = tiny.make_clip(tmp_path / "clip-vit-tiny-patch14")  # openai/clip-vit-*'s layout: CLIPModel
    with pytest.raises(ConfigError) as error:
        vlmkit.load(clip)
    message = error.value.message
    assert str(clip) in message and "a clip checkpoint" in message and "cannot chat with it and serve it" in message
