import json
import os

import pytest
import torch

from vlmkit.errors import CheckpointError, UnsafeCheckpointError
from vlmkit.tensors import open_source

STATE = {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4), "steps": torch.tensor(7)}


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd, "epoch": 3},
                                  lambda sd: {"state_dict": sd, "config": {"lr": 0.1}}])
def test_nested_state_dicts(tmp_path, wrap):
    file = tmp_path / "ckpt.pth"
    torch.save(wrap(STATE), file)
    source = open_source(file)
    assert sorted(source.keys()) == sorted(STATE)
    for name, tensor in STATE.items():
        assert source.info(name).shape == tuple(tensor.shape)
        assert torch.equal(source.read(name), tensor)
        assert torch.equal(source.read(name), tensor)  # pages given back are read again correctly


def test_sharded_bin_with_index(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3, dtype=torch.bfloat16)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    torch.save({"not": "weights"}, tmp_path / "training_args.bin")
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    source = open_source(tmp_path)
    assert sorted(source.keys()) == ["a", "b"]
    assert source.info("b").dtype == "BF16"
    assert torch.equal(source.read("b"), torch.zeros(3, dtype=torch.bfloat16))


def test_legacy_non_zip_file_is_read_safely(tmp_path):
    file = tmp_path / "old.bin"
    torch.save(STATE, file, _use_new_zipfile_serialization=False)
    source = open_source(file)
    for name, tensor in STATE.items():
        assert torch.equal(source.read(name), tensor)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    file = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "x": _Exploit(marker)}, file, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as e:
        open_source(file)
    assert "evil.bin" in str(e.value) and "system" in str(e.value)
    assert "nothing from the file was run" in str(e.value)
    assert not marker.exists()


def test_truncated_zip(tmp_path):
    file = tmp_path / "cut.bin"
    torch.save(STATE, file)
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.bin: not a readable PyTorch checkpoint"):
        open_source(file)


def test_duplicate_across_bin_shards(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "a.bin")
    torch.save({"a": torch.ones(2)}, tmp_path / "b.bin")
    with pytest.raises(CheckpointError, match="'a' is in both a.bin and b.bin"):
        open_source(tmp_path)


def test_missing_bin_shard(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        open_source(tmp_path)
