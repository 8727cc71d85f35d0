"""Tiny models for the GGUF tests, and llama.cpp's own converters (from the llama-cpp-python sdist).

Tests that need llama.cpp are marked slow and FAIL (never skip) when it is missing: the
proof is llama.cpp running the files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmkit.families.llava import tiny

from ..conftest import run_cli



@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Tiny CLIP, LLaVA-1.5 (llama), LLaVA-NeXT (mistral) originals, LoRA and projector-only forms."""
    root = tmp_path_factory.mktemp("gguf-models")
    clip = tiny.make_clip(root / "clip-vit-tiny-patch14")
    base = tiny.make_base_llm(root / "vicuna-tiny", dtype=torch.float16)  # lmsys/vicuna-7b-v1.5 is float16
    return {
        "root": root, "clip": clip, "base": base,
        "v15": tiny.make_llava15(root / "llava-v1.5-tiny", clip),
        "next": tiny.make_llava_next(root / "llava-v1.6-mistral-tiny", clip),
        "lora": tiny.make_lora(root / "llava-v1.5-tiny-lora", base, clip),  # bfloat16, as finetune_lora.sh
        "pretrain": tiny.make_projector_only(root / "llava-v1.5-tiny-pretrain", clip),
    }


class _Converted(dict):
    """``--to hf`` conversions of the originals, made on first use."""

    EXTRA = {"next": ("--vision-tower", "clip"), "lora": ("--model-base", "base")}

    def __init__(self, parts):
        super().__init__()
        self.parts = parts

    def __missing__(self, name):
        dst = self.parts["root"] / f"{name}-hf"
        flag, part = self.EXTRA.get(name, (None, None))
        r = run_cli("convert", self.parts[name], dst, "--quiet", *((flag, self.parts[part]) if flag else ()))
        assert r.code == 0, r.err
        self[name] = dst
        return dst


@pytest.fixture(scope="session")
def hf(parts):
    """``vlmkit convert --to hf`` of the originals (proved against the original forward by tests/families)."""
    return _Converted(parts)


# the user's cache, read before the tests point VLMKIT_CACHE at their own: llama.cpp's source is the one
# the build of llama-cpp-python (scripts/build-llama-cpp.sh) fetched there, not a second copy per run
USER_CACHE = os.environ.get("VLMKIT_CACHE")
SOURCE_SCRIPT = Path(__file__).parents[2] / "scripts" / "llama-cpp-source.sh"


@pytest.fixture(scope="session")
def llama_cpp_tree() -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist: ``convert_hf_to_gguf.py``, ``gguf-py`` and
    ``tools/mtmd/legacy-models/``. ``VLMKIT_LLAMA_CPP_SRC`` may point at one; else the one
    ``scripts/llama-cpp-source.sh`` keeps (fetched once, shared with the llama.cpp build)."""
    if os.environ.get("VLMKIT_LLAMA_CPP_SRC"):
        tree = Path(os.environ["VLMKIT_LLAMA_CPP_SRC"])
    else:
        env = {k: v for k, v in os.environ.items() if k != "VLMKIT_CACHE"}
        if USER_CACHE:
            env["VLMKIT_CACHE"] = USER_CACHE
        run = subprocess.run(["bash", str(SOURCE_SCRIPT), sys.executable], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        tree = Path(run.stdout.strip())
    assert (tree / "convert_hf_to_gguf.py").is_file(), f"{tree} is not llama.cpp's source tree"
    return tree
