"""A GGUF folder read without knowing the family: the file roles by llama.cpp's names, the (model, mmproj) pair."""

from __future__ import annotations

import pytest

from vlmkit.conversion import gguf_folder
from vlmkit.errors import ConfigError


def test_roles_follow_llama_cpps_file_names():
    # names as llama.cpp's convert_hf_to_gguf.py --mmproj and the ggml-org repositories write them
    assert gguf_folder.role("mmproj-model-f16.gguf") == "mmproj"
    assert gguf_folder.role("llava-v1.6-mistral-7b.Q4_K_M.gguf") == "model"
    assert gguf_folder.role("clip-vit-large-patch14-vision-f16.gguf") == "model"  # a CLIP GGUF is no projector


def test_pair_of_a_folder_and_its_refusal(tmp_path):
    for name in ("llava-f16.gguf", "mmproj-llava-f16.gguf", "README.md"):
        (tmp_path / name).write_bytes(b"")
    assert gguf_folder.is_gguf_folder(tmp_path) and not gguf_folder.is_gguf_folder(tmp_path / "README.md")
    assert gguf_folder.gguf_pair(tmp_path) == (tmp_path / "llava-f16.gguf", tmp_path / "mmproj-llava-f16.gguf")
    (tmp_path / "llava-q8_0.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"expected one language-model GGUF.*'llava-f16.gguf', 'llava-q8_0.gguf'"):
        gguf_folder.gguf_pair(tmp_path)
