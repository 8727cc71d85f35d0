"""Where a run starts: the registry finds the start and its family composes what `vlmkit train` trains."""

from __future__ import annotations

import json

from vlmkit import families
from vlmkit.options import LoadOptions
from vlmkit.train import TrainConfig


def test_a_plain_language_model_is_a_start_for_a_new_llava(parts, tmp_path):
    """``pretrain.sh`` starts from Vicuna + CLIP: the registry must hand such a folder to LLaVA's training."""
    found = families.require(parts["vicuna"], "training")
    assert (found.name, found.form) == ("llava", "plain_llm")
    assert found.abilities() == ["training"]  # nothing else: it is no LLaVA yet
    config = TrainConfig(model=str(parts["vicuna"]), data="unused.json", output=str(tmp_path / "run"),
                         stage="pretrain", vision_tower=str(parts["clip"]))
    options = LoadOptions(vision_tower=str(parts["clip"]))
    for _ in range(2):  # the capability is still the function after its first use
        composition = found.family.training(found, options, config)
    composition.check()
    ckpt = composition.checkpoint
    # what LLaVA's train.py saves for LlavaLlamaForCausalLM.from_pretrained(vicuna) + initialize_vision_modules
    clip = json.loads((parts["clip"] / "config.json").read_text())
    assert ckpt.config["architectures"] == ["LlavaLlamaForCausalLM"] and ckpt.config["model_type"] == "llava_llama"
    assert ckpt.config["mm_hidden_size"] == (clip.get("vision_config") or clip)["hidden_size"]
    assert ckpt.config["mm_vision_tower"] == str(parts["clip"])
    assert not [n for n in ckpt.source.keys() if "mm_projector" in n]  # a fresh projector: none yet

