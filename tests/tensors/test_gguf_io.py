import gguf
import numpy as np
import pytest
import torch

from vlmkit.errors import CheckpointError, OutputError
from vlmkit.tensors import open_source
from vlmkit.tensors.gguf_io import GGUFStreamWriter, GGUFTensorSpec

T = gguf.GGMLQuantizationType


def _write(path, tensors: dict[str, tuple[torch.Tensor, T]]):
    specs = [GGUFTensorSpec(n, tuple(t.shape), ty) for n, (t, ty) in tensors.items()]
    writer = GGUFStreamWriter(path, "llama", specs)
    writer.kv.add_name("tiny")
    writer.kv.add_context_length(128)
    writer.begin()
    for name, (tensor, _) in tensors.items():
        writer.write(name, tensor)
    return writer.close()


def test_stream_writer_roundtrip_against_gguf_reader(tmp_path):
    w = torch.randn(8, 64)
    tensors = {"f32": (w, T.F32), "f16": (w, T.F16), "bf16": (w, T.BF16), "q8": (w, T.Q8_0),
               "vec": (torch.randn(5), T.F32)}
    path = tmp_path / "m.gguf"
    hashes = _write(path, tensors)
    assert list(hashes) == ["m.gguf"]

    reader = gguf.GGUFReader(path)  # the library's reader, independent of vlmkit's
    by_name = {t.name: t for t in reader.tensors}
    assert by_name["f32"].tensor_type == T.F32 and list(by_name["f32"].shape) == [64, 8]
    assert by_name["q8"].tensor_type == T.Q8_0
    assert reader.fields["general.name"].contents() == "tiny"
    ref_q8 = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), T.Q8_0), T.Q8_0)

    source = open_source(path)
    assert source.info("f32").shape == (8, 64) and source.info("q8").dtype == "Q8_0"
    assert torch.equal(source.read("f32"), w)
    assert torch.equal(source.read("f16"), w.half())
    assert torch.equal(source.read("bf16"), w.bfloat16())
    assert torch.equal(source.read("q8"), torch.from_numpy(ref_q8))
    assert (source.read("q8") - w).abs().max() < 0.05
    assert source.fields["llama.context_length"] == 128


def test_stream_writer_refuses_out_of_order(tmp_path):
    specs = [GGUFTensorSpec("a", (2, 32), T.F32), GGUFTensorSpec("b", (2, 32), T.F32)]
    writer = GGUFStreamWriter(tmp_path / "m.gguf", "llama", specs)
    writer.begin()
    with pytest.raises(OutputError, match="'b' arrived out of order"):
        writer.write("b", torch.zeros(2, 32))


def test_corrupted_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(CheckpointError, match="bad.gguf: not a readable GGUF file"):
        open_source(path)
