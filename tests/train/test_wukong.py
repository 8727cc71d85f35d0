"""The handbook's Wukong flow end to end on a tiny LLaVA: CSV -> records -> stage-2 LoRA -> merge -> chat ->
convert (transformers, GGUF)."""

from __future__ import annotations

import json

import pytest

from vlmkit.data import TableMapping, convert

from ..conftest import FIXTURES, run_cli
from .conftest import IMAGES, run_train_cli

PROMPT = "为该图片生成标注。"


@pytest.mark.slow  # ~30 s (a LoRA run, a merge, chat, two conversions): CI runs it with the slow tier
def test_wukong_flow(tmp_path, parts):
    records = tmp_path / "wukong.json"
    convert(FIXTURES / "data" / "wukong_tiny.csv", records,
            mapping=TableMapping(image_column="dir", text_column="text", prompts=(PROMPT,)))
    assert len(json.loads(records.read_text(encoding="utf-8"))) == 4

    run = tmp_path / "checkpoints" / "llava-v1.5-tiny-wukong-lora"  # "lora" in the name: LLaVA's builder needs it
    trained = run_train_cli("train", parts["v15"], "--data", records, "--image-folder", IMAGES, "--output", run,
                            "--lora", "--lora-r", "8", "--lora-alpha", "16", "--learning-rate", "1e-2",
                            "--projector-lr", "2e-3", "--batch-size", "2", "--max-steps", "4", "--quiet",
                            "--no-tensorboard")
    assert trained.code == 0, trained.err
    assert "trained 4 step(s)" in trained.out and "adapter_model.safetensors" in trained.out
    assert "stage 2" in trained.err and "template llava_v1" in trained.err

    merged = tmp_path / "llava-v1.5-tiny-wukong"
    made = run_train_cli("merge-lora", run, "--base", parts["v15"], merged, "--quiet")
    assert made.code == 0, made.err

    answer = run_cli("chat", merged, "--image", IMAGES / "chelsea.png", "--prompt", PROMPT, "--temperature", "0",
                     "--max-new-tokens", "6")
    assert answer.code == 0, answer.err
    assert answer.out.strip()

    hf = tmp_path / "llava-v1.5-tiny-wukong-hf"
    converted = run_cli("convert", merged, hf, "--quiet", "--verify")
    assert converted.code == 0, converted.out + converted.err
    gguf = tmp_path / "llava-v1.5-tiny-wukong-gguf"
    to_gguf = run_cli("convert", merged, gguf, "--to", "gguf", "--dtype", "f32", "--quiet")
    assert to_gguf.code == 0, to_gguf.err
    assert sorted(p.suffix for p in gguf.glob("*.gguf")) == [".gguf", ".gguf"]  # language model + mmproj
