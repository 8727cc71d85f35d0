"""The allow-list reader of pickled modules: names and bytes as torch's own, nothing outside the list admitted."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from vlmkit.errors import CheckpointError, UnsafeCheckpointError
from vlmkit.families.flava import tiny
from vlmkit.tensors.safe_pickle import DALLE_CLASSES, PickledModuleSource, peek_state_dict


def _save(module, path, *, legacy: bool):
    with tiny.dall_e_names(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(module, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_reads_the_state_dict_of_a_pickled_module(tmp_path, legacy):
    encoder = tiny.Encoder(16, 64, 1, seed=3)
    source = PickledModuleSource(_save(encoder, tmp_path / "encoder.pkl", legacy=legacy), DALLE_CLASSES)
    expected = encoder.state_dict()
    assert source.root_class == "dall_e.encoder.Encoder"
    assert source.keys() == list(expected)
    assert source.info("blocks.input.w").shape == (16, 3, 7, 7) and source.info("blocks.input.w").dtype == "F32"
    assert all(torch.equal(source.read(name), tensor) for name, tensor in expected.items())


class Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


class Evil(torch.nn.Module):
    pass


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_refuses_a_global_outside_the_list_before_anything_runs(tmp_path, legacy):
    encoder = tiny.Encoder(16, 64, 1)
    encoder.payload = Payload(tmp_path / "pwned")
    path = _save(encoder, tmp_path / "encoder.pkl", legacy=legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"asks for 'posix\.system'.*nothing from the file was run"):
        PickledModuleSource(path, DALLE_CLASSES)
    assert not (tmp_path / "pwned").exists()


def test_refuses_a_module_class_outside_the_list(tmp_path):
    encoder = tiny.Encoder(16, 64, 1)
    encoder.extra = Evil()
    path = _save(encoder, tmp_path / "encoder.pkl", legacy=True)
    with pytest.raises(UnsafeCheckpointError, match=r"'test_safe_pickle\.Evil'|'tests\.tensors\.test_safe_pickle\.Evil'"):
        PickledModuleSource(path, DALLE_CLASSES)


def test_truncated_file(tmp_path):
    path = _save(tiny.Encoder(16, 64, 1), tmp_path / "encoder.pkl", legacy=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        PickledModuleSource(path, DALLE_CLASSES)


def test_a_state_dict_is_not_a_module(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a pickled module"):
        PickledModuleSource(tmp_path / "sd.pt", DALLE_CLASSES)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_peek_lists_a_state_dict_without_reading_it(tmp_path, legacy):
    state = {"a.weight": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.float16)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pth", _use_new_zipfile_serialization=not legacy)
    tensors = peek_state_dict(tmp_path / "ckpt.pth")
    assert {n: (t.shape, t.dtype) for n, t in tensors.items()} == {"a.weight": ((3, 4), torch.float32),
                                                                   "b": ((2,), torch.float16)}
    _save(tiny.Encoder(16, 64, 1), tmp_path / "encoder.pkl", legacy=legacy)
    assert peek_state_dict(tmp_path / "encoder.pkl") is None  # a pickled module: refused, not run
    (tmp_path / "notes.bin").write_bytes(b"not a pickle")
    assert peek_state_dict(tmp_path / "notes.bin") is None
