"""LoRA runs whose dtypes differ from their base's: every adapter dtype x base dtype merges as the original builder.

``finetune_lora.sh`` leaves a bfloat16 (or float32) adapter and ``non_lora_trainables.bin`` beside a float16
Vicuna. The reference is what ``load_pretrained_model(model_path, model_base)`` computes: the base loaded in
its dtype, ``non_lora_trainables`` loaded into it, ``PeftModel.from_pretrained`` on the run's own files and
``merge_and_unload`` (peft itself, on the files, sharing nothing with vlmkit's merge op).
"""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.families.llava import tiny
from vlmkit.families.llava.checkpoint import open_original
from vlmkit.families.llava.reference import OriginalLlava
from vlmkit.options import LoadOptions
from vlmkit.tensors import open_source
from vlmkit.train import merge_lora

from ..conftest import run_cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
NEXT = {"float32": "bfloat16", "bfloat16": "float16", "float16": "float32"}  # non_lora_trainables' dtype: another one
COMBINATIONS = [(adapter, base) for adapter in DTYPES for base in DTYPES]
ADAPTED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """(adapter dtype, base dtype) -> (LoRA run folder, base folder), built on first use; bases shared."""
    root = tmp_path_factory.mktemp("lora-dtypes")
    clip = tiny.make_clip(root / "clip")
    bases: dict[str, object] = {}
    runs: dict[tuple[str, str], tuple] = {}

    def get(adapter: str, base: str):
        if base not in bases:
            bases[base] = tiny.make_base_llm(root / f"vicuna-{base}", dtype=DTYPES[base])
        if (adapter, base) not in runs:
            run = tiny.make_lora(root / f"llava-lora-{adapter}-on-{base}", bases[base], clip,
                                 adapter_dtype=DTYPES[adapter], non_lora_dtype=DTYPES[NEXT[adapter]],
                                 adapter_file="adapter_model.bin" if base == "float16" else "adapter_model.safetensors")
            runs[adapter, base] = run, bases[base]
        return runs[adapter, base]

    return get


def _builder_merge(run, base, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The original builder's language model: base in ``dtype``, then peft's from_pretrained + merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, run).merge_and_unload().state_dict()


def _projector(run) -> dict[str, torch.Tensor]:
    trained = torch.load(run / "non_lora_trainables.bin", weights_only=True)
    return {k[len("base_model.model.model.mm_projector."):]: v for k, v in trained.items()}


@pytest.mark.parametrize("adapter,base", COMBINATIONS)
def test_convert_writes_the_builders_merge_in_the_base_dtype(lora_runs, adapter, base, tmp_path):
    run, base_folder = lora_runs(adapter, base)
    out = tmp_path / "hf"
    r = run_cli("convert", run, out, "--model-base", base_folder, "--quiet")
    assert r.code == 0, r.err
    written = open_source(out)
    assert {written.info(n).dtype for n in written.keys()} == {CODES[base]}  # default: the base's dtype
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == base
    reference = _builder_merge(run, base_folder, DTYPES[base])
    for module in ADAPTED:
        name = f"model.layers.1.{module}.weight"
        assert torch.equal(written.read("language_model." + name), reference[name]), name
    for key, value in _projector(run).items():  # non_lora_trainables, loaded into the base model's dtype
        linear = {"0": "linear_1", "2": "linear_2"}[key.split(".")[0]]
        assert torch.equal(written.read(f"multi_modal_projector.{linear}.{key.split('.')[1]}"), value.to(DTYPES[base]))


@pytest.mark.parametrize("adapter,base", COMBINATIONS)
def test_converted_at_float32_matches_the_peft_reference(lora_runs, adapter, base, tmp_path):
    run, base_folder = lora_runs(adapter, base)
    out = tmp_path / "hf32"
    r = run_cli("convert", run, out, "--model-base", base_folder, "--dtype", "float32", "--quiet")
    assert r.code == 0, r.err
    report = tmp_path / "report.json"
    v = run_cli("verify", run, out, "--model-base", base_folder, "--json", report, "--max-new-tokens", "2")
    data = json.loads(report.read_text())
    assert v.code == 0 and data["verdict"] == "PASS", v.out + v.err
    logits = next(c for c in data["checks"] if c["name"] == "logits")
    assert logits["measured"]["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("adapter,base", COMBINATIONS)
def test_merge_lora_original_layout(lora_runs, adapter, base, tmp_path):
    run, base_folder = lora_runs(adapter, base)
    merge_lora(run, base_folder, tmp_path / "merged")
    written = open_source(tmp_path / "merged")
    assert {written.info(n).dtype for n in written.keys()} == {CODES[base]}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == base
    reference = _builder_merge(run, base_folder, DTYPES[base])
    for module in ADAPTED:
        name = f"model.layers.0.{module}.weight"
        assert torch.equal(written.read(name), reference[name]), name
    for key, value in _projector(run).items():
        assert torch.equal(written.read("model.mm_projector." + key), value.to(DTYPES[base]))


@pytest.mark.parametrize("adapter,base", COMBINATIONS)
def test_chat_loads_the_run_as_the_builder(lora_runs, adapter, base):
    """``chat`` / ``serve`` run the original form through OriginalLlava, in the base's dtype here."""
    run, base_folder = lora_runs(adapter, base)
    model = OriginalLlava.load(open_original(run, LoadOptions(model_base=str(base_folder))), dtype=DTYPES[base])
    ours = model.language_model.state_dict()
    reference = _builder_merge(run, base_folder, DTYPES[base])
    for module in ADAPTED:
        name = f"model.layers.1.{module}.weight"
        assert torch.equal(ours[name], reference[name]), name


@pytest.mark.parametrize("adapter,base", [("float32", "float16"), ("bfloat16", "float32")])
def test_gguf_from_a_lora_run(lora_runs, adapter, base, tmp_path):
    """``--to gguf`` reads the same merge (the base's dtype), then writes the GGUF type asked for."""
    from gguf import GGUFReader

    run, base_folder = lora_runs(adapter, base)
    r = run_cli("convert", run, tmp_path / "gguf", "--to", "gguf", "--model-base", base_folder, "--dtype", "f32",
                "--quiet")
    assert r.code == 0, r.err
    [model_file] = [f for f in (tmp_path / "gguf").iterdir() if f.suffix == ".gguf" and "mmproj" not in f.name]
    tensors = {t.name: t for t in GGUFReader(model_file).tensors}
    reference = _builder_merge(run, base_folder, DTYPES[base])
    for gguf_name, name in (("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                            ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight")):
        data = torch.from_numpy(tensors[gguf_name].data.copy()).reshape(reference[name].shape)
        assert torch.equal(data, reference[name].float()), gguf_name
