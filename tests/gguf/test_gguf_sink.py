"""The GGUF sink: each tensor's type (and why), the plan before any byte, atomic output, read back by gguf-py."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlmkit.conversion import MANIFEST, rename
from vlmkit.conversion.gguf_sink import GGUFConversion, GGUFFile, TypeRule, choose_type, gguf_type, run
from vlmkit.errors import ConfigError, OutputError, PlanError
from vlmkit.tensors import open_source

T = gguf.GGMLQuantizationType


@pytest.fixture
def source(tmp_path):
    tensors = {"embed": torch.randn(64, 32), "odd": torch.randn(8, 48), "norm": torch.randn(32),
               "conv": torch.randn(4, 3, 2, 2), "cls": torch.randn(1, 32)}
    save_file(tensors, tmp_path / "model.safetensors")
    return open_source(tmp_path / "model.safetensors"), tensors


class CountingSource:
    """A source that records every read (the sink must read each tensor once, in plan order)."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []
        self.path, self.format = inner.path, inner.format

    def keys(self):
        return self.inner.keys()

    def info(self, name):
        return self.inner.info(name)

    def files(self):
        return self.inner.files()

    def read(self, name):
        self.reads.append(name)
        return self.inner.read(name)

    def close(self):
        self.inner.close()


def _conversion(src, *, types=(), metadata=None, rules=None):
    def write(w: gguf.GGUFWriter, asked) -> None:
        w.add_file_type(asked.file_type)
        w.add_description("tiny")

    rules = rules or [rename("embed", "token_embd.weight"), rename("odd", "odd.weight"), rename("norm", "norm.weight"),
                      rename("conv", "v.patch_embd.weight"), rename("cls", "v.class_embd")]
    return GGUFConversion(src, [GGUFFile("tiny-{type}.gguf", "clip", rules, metadata or write, types=list(types))])


def test_types_follow_llama_cpp_with_the_reason():
    q8 = gguf_type("q8_0")
    assert choose_type("blk.0.attn_q.weight", (64, 64), q8, []) == (T.Q8_0, "")
    ty, why = choose_type("blk.0.attn_norm.weight", (64,), q8, [])
    assert ty == T.F32 and "1-D" in why
    ty, why = choose_type("v.class_embd", (1, 64), q8, [])
    assert ty == T.F32 and "not a '.weight' matrix" in why
    ty, why = choose_type("odd.weight", (8, 48), q8, [])
    assert ty == T.F16 and "rows of 48 are not a multiple of Q8_0's block of 32" in why
    patch = [TypeRule("v.patch_embd.weight", T.F32, "never quantised", table=((T.F16, T.F16),))]
    assert choose_type("v.patch_embd.weight", (4, 3, 2, 2), gguf_type("f16"), patch) == (T.F16, "")
    assert choose_type("v.patch_embd.weight", (4, 3, 2, 2), q8, patch) == (T.F32, "never quantised")
    assert gguf_type("float16").name == "f16" and gguf_type(None).name == "f16"


def test_unknown_type_names_the_known_ones():
    with pytest.raises(ConfigError) as e:
        gguf_type("q4_k")
    assert "'q4_k' is not a GGUF type vlmkit writes" in e.value.message and "q8_0" in e.value.hint


def test_plan_then_stream_one_tensor_at_a_time(source, tmp_path):
    src, tensors = source
    counting = CountingSource(src)
    result = run(_conversion(counting), tmp_path / "out", type_name="q8_0")
    checked = result.plan
    assert counting.reads == [t.name for t in checked.files[0].plan.steps for t in t.sources]  # once each, in order
    fallbacks = {name: (ty, why) for _, name, ty, why in checked.fallbacks()}
    assert fallbacks["odd.weight"][0] == "F16" and fallbacks["norm.weight"][0] == "F32"
    assert "token_embd.weight" not in fallbacks
    assert "F16 instead of q8_0 for 1 tensor(s) (odd.weight)" in checked.render()

    reader = gguf.GGUFReader(tmp_path / "out" / "tiny-q8_0.gguf")  # gguf-py, independent of vlmkit's writer
    by_name = {t.name: t for t in reader.tensors}
    assert by_name["token_embd.weight"].tensor_type == T.Q8_0 and by_name["odd.weight"].tensor_type == T.F16
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    norm = np.array(by_name["norm.weight"].data)
    assert np.array_equal(norm, tensors["norm"].numpy())
    embd = gguf.quants.dequantize(by_name["token_embd.weight"].data, T.Q8_0)
    assert np.abs(embd - tensors["embed"].numpy()).max() <= np.abs(tensors["embed"].numpy()).max() / 127
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert set(manifest["files"]) == {"tiny-q8_0.gguf", "README.md"}
    planned = manifest["plan"]["files"][0]
    assert planned["metadata"]["general.description"] == "tiny"
    assert {t["name"]: t["type"] for t in planned["tensors"]}["odd.weight"] == "F16"


def test_dry_run_writes_nothing(source, tmp_path):
    src, _ = source
    result = run(_conversion(src), tmp_path / "out", dry_run=True)
    assert result.destination is None and not (tmp_path / "out").exists()
    assert len(result.plan.targets) == 5


def test_every_problem_of_every_file_before_anything_is_read(source, tmp_path):
    src, _ = source
    counting = CountingSource(src)
    with pytest.raises(PlanError) as e:
        run(_conversion(counting, rules=[rename("embed", "token_embd.weight")]), tmp_path / "out")
    assert len(e.value.problems) == 4 and all(p.startswith("tiny-f16.gguf: no rule claims") for p in e.value.problems)
    assert counting.reads == [] and not (tmp_path / "out").exists()


def test_a_metadata_error_stops_the_plan(source, tmp_path):
    src, _ = source

    def broken(w, asked):
        raise ConfigError("config.json: hidden_size is missing")

    with pytest.raises(ConfigError, match="hidden_size"):
        run(_conversion(src, metadata=broken), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_value_f16_cannot_hold_leaves_nothing_behind(tmp_path):
    save_file({"big": torch.tensor([[1.0, 7e4]] * 32).T.contiguous()}, tmp_path / "m.safetensors")
    src = open_source(tmp_path / "m.safetensors")
    with pytest.raises(OutputError) as e:
        run(_conversion(src, rules=[rename("big", "big.weight")]), tmp_path / "out")
    assert "'big.weight' holds values up to 7e+04, beyond float16's 65504" in e.value.message
    assert "--dtype f32 or bf16" in e.value.hint
    assert list(tmp_path.iterdir()) == [tmp_path / "m.safetensors"]  # no destination, no temporary folder
