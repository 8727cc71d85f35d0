"""`vlmkit merge-lora`: merged = unmerged (fp32, 1e-5), both layouts, and the mix-ups refused."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.families.llava.checkpoint import open_original
from vlmkit.families.llava.reference import OriginalLlava
from vlmkit.options import LoadOptions
from vlmkit.runtime import images, templates
from vlmkit.runtime.tokens import IMAGE_TOKEN_INDEX
from vlmkit.train import merge_lora

from .conftest import IMAGES, run_train_cli

PROMPT = templates.render("llava_v1", [("user", "<image>\nWhat is in the picture?"), ("assistant", None)])


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
def probe(parts):
    ckpt = open_original(parts["v15"], LoadOptions())
    reference = OriginalLlava.load(ckpt)
    ids = reference.prompt_ids(PROMPT)
    pixels, sizes = images.preprocess([IMAGES / "coffee.png"], reference.image_config)
    return ids, pixels, sizes


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
def unmerged(lora, probe):
    """Logits of the trained model with its adapters applied unmerged (peft's LoRA forward)."""
    _, capture = lora
    ids, pixels, sizes = probe
    model = capture.model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.bool),
                    images=pixels, image_sizes=sizes)
    return out.logits[0]


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
def merged(lora, parts, tmp_path_factory):
    result, _ = lora
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for fmt in ("original", "transformers"):
        made = run_train_cli("merge-lora", result.output, "--base", parts["v15"], root / fmt, "--format", fmt, "--quiet")
        assert made.code == 0, made.err
        out[fmt] = root / fmt
    return out


def test_merged_original_equals_unmerged(merged, unmerged, probe):
    ids, pixels, sizes = probe
    ckpt = open_original(merged["original"], LoadOptions())
    assert ckpt.form == "full"
    model = OriginalLlava.load(ckpt)
    logits = model.logits(ids, model.image_features(pixels, sizes))
    assert (logits - unmerged).abs().max() <= 1e-5


def test_merged_transformers_equals_unmerged(merged, unmerged, probe):
    from transformers import LlavaForConditionalGeneration

    ids, pixels, _ = probe
    model = LlavaForConditionalGeneration.from_pretrained(merged["transformers"]).eval()
    image_token, n = model.config.image_token_index, model.config.image_seq_length
    expanded = [t for i in ids for t in ([image_token] * n if i == IMAGE_TOKEN_INDEX else [i])]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits[0]
    assert logits.shape[0] == unmerged.shape[0]
    assert (logits[:, :unmerged.shape[1]] - unmerged).abs().max() <= 1e-5
    # the published layout, with processor and chat template
    names = json.loads((merged["transformers"] / "model.safetensors.index.json").read_text())["weight_map"] \
        if (merged["transformers"] / "model.safetensors.index.json").exists() else None
    assert (merged["transformers"] / "chat_template.jinja").exists() or \
        "chat_template" in json.loads((merged["transformers"] / "processor_config.json").read_text())
    assert (merged["transformers"] / "preprocessor_config.json").exists()
    del names


def test_merge_refuses_the_wrong_base(lora, parts, tmp_path):
    from vlmkit.families.llava import tiny

    result, _ = lora
    other = tiny.make_base_llm(tmp_path / "other-vicuna", seed=7)
    with pytest.raises(ConfigError, match="not the model .* was trained on") as e:
        merge_lora(result.output, other, tmp_path / "x")
    assert str(parts["v15"]) in e.value.hint
    assert not (tmp_path / "x").exists()


def test_merge_names_the_usual_mix_ups(lora, pretrain, parts, tmp_path):
    result, _ = lora
    swapped = run_train_cli("merge-lora", parts["v15"], "--base", result.output, tmp_path / "y")
    assert swapped.code == 1 and "a full model already" in swapped.err
    reversed_base = run_train_cli("merge-lora", result.output, "--base", pretrain[0].output, tmp_path / "y")
    assert reversed_base.code == 1 and "LLaVA's --model-base" in reversed_base.err
