"""The registry's door: ``find`` names the family and form, ``require`` refuses in one message shape."""

import json

import pytest

from vlmkit import families
from vlmkit.errors import ConfigError


def _folder(tmp_path, architectures):
    tmp_path.joinpath("config.json").write_text(json.dumps({"architectures": architectures}))
    return tmp_path


def test_transformers_llava_folder_is_a_llava_form_that_cannot_be_verified(tmp_path):
    folder = _folder(tmp_path, ["LlavaNextForConditionalGeneration"])
    found = families.find(folder)
    assert (found.name, found.form) == ("llava", "transformers")
    assert not found.can("verify")
    with pytest.raises(ConfigError) as error:
        families.require(folder, "verify")
    message = str(error.value)
    assert str(folder) in message and "llava" in message and "transformers form" in message
    assert "cannot verify a conversion of it: it can " in message


def test_unknown_folder_names_the_families_it_asked(tmp_path):
    folder = _folder(tmp_path, ["GPTNeoXForCausalLM"])
    assert families.find(folder) is None
    with pytest.raises(ConfigError, match="no family it knows .*llava, blip2, flava, clip"):
        families.require(folder, "chat_backend")


def test_every_form_lists_only_known_capabilities():
    for family in families.families():
        for form, capabilities in family.FORMS.items():
            unknown = set(capabilities) - set(families.CAPABILITIES)
            assert not unknown, f"{family.NAME} form {form}: {unknown}"
