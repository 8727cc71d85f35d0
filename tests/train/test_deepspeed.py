"""DeepSpeed: presets and config checks (fast); ZeRO-2 / ZeRO-3 with 1 and 2 CPU processes (gloo) against the
plain run, and LLaVA issue #1619 (a pretrained projector loaded into ZeRO-3-partitioned parameters) (slow)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.train import deepspeed as ds
from vlmkit.train import TrainConfig, train

from .conftest import IMAGES, launch

FIT = dict(micro_batch=2, accumulation=1, world_size=2, max_grad_norm=1.0, bf16=False, fp16=False)


@pytest.mark.parametrize("name", sorted(ds.PRESETS))
def test_presets_pass_deepspeeds_parser(name):
    assert ds.resolve_config(ds.preset(name), name, **FIT)["zero_optimization"]["stage"] in (2, 3)


def test_typos_and_batch_products_are_named_before_anything_loads():
    config = ds.preset("zero3")
    config["gradient_acumulation_steps"] = 2
    config["train_batch_size"] = 8
    with pytest.raises(ConfigError) as e:
        ds.resolve_config(config, "my.json", **FIT)
    assert "unknown key 'gradient_acumulation_steps' (did you mean 'gradient_accumulation_steps'?)" in e.value.message
    assert "train_batch_size is 8 but --batch-size x --gradient-accumulation x 2 process(es) gives 4" in e.value.message
    nested = ds.preset("zero2")
    nested["zero_optimization"]["overlap_com"] = True
    with pytest.raises(ConfigError, match="overlap_com"):
        ds.resolve_config(nested, "my.json", **FIT)


def test_a_bad_deepspeed_file_fails_before_the_data_and_model(tmp_path, parts, records, monkeypatch):
    from vlmkit.train import run as run_module

    bad = tmp_path / "zero.json"
    bad.write_text(json.dumps({**ds.preset("zero2"), "train_micro_batch_size_per_gpu": 8}))
    monkeypatch.setattr(run_module, "_check_data", lambda *a: pytest.fail("the data was read"))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 8 but --batch-size gives 2"):
        train(TrainConfig(model=str(parts["v15"]), data=str(records), output=str(tmp_path / "run"), batch_size=2,
                          deepspeed=str(bad)))


# ------------------------------------------------------------------------------------------------ slow

STEPS = 3


def _common(parts, records):
    return ["--data", records, "--image-folder", IMAGES, "--max-steps", STEPS, "--learning-rate", "1e-3",
            "--warmup-ratio", "0", "--quiet", "--no-tensorboard", "--save-steps", "100"]


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def _plain(tmp_path, parts, records, name, **options):
    config = TrainConfig(model=str(parts["v15"]), data=str(records), image_folder=str(IMAGES),
                         output=str(tmp_path / name), batch_size=4, max_steps=STEPS, learning_rate=1e-3,
                         warmup_ratio=0.0, save_steps=100, progress=False, tensorboard=False, seed=0, **options)
    return train(config)


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
def plain_full(tmp_path_factory, parts, records):
    return _plain(tmp_path_factory.mktemp("plain"), parts, records, "plain")


@pytest.mark.slow
@pytest.mark.parametrize("preset,nproc", [("zero2", 1), ("zero2", 2), ("zero3", 1), ("zero3", 2)])
def test_zero_matches_the_plain_run(tmp_path, parts, records, plain_full, preset, nproc):
    import deepspeed  # noqa: F401  - the slow tier fails (never skips) without DeepSpeed

    run = tmp_path / f"{preset}-{nproc}"
    done = launch(nproc, "train", parts["v15"], "--output", run, "--batch-size", 4 // nproc, "--deepspeed", preset,
                  *_common(parts, records))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    expected = [loss for _, loss in plain_full.losses]
    assert _losses(run) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # the outputs are gathered from the partitions: the same weights as the plain run's
    from safetensors.torch import load_file

    mine, theirs = load_file(run / "model.safetensors"), load_file(plain_full.output / "model.safetensors")
    assert mine.keys() == theirs.keys()
    worst = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    assert worst < 1e-4


@pytest.mark.slow
def test_issue_1619_projector_into_zero3_partitions(tmp_path, parts, records):
    """finetune_lora.sh under ZeRO-3: Vicuna + CLIP + --init-projector mm_projector.bin. LLaVA fails with
    "size mismatch for 0.weight ... torch.Size([0])"; here the projector arrives in the partitions."""
    import deepspeed  # noqa: F401

    projector = parts["projector"] / "mm_projector.bin"
    start = ["--vision-tower", parts["clip"], "--init-projector", projector, "--template", "llava_v1", "--lora",
             "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]
    plain = tmp_path / "plain"
    done = launch(1, "train", parts["vicuna"], "--output", plain, "--batch-size", 4, *start, *_common(parts, records))
    assert done.returncode == 0, done.stderr[-6000:]
    zero3 = tmp_path / "zero3"
    done = launch(2, "train", parts["vicuna"], "--output", zero3, "--batch-size", 2, "--deepspeed", "zero3", *start,
                  *_common(parts, records))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "size mismatch" not in done.stderr
    partitioned = re.search(r"ZeRO-3: (\d+) of (\d+) parameters partitioned at construction", done.stderr)
    assert partitioned and partitioned.group(1) == partitioned.group(2), done.stderr[-3000:]
    assert _losses(zero3) == pytest.approx(_losses(plain), rel=1e-4, abs=1e-5)
    # what was trained started from the file: step 1's loss is the loss with that projector
    given = torch.load(projector, weights_only=True)
    trained = torch.load(zero3 / "non_lora_trainables.bin", weights_only=True)
    key = "base_model.model.model.mm_projector.0.weight"
    assert trained[key].shape == given["model.mm_projector.0.weight"].shape
    assert 0 < (trained[key] - given["model.mm_projector.0.weight"]).abs().max() < 0.05  # moved, from there
