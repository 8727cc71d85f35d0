"""Tokenizers, tiny models and the `vlmkit data` command for the data tests."""

from __future__ import annotations

import json
import shutil

import pytest

from vlmkit.data.encoders import OriginalEncoder
from vlmkit.data.records import Record, Turn
from vlmkit.families.llava import tiny

from ..conftest import FIXTURES, run_cli

TOKENIZERS = FIXTURES / "tokenizers"
IMAGES = FIXTURES / "images"
DATA = FIXTURES / "data"


@pytest.fixture(scope="session")
def llama():
    """The LLaMA / Vicuna tokenizer as LLaVA-1.5 ships it (legacy: false)."""
    return OriginalEncoder.from_folder(TOKENIZERS / "llama-spm")


@pytest.fixture(scope="session")
def llama_legacy():
    return OriginalEncoder.from_folder(TOKENIZERS / "llama-spm", legacy=True)


@pytest.fixture(scope="session")
def mistral():
    """Mistral-7B's tokenizer with llava-v1.6-mistral-7b's settings (legacy: true)."""
    return OriginalEncoder.from_folder(TOKENIZERS / "mistral-spm")


@pytest.fixture(scope="session")
def chatml(tmp_path_factory):
    """``(add_bos, legacy) -> encoder``: the LLaMA vocabulary with <|im_start|> / <|im_end|> added as special
    tokens (as Nous-Hermes-2-Yi-34B, LLaVA-1.6-34B's base, has them)."""
    root = tmp_path_factory.mktemp("chatml")
    made = {}

    def make(add_bos: bool, legacy: bool) -> OriginalEncoder:
        if (add_bos, legacy) not in made:
            folder = root / f"bos{int(add_bos)}-legacy{int(legacy)}"
            folder.mkdir()
            for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copyfile(TOKENIZERS / "llama-spm" / name, folder / name)
            (folder / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 32000, "<|im_end|>": 32001}))
            special = json.loads((folder / "special_tokens_map.json").read_text())
            special["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
            (folder / "special_tokens_map.json").write_text(json.dumps(special))
            config = json.loads((folder / "tokenizer_config.json").read_text())
            config.update(add_bos_token=add_bos, legacy=legacy)
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
            made[(add_bos, legacy)] = OriginalEncoder.from_folder(folder)
        return made[(add_bos, legacy)]

    return make


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Original tiny LLaVA-1.5 (llama) and LLaVA-NeXT (mistral) checkpoints, and the 1.5 one converted."""
    root = tmp_path_factory.mktemp("data-models")
    clip = tiny.make_clip(root / "clip-vit-tiny")
    models = {"clip": clip, "v15": tiny.make_llava15(root / "llava-v1.5-tiny", clip),
              "next": tiny.make_llava_next(root / "llava-v1.6-mistral-tiny", clip)}
    assert run_cli("convert", models["v15"], root / "llava-v1.5-tiny-hf", "--quiet").code == 0
    models["v15-hf"] = root / "llava-v1.5-tiny-hf"
    return models


def record(*texts: str, images: tuple[str, ...] = (), rid: str = "r1") -> Record:
    """A record whose turns alternate user / assistant."""
    return Record(rid, list(images), [Turn(("user", "assistant")[i % 2], t) for i, t in enumerate(texts)])


def data_cli(*args):
    """Run ``vlmkit data ARGS`` in-process."""
    return run_cli("data", *args)


@pytest.fixture(scope="package")
def local_ray():
    """A local Ray cluster of 2 CPUs (`data tokenize --ray` and `data download --distributor ray` join it).

    One for this folder's tests (its start costs seconds on 2 cores), stopped before tests/engines's Rays start.
    """
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def vlmkit_data():
    return data_cli
