"""Tiny LLaVA models in the real layouts, four records on real photos, and helpers to run `vlmkit train`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from transformers import TrainerCallback

from vlmkit.families.llava import tiny
from vlmkit.train import TrainConfig, train

from ..conftest import FIXTURES, CliResult, built_once

IMAGES = FIXTURES / "images"
ANSWERS = [("chelsea.png", "A tabby cat lying on the floor."), ("astronaut.png", "An astronaut in an orange suit."),
           ("coffee.png", "A cup of latte on a wooden table."), ("rocket.png", "A rocket on the launch pad.")]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # the tests share two cores; one thread is also deterministic


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """clip, an original LLaVA-1.5 (full), its plain LLM (Vicuna stand-in) and a stage-1 projector beside it
    (built once for all workers: read-only)."""
    def build(root: Path) -> dict:
        clip = tiny.make_clip(root / "clip-vit-tiny")
        return {"clip": clip, "v15": tiny.make_llava15(root / "llava-v1.5-tiny", clip),
                "vicuna": tiny.make_base_llm(root / "vicuna-tiny"),
                "projector": tiny.make_projector_only(root / "llava-v1.5-tiny-pretrain", clip)}

    return built_once(tmp_path_factory, "train-parts", build)


@pytest.fixture(scope="session")
def records(tmp_path_factory) -> Path:
    """Four LLaVA records, one per photo."""
    path = tmp_path_factory.mktemp("train-data") / "four.json"
    data = [{"id": f"r{i}", "image": image,
             "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                               {"from": "gpt", "value": answer}]} for i, (image, answer) in enumerate(ANSWERS)]
    path.write_text(json.dumps(data))
    return path


def run_train_cli(*args) -> CliResult:
    """``vlmkit train|merge-lora ARGS`` in-process (through ``vlmkit.cli.main``)."""
    from vlmkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def launch(nproc: int, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m vlmkit.cli ARGS`` (CPU: gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000 + nproc), "-m", "vlmkit.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's start, as the original namespace (LoRA / projector forms included)."""
    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.options import LoadOptions

    ckpt = open_original(folder, LoadOptions())
    return {n: ckpt.source.read(n) for n in ckpt.source.keys()}


class Capture(TrainerCallback):
    """Keeps the trained model's parameters (names as the model has them) at the end of training."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}


def source_name(name: str) -> str:
    """A (peft-wrapped) parameter name -> the original checkpoint's name for the same tensor."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def run(tmp_path, parts, records, name, **options):
    capture = Capture()
    defaults = dict(model=str(parts["v15"]), data=str(records), image_folder=str(IMAGES), output=str(tmp_path / name),
                    batch_size=2, max_steps=3, learning_rate=1e-2, warmup_ratio=0.0, save_steps=100,
                    progress=False, tensorboard=False)
    result = train(TrainConfig(**{**defaults, **options}), callbacks=[capture])
    return result, capture


@pytest.fixture(scope="session")
def pretrain(tmp_path_factory, parts, records):
    return run(tmp_path_factory.mktemp("pretrain"), parts, records, "run", stage="pretrain")


@pytest.fixture(scope="session")
def lora(tmp_path_factory, parts, records):
    return run(tmp_path_factory.mktemp("lora"), parts, records, "llava-tiny-lora", lora=True, lora_r=4, lora_alpha=8,
               projector_lr=5e-3)
