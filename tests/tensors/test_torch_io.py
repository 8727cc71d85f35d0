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


def _awkward_state():
    """What training code leaves: tied weights (one storage), views into a storage, a transposed
    (non-contiguous) tensor, several dtypes, an empty tensor and a scalar."""
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(10, 4, generator=g).half()
    fused = torch.randn(12, 4, generator=g).to(torch.bfloat16)
    return {"embed.weight": embed, "lm_head.weight": embed,  # tied: saved once
            "q.weight": fused[:4], "k.weight": fused[4:8], "v.weight": fused[8:],  # views of one storage
            "proj.weight": torch.randn(3, 5, generator=g).T, "ids": torch.arange(6), "mask": torch.rand(7, generator=g) > 0.5,
            "empty": torch.empty(0, 3), "scale": torch.tensor(2.5)}


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd, "optimizer": {"state": {0: {
    "exp_avg": torch.randn(10, 4)}}}, "epoch": 3}])
def test_reads_are_torch_loads_bytes(tmp_path, wrap):
    """Every tensor, read at its place in the file, equals what torch.load (no mapping) returns."""
    file = tmp_path / "ckpt.pth"
    torch.save(wrap(_awkward_state()), file)
    loaded = torch.load(file, weights_only=True)
    reference = loaded.get("model", loaded)
    source = open_source(file)
    for name, tensor in reference.items():
        got = source.read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)), name


def test_file_offsets_point_at_each_tensors_bytes(tmp_path):
    from vlmkit.tensors.torch_io import file_offsets, load_state_dict

    file = tmp_path / "ckpt.bin"
    state = _awkward_state()
    torch.save(state, file)
    mapped, _ = load_state_dict(file)
    offsets = file_offsets(file, mapped)
    # every non-empty contiguous tensor is located; the transposed one is left to the mapping
    assert sorted(offsets) == sorted(n for n, t in state.items() if t.numel() and n != "proj.weight")
    data = file.read_bytes()
    for name, offset in offsets.items():
        raw = state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert data[offset:offset + len(raw)] == raw, name


def test_file_offsets_refuse_a_big_endian_save(tmp_path):
    from vlmkit.tensors.torch_io import file_offsets, load_state_dict

    file = tmp_path / "ckpt.bin"
    torch.save({"w": torch.randn(3, 3)}, file)
    import zipfile

    edited = tmp_path / "big.bin"
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(edited, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, b"big" if info.filename.endswith("/byteorder") else data)
    mapped, _ = load_state_dict(edited)
    assert file_offsets(edited, mapped) == {}
