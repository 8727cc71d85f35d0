"""A checkpoint config that transformers 5's own validation refuses (heads that do not divide the width) is one
clear vlmkit error naming the checkpoint and transformers' reason, not a traceback from huggingface_hub."""

import json

from vlmkit.families import llava

from ..conftest import run_cli


def test_heads_that_do_not_divide_the_width_are_one_clear_error(tmp_path):
    checkpoint = llava.make_tiny(tmp_path, "llama")
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_attention_heads"] = config["num_key_value_heads"] = 5  # the tiny width (64) is not a multiple of 5
    (checkpoint / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", checkpoint, tmp_path / "out", "--quiet")
    assert result.code != 0
    assert str(checkpoint) in result.err and "not a multiple of the number of attention heads" in result.err
    assert "Traceback" not in result.err and "hint:" in result.err
    assert not (tmp_path / "out").exists()
