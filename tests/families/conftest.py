"""Tiny original-format LLaVA checkpoints, built once per test session (random weights, fixed seeds)."""

from __future__ import annotations

import pytest
import torch

from vlmkit.families.llava import tiny


@pytest.fixture
def offline(monkeypatch):
    """No download from the hub (a SigLIP tower name is a hub id): every snapshot download is refused."""
    import huggingface_hub

    def refuse(repo_id, *args, **kwargs):
        raise OSError(f"offline test: no download of {repo_id}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.fixture(scope="session")
def llava_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    clip = tiny.make_clip(root / "clip-vit-tiny-patch14")
    return {
        "root": root,
        "clip": clip,
        "v15": tiny.make_llava15(root / "llava-v1.5-tiny", clip),
        "next": tiny.make_llava_next(root / "llava-v1.6-mistral-tiny", clip),
        "base": tiny.make_base_llm(root / "vicuna-tiny", dtype=torch.float16),  # lmsys/vicuna-7b-v1.5 is float16
        "lora": None,
    }


@pytest.fixture(scope="session")
def llava_lora(llava_parts):
    """As finetune_lora.sh leaves it: bfloat16 adapter and non_lora_trainables.bin beside the float16 base."""
    root = llava_parts["root"]
    return tiny.make_lora(root / "llava-v1.5-tiny-lora", llava_parts["base"], llava_parts["clip"])


@pytest.fixture(scope="session")
def llava_projector(llava_parts):
    root = llava_parts["root"]
    return tiny.make_projector_only(root / "llava-v1.5-tiny-pretrain", llava_parts["clip"])
