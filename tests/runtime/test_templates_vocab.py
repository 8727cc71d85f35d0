"""One template vocabulary: the marker that names an original template, and the one chat-template reader.

Before, three parsers accepted different marker texts (only at the start, stopping at whitespace, or
anywhere) and four readers took a folder's files in different orders; every caller now agrees.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from transformers import ProcessorMixin

from vlmkit import inspection
from vlmkit.runtime import templates
from vlmkit.serve.engines.llamacpp import GGUFChat

SRC = Path(templates.__file__).resolve().parents[1]


def test_marker_round_trip_and_the_text_already_in_users_files():
    # the exact line vlmkit has written into converted folders and GGUFs: files users already have
    assert templates.marker("llava_v1") == "{# vlmkit template: llava_v1 #}"
    for name in templates.TEMPLATES:
        assert templates.marked_name(templates.marker(name) + "{{ bos_token }}") == name


@pytest.mark.parametrize("text", [
    "{{ bos_token }}\n{# vlmkit template: mistral_instruct #}{% for m in messages %}{% endfor %}",  # not first
    "{#vlmkit template:  mistral_instruct  #}",  # spaced differently
])
def test_a_marker_anywhere_and_loosely_spaced_is_found(text):
    assert templates.marked_name(text) == "mistral_instruct"


def test_no_marker_names_nothing():
    assert templates.marked_name("{% for m in messages %}{{ m['content'] }}{% endfor %}") is None
    assert templates.marked_name(None) is None


def _disagreeing_folder(folder: Path) -> Path:
    """Every place transformers looks for a chat template, each naming a different original template."""
    folder.mkdir(exist_ok=True)
    (folder / "processor_config.json").write_text(json.dumps({"chat_template": templates.marker("llava_v1")}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": templates.marker("mistral_instruct")}))
    (folder / "chat_template.jinja").write_text(templates.marker("chatml_direct"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates.marker("llama_2")}))
    return folder


def test_the_reader_takes_the_template_transformers_uses(tmp_path):
    folder = _disagreeing_folder(tmp_path / "model")
    # the reference: what transformers' processor loading takes, file by file as each one is removed
    for name in ("processor_config.json", "chat_template.json"):
        expected = ProcessorMixin.get_processor_dict(str(folder))[0].get("chat_template")
        assert templates.read_chat_template(folder) == expected
        (folder / name).unlink()
    assert templates.read_chat_template(folder) == ProcessorMixin.get_processor_dict(str(folder))[0]["chat_template"]
    (folder / "chat_template.jinja").unlink()  # no processor template left: the tokenizer's
    assert templates.marked_name(templates.read_chat_template(folder)) == "llama_2"


def test_inspect_names_the_template_transformers_uses(tmp_path):
    folder = _disagreeing_folder(tmp_path / "model")
    assert inspection._chat_template_name(folder) == "llava_v1"


def test_the_llama_cpp_engine_finds_a_marker_after_other_text(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_chat_template("{{ bos_token }}" + templates.marker("mistral_instruct") + "{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert GGUFChat(path).template_name == "mistral_instruct"


def test_no_module_reads_template_files_or_parses_the_marker_itself():
    owner = Path(templates.__file__).resolve()
    for file in SRC.rglob("*.py"):
        if file.resolve() == owner:
            continue
        text = file.read_text()
        # the file names as literals; the marker as written (f-string, quoted literal) or parsed (a regex group)
        for needle in ('"chat_template.jinja"', '"chat_template.json"', '"{# vlmkit template', "{{# vlmkit template",
                       "vlmkit template: ("):
            assert needle not in text, f"{file.relative_to(SRC)} spells {needle}: use vlmkit.runtime.templates"
