"""One reader of a transformers folder's chat template, shared by the card, `vlmkit serve --engine vllm` and data."""

from __future__ import annotations

import json

from vlmkit.data import model as data_model
from vlmkit.publish import card
from vlmkit.runtime import templates
from vlmkit.serve.engines import vllm


def test_the_json_fields_and_the_jinja_file_in_transformers_order(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer"}))
    assert templates.read_chat_template(tmp_path) == "from tokenizer"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert templates.read_chat_template(tmp_path) == "from jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert templates.read_chat_template(tmp_path) == "from chat_template.json"
    (tmp_path / "processor_config.json").write_text("{not json")  # unreadable: skipped, not a traceback
    assert templates.read_chat_template(tmp_path) == "from chat_template.json"
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "from processor_config.json"}))
    assert templates.read_chat_template(tmp_path) == "from processor_config.json"
    assert templates.read_chat_template(tmp_path / "missing") is None


def test_card_vllm_and_data_use_the_one_reader():
    for module in (card, vllm, data_model):
        assert not [name for name in vars(module) if "chat_template" in name and name != "read_chat_template"], module
