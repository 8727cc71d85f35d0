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

from ..conftest import built_once, run_cli
from . import llama_tools


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Tiny CLIP, LLaVA-1.5 (llama), LLaVA-NeXT (mistral) originals, LoRA and projector-only forms (built once
    for all workers: read-only)."""
    def build(root: Path) -> dict:
        clip = tiny.make_clip(root / "clip-vit-tiny-patch14")
        base = tiny.make_base_llm(root / "vicuna-tiny", dtype=torch.float16)  # lmsys/vicuna-7b-v1.5 is float16
        return {
            "clip": clip, "base": base,
            "v15": tiny.make_llava15(root / "llava-v1.5-tiny", clip),
            "next": tiny.make_llava_next(root / "llava-v1.6-mistral-tiny", clip),
            "lora": tiny.make_lora(root / "llava-v1.5-tiny-lora", base, clip),  # bfloat16, as finetune_lora.sh
            "pretrain": tiny.make_projector_only(root / "llava-v1.5-tiny-pretrain", clip),
        }

    return built_once(tmp_path_factory, "gguf-parts", build)


class _Converted(dict):
    """``--to hf`` conversions of the originals, each made on first use, once for all workers (read-only)."""

    EXTRA = {"next": ("--vision-tower", "clip"), "lora": ("--model-base", "base")}

    def __init__(self, parts, tmp_path_factory):
        super().__init__()
        self.parts, self.tmp_path_factory = parts, tmp_path_factory

    def __missing__(self, name):
        def build(root: Path) -> Path:
            dst = root / f"{name}-hf"  # the GGUF files are named after the folder
            flag, part = self.EXTRA.get(name, (None, None))
            r = run_cli("convert", self.parts[name], dst, "--quiet", *((flag, self.parts[part]) if flag else ()))
            assert r.code == 0, r.err
            return dst

        self[name] = built_once(self.tmp_path_factory, f"gguf-hf-{name}", build)
        return self[name]


@pytest.fixture(scope="session")
def hf(parts, tmp_path_factory):
    """``vlmkit convert --to hf`` of the originals (proved against the original forward by tests/families)."""
    return _Converted(parts, tmp_path_factory)


class _Gguf(dict):
    """``gguf_of(name, *flags)``: the folder ``vlmkit convert MODEL --to gguf --quiet FLAGS`` writes, ``MODEL``
    ``parts[name]`` (or ``hf[name]`` for ``hf:NAME``), made on first use: several tests read the same files."""

    def __init__(self, parts, hf, root: Path):
        super().__init__()
        self.parts, self.hf, self.root = parts, hf, root

    def __call__(self, name: str, *flags) -> Path:
        key = (name, *map(str, flags))
        if key not in self:
            src = self.hf[name.removeprefix("hf:")] if name.startswith("hf:") else self.parts[name]
            dst = self.root / str(len(self))
            r = run_cli("convert", src, dst, "--to", "gguf", "--quiet", *flags)
            assert r.code == 0, r.err
            self[key] = dst
        return self[key]


@pytest.fixture(scope="session")
def gguf_of(parts, hf, tmp_path_factory) -> _Gguf:
    """vlmkit's GGUF files of the tiny models (read-only: copy a file before changing it)."""
    return _Gguf(parts, hf, tmp_path_factory.mktemp("gguf-of"))


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


# llama.cpp's own files for the tiny models, made once for the tests that compare with them or run them (several
# tests share one file: e.g. the 1.5 language model and the plain legacy mmproj)
LANGUAGE_MODELS = [("v15", "f16"), ("v15", "q8_0"), ("next", "f32"), ("next", "f16"), ("lora", "f16")]
MMPROJS = {"v15-f16": ("v15", {}), "v15-f16-feature-layer": ("v15", {"feature_layer": True}),
           "v15-f32": ("v15", {"f32": True}), "next-f32": ("next", {"f32": True}),
           "next-f16": ("next", {"feature_layer": True})}
CLIP_FLAGS = [None, "--vision-only", "--text-only"]


class LlamaCppFiles:
    """``lm(name, outtype)``, ``mmproj(key)`` (a key of ``MMPROJS``), ``surgery_projector(key)``, ``clip(flag)``:
    the files llama.cpp's converters wrote; a converter that failed fails the tests that use its file."""

    def __init__(self, root: Path, failures: dict[str, str | None]):
        self.root, self.failures = root, failures

    def _made(self, key: str) -> Path:
        assert self.failures[key] is None, self.failures[key]
        return self.root / key

    def lm(self, name: str, outtype: str) -> Path:
        return self._made(f"lm-{name}-{outtype}").with_suffix(".gguf")

    def surgery_projector(self, key: str) -> Path:
        return self._made(f"mmproj-{key}/surgery") / "llava.projector"

    def mmproj(self, key: str) -> Path:
        self.surgery_projector(key)
        return next((self._made(f"mmproj-{key}") / "out").glob("mmproj-*.gguf"))

    def clip(self, flag: str | None) -> Path:
        return next((self._made(f"clip{flag or ''}") / "out").glob("*.gguf"))


@pytest.fixture(scope="session")
def llama_cpp_files(tmp_path_factory, parts, hf, llama_cpp_tree) -> LlamaCppFiles:
    """Every file of ``LANGUAGE_MODELS``, ``MMPROJS`` and ``CLIP_FLAGS`` from llama.cpp's own converters, run as
    llama.cpp documents them, in two runs of one interpreter each (the legacy image encoder reads the surgery's
    output)."""
    root = tmp_path_factory.mktemp("llama-cpp-files")
    folders = {  # the llava-hf layout (tokenizer.model + added_tokens.json); NeXT: its language model exported
        "v15": llama_tools.with_tokenizer(hf["v15"], parts["v15"], root / "llava-hf", llama_tools.ADDED),
        "next": llama_tools.export_language_model(hf["next"], parts["next"], root / "mistral-lm", llama_tools.ADDED),
        "lora": llama_tools.with_tokenizer(hf["lora"], parts["base"], root / "merged-hf", llama_tools.ADDED)}
    first = {f"lm-{name}-{outtype}": llama_tools.language_model(folders[name], root / f"lm-{name}-{outtype}.gguf",
                                                                outtype) for name, outtype in LANGUAGE_MODELS}
    first.update({f"mmproj-{key}/surgery": llama_tools.surgery(parts[name], root / f"mmproj-{key}")
                  for key, (name, _) in MMPROJS.items()})
    first.update({f"clip{flag or ''}": llama_tools.clip_model(parts["clip"], root / f"clip{flag or ''}", flag=flag)
                  for flag in CLIP_FLAGS})
    failures = llama_tools.run_scripts(llama_cpp_tree, first)
    second = {f"mmproj-{key}": llama_tools.image_encoder(parts[name], parts["clip"], root / f"mmproj-{key}", **options)
              for key, (name, options) in MMPROJS.items() if failures[f"mmproj-{key}/surgery"] is None}
    failures.update(llama_tools.run_scripts(llama_cpp_tree, second))
    return LlamaCppFiles(root, failures)
