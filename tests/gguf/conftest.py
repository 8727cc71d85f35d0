"""Tiny models for the GGUF tests, and llama.cpp's own converters (from the llama-cpp-python sdist).

Tests that need llama.cpp are marked slow and FAIL (never skip) when it is missing: the
proof is llama.cpp running the files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from vlmkit.families.llava import tiny

from ..conftest import run_cli

LLAMA_CPP_PYTHON = "0.3.36"  # the version pinned by pyproject.toml's gguf extra; its sdist carries llama.cpp


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


def _cache() -> Path:
    return Path(os.environ.get("VLMKIT_CACHE", Path.home() / ".cache" / "vlmkit")).expanduser()


@pytest.fixture(scope="session")
def llama_cpp_tree() -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist: ``convert_hf_to_gguf.py``, ``gguf-py`` and
    ``tools/mtmd/legacy-models/``. ``VLMKIT_LLAMA_CPP_SRC`` may point at one; else it is downloaded once
    (``pip download --no-binary :all:``) into ``~/.cache/vlmkit``."""
    if os.environ.get("VLMKIT_LLAMA_CPP_SRC"):
        tree = Path(os.environ["VLMKIT_LLAMA_CPP_SRC"])
    else:
        cache = _cache()
        cache.mkdir(parents=True, exist_ok=True)
        tree = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        with open(cache / ".llama-cpp-python.lock", "w") as lock:  # xdist workers download once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not tree.exists():
                download = cache / "download"
                shutil.rmtree(download, ignore_errors=True)
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(download)], check=True,
                               capture_output=True)
                archive = next(download.glob("llama_cpp_python-*.tar.gz"))
                with tarfile.open(archive) as tar:
                    tar.extractall(cache, filter="data")
                shutil.rmtree(download, ignore_errors=True)
    assert (tree / "convert_hf_to_gguf.py").is_file(), f"{tree} is not llama.cpp's source tree"
    return tree
