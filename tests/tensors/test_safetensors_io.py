import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmkit.errors import CheckpointError, OutputError
from vlmkit.tensors import open_source
from vlmkit.tensors.safetensors_io import SafetensorsWriter, TensorSpec, layout_shards

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b.bf16": torch.randn(4, 2).to(torch.bfloat16),
    "c.ids": torch.arange(7, dtype=torch.int64),
    "d.empty": torch.zeros(0, 4),
    "e.scalar": torch.tensor(3.5, dtype=torch.float16),
}


def test_reader_matches_safe_open(tmp_path):
    file = tmp_path / "m.safetensors"
    save_file(TENSORS, file)
    source = open_source(file)
    assert sorted(source.keys()) == sorted(TENSORS)
    with safe_open(file, "pt") as ref:
        for name in TENSORS:
            info = source.info(name)
            expected = ref.get_tensor(name)
            assert info.shape == tuple(expected.shape)
            got = source.read(name)
            assert got.dtype == expected.dtype
            assert torch.equal(got, expected)
            assert info.nbytes == expected.numel() * expected.element_size()


def test_folder_without_index_and_sharded_index(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "part1.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "part2.safetensors")
    assert sorted(open_source(tmp_path).keys()) == ["x", "y"]

    indexed = tmp_path / "indexed"
    indexed.mkdir()
    save_file({"x": torch.ones(2)}, indexed / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(3)}, indexed / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    (indexed / "model.safetensors.index.json").write_text(json.dumps(index))
    source = open_source(indexed)
    assert source.info("y").file.name == "model-00002-of-00002.safetensors"
    assert torch.equal(source.read("y"), torch.zeros(3))


def test_missing_shard_named_by_index(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors.*'y'"):
        open_source(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"'x' is in both a.safetensors and b.safetensors"):
        open_source(tmp_path)


def _raw_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_header_length_beyond_file(tmp_path):
    file = tmp_path / "bad.safetensors"
    file.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match=r"bad.safetensors: header length 10000 is beyond the file size 10"):
        open_source(file)


def test_truncated_data(tmp_path):
    file = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"'w' ends at byte 16384 .* truncated"):
        open_source(file)


def test_overlapping_offsets(tmp_path):
    file = tmp_path / "m.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    _raw_file(file, header, bytes(24))
    with pytest.raises(CheckpointError, match=r"'a' \(bytes 0-16\) and 'b' \(bytes 8-24\) overlap"):
        open_source(file)


def test_unknown_dtype(tmp_path):
    file = tmp_path / "m.safetensors"
    _raw_file(file, {"a": {"dtype": "F12", "shape": [4], "data_offsets": [0, 6]}}, bytes(6))
    with pytest.raises(CheckpointError, match=r"'a' has unknown dtype 'F12'"):
        open_source(file)


def test_size_disagrees_with_shape(tmp_path):
    file = tmp_path / "m.safetensors"
    _raw_file(file, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(12))
    with pytest.raises(CheckpointError, match=r"'a' occupies 12 bytes but F32\[4\] needs 16"):
        open_source(file)


def test_writer_streams_a_layout_that_safe_open_reads(tmp_path):
    specs = [TensorSpec(n, tuple(t.shape), {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
                                             torch.float16: "F16"}[t.dtype]) for n, t in TENSORS.items()]
    shards = layout_shards(specs, max_shard_size=40)
    assert len(shards) > 1 and all(s.file.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    with SafetensorsWriter(tmp_path, shards) as writer:
        for name, tensor in TENSORS.items():
            writer.write(name, tensor)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TENSORS)
    for name, tensor in TENSORS.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), tensor)


def test_single_shard_is_model_safetensors(tmp_path):
    shards = layout_shards([TensorSpec("w", (2,), "F32")], 1 << 30)
    assert [s.file for s in shards] == ["model.safetensors"]


def test_writer_refuses_out_of_order_and_early_close(tmp_path):
    shards = layout_shards([TensorSpec("a", (2,), "F32"), TensorSpec("b", (2,), "F32")], 1 << 30)
    writer = SafetensorsWriter(tmp_path, shards)
    with pytest.raises(OutputError, match="'b' arrived out of order; the layout expects 'a'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(OutputError, match=r"'a' is \(3,\)"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(OutputError, match="closed before tensor 'b'"):
        writer.close()
