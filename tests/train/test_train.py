"""Training on tiny LLaVAs (CPU, fp32): what learns, what is written, overfitting, resuming."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.families.llava.checkpoint import open_original
from vlmkit.options import LoadOptions
from vlmkit.train import TrainConfig, train
from vlmkit.data import IGNORE_INDEX

from .conftest import IMAGES, run, source_name, state_of


def test_stage1_changes_only_the_projector(pretrain, parts):
    result, capture = pretrain
    before = state_of(parts["v15"])
    changed = {n for n, p in capture.params.items() if not torch.equal(p, before[n])}
    assert changed == {n for n in capture.params if n.startswith("model.mm_projector.")}
    assert len(changed) == 4  # mlp2x_gelu: two linears, weight and bias


def test_stage1_writes_mm_projector_bin_as_llava(pretrain, parts):
    result, capture = pretrain
    assert result.files == ["config.json", "mm_projector.bin", "vlmkit-train.json"]
    saved = torch.load(result.output / "mm_projector.bin", weights_only=True)
    assert sorted(saved) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                             "model.mm_projector.2.weight"]
    for name, tensor in saved.items():
        assert torch.equal(tensor, capture.params[name])
    config = json.loads((result.output / "config.json").read_text())
    assert config["tune_mm_mlp_adapter"] is True and config["mm_projector_type"] == "mlp2x_gelu"
    # vlmkit (and LLaVA's builder) read it as a projector-only checkpoint over the base
    ckpt = open_original(result.output, LoadOptions(model_base=str(parts["vicuna"])))
    assert ckpt.form == "projector" and torch.equal(ckpt.source.read("model.mm_projector.0.weight"),
                                                    saved["model.mm_projector.0.weight"])
    # the loss curve: logged every step, plotted
    assert [s for s, _ in result.losses] == [1, 2, 3]
    assert (result.output / "loss.svg").read_text().startswith("<svg")


def test_lora_changes_only_adapters_and_projector(lora, parts):
    result, capture = lora
    before = state_of(parts["v15"])
    adapters = {n for n in capture.params if "lora_" in n}
    assert adapters and all(".layers." in n for n in adapters)  # the language model only, never the tower
    changed = set()
    for name, tensor in capture.params.items():
        if name in adapters:
            continue
        if not torch.equal(tensor, before[source_name(name)]):
            changed.add(source_name(name))
    assert changed == {n for n in before if n.startswith("model.mm_projector.")}
    b = [capture.params[n] for n in adapters if "lora_B" in n]
    assert all(t.abs().sum() > 0 for t in b)  # initialised to zero, trained away from it


def test_lora_outputs_load_as_llava_expects(lora, parts):
    result, capture = lora
    out = result.output
    assert result.files == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                            "non_lora_trainables.bin", "vlmkit-train.json"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["task_type"] == "CAUSAL_LM"
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    assert adapter["base_model_name_or_path"] == str(parts["v15"])
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert sorted(non_lora) == [f"base_model.model.model.mm_projector.{k}" for k in
                                ("0.bias", "0.weight", "2.bias", "2.weight")]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["mm_vision_tower"] == str(parts["clip"])
    assert config["mm_projector_lr"] == 5e-3 and config["tokenizer_model_max_length"] == 2048
    record = json.loads((out / "vlmkit-train.json").read_text())
    assert record["base"] == str(parts["v15"]) and len(record["base_fingerprint"]) == 32
    # vlmkit reads the run as LLaVA's builder does (base + non_lora_trainables + adapter), without pickle code
    ckpt = open_original(out, LoadOptions(model_base=str(parts["v15"])))
    assert ckpt.form == "lora" and ckpt.lora.scale == 2.0
    name = "model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(ckpt.source.read(name), capture.params[f"base_model.model.{name[:-len('weight')]}default.weight"])


def test_overfits_four_records(tmp_path, parts, records):
    """Full fine-tuning drives the loss on four records below 0.5 within 25 steps (it starts above 10)."""
    result, _ = run(tmp_path, parts, records, "overfit", batch_size=4, max_steps=25, learning_rate=3e-3,
                    lr_scheduler="constant", group_by_modality_length=False)
    losses = [loss for _, loss in result.losses]
    assert losses[0] > 10 and min(losses[-3:]) < 0.5, losses
    assert "model.safetensors" in result.files and "tokenizer.model" in result.files


def test_labels_come_from_the_data_package(parts, records):
    """The batch the model sees is `vlmkit data tokenize`'s output, padded with the pad token (unk) and -100."""
    from vlmkit.data import iter_examples, load_data_model, open_records
    from vlmkit.runtime import images
    from vlmkit.train.collate import Collator, LlavaDataset

    model = load_data_model(parts["v15"])
    recs = list(open_records(records))
    expected = list(iter_examples(recs, model, image_folder=IMAGES))
    config = open_original(parts["v15"], LoadOptions())
    dataset = LlavaDataset(recs, model, IMAGES, images.ImageConfig.from_original(config.config, config.preprocessor))
    batch = Collator(model.encoder.pad_token_id, model.max_length)([dataset[0], dataset[3]])
    for row, example in zip(range(2), (expected[0], expected[3])):
        n = len(example.input_ids)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids
        assert batch["labels"][row, :n].tolist() == example.labels
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}
        assert set(batch["input_ids"][row, n:].tolist()) <= {model.encoder.pad_token_id}
    pixels, _ = images.preprocess([IMAGES / "rocket.png"], dataset.image_config)
    assert torch.equal(batch["images"][1], pixels[0])


class StopAt(TrainerCallback):
    """Ctrl-C after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_the_same_run(tmp_path, parts, records):
    """Interrupted after step 4 (checkpoint at 3), resumed: steps 4-6 have the uninterrupted run's losses."""
    options = dict(model=str(parts["v15"]), data=str(records), image_folder=str(IMAGES), batch_size=2, max_steps=6,
                   learning_rate=1e-2, warmup_ratio=0.0, save_steps=3, lora=True, lora_r=4, lora_alpha=8,
                   lora_dropout=0.1, progress=False, tensorboard=False, epochs=3)
    whole = train(TrainConfig(output=str(tmp_path / "whole"), **options))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output=str(tmp_path / "cut"), **options), callbacks=[StopAt(4)])
    cut = tmp_path / "cut"
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (cut / ".staging").exists() or not any((cut / ".staging").iterdir())
    resumed = train(TrainConfig(output=str(cut), resume=True, **options))
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4, 5, 6]
    for (step, a), (_, b) in zip(whole.losses, resumed.losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (step, whole.losses, resumed.losses)
    with pytest.raises(ConfigError, match="learning_rate"):
        train(TrainConfig(output=str(cut), resume=True, **{**options, "learning_rate": 1e-3}))


def test_an_interrupted_save_leaves_no_checkpoint(tmp_path, parts, records, monkeypatch):
    from vlmkit.train import trainer as trainer_module

    def broken(self, output_dir, *a, **k):
        raise KeyboardInterrupt  # Ctrl-C while the optimizer state is being written

    monkeypatch.setattr(trainer_module.LlavaTrainer, "_save_optimizer_and_scheduler", broken)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, parts, records, "broken", stage="pretrain", max_steps=2, save_steps=1)
    assert not list((tmp_path / "broken").glob("checkpoint-*"))
    assert trainer_module.latest_checkpoint(tmp_path / "broken") is None


def test_bad_data_fails_before_the_model_loads(tmp_path, parts, records, monkeypatch):
    from vlmkit.families.llava import train_model

    data = json.loads(records.read_text())
    data[1]["image"] = "missing.png"
    data[2]["conversations"] = data[2]["conversations"][:1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    monkeypatch.setattr(train_model, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(VlmkitError) as e:
        run(tmp_path, parts, records=bad, name="bad", stage="pretrain")
    assert "'r1'" in e.value.message and "'r2'" in e.value.message and "missing.png" in e.value.message
    assert "--fix" in e.value.hint
    assert not (tmp_path / "bad").exists()


def test_strict_data_refuses_what_the_original_trains_its_own_way(tmp_path, parts, records, monkeypatch):
    from vlmkit.families.llava import train_model

    data = json.loads(records.read_text())
    data[1]["conversations"].insert(0, {"from": "gpt", "value": "Welcome!"})  # the original drops this turn
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(data))
    monkeypatch.setattr(train_model, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(VlmkitError) as e:
        run(tmp_path, parts, records=odd, name="strict", strict_data=True)
    assert "'r1'" in e.value.message and "leading_gpt" in e.value.message and "drops it" in e.value.message
    assert e.value.hint.endswith("--strict")
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):  # by default the data checks out
        run(tmp_path, parts, records=odd, name="default")


def test_refuses_an_existing_run_without_resume_or_force(pretrain, parts, records):
    result, _ = pretrain
    with pytest.raises(VlmkitError, match="already holds files"):
        train(TrainConfig(model=str(parts["v15"]), data=str(records), image_folder=str(IMAGES),
                          output=str(result.output), stage="pretrain", max_steps=1, progress=False))
