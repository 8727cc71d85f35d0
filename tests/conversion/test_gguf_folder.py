"""A GGUF folder read without knowing the family: the file roles by llama.cpp's names, the (model, mmproj) pair."""

from __future__ import annotations

import pytest

from vlmkit.conversion import gguf_folder
from vlmkit.errors import ConfigError


def test_roles_follow_llama_cpps_file_names():
    # names as llama.cpp's convert_hf_to_gguf.py --mmproj and the ggml-org repositories write them
    assert gguf_folder.role("mmproj-model-f16.gguf") == "mmproj"
    assert gguf_folder.role("llava-v1.6-mistral-7b.Q4_K_M.gguf") == "model"
    assert gguf_folder.role("clip-vit-large-patch14-vision-f16.gguf") == "model"  # a CLIP GGUF is no projector


def test_pair_of_a_folder_and_its_refusal(tmp_path):
    for name in ("llava-f16.gguf", "mmproj-llava-f16.gguf", "README.md"):
        (tmp_path / name).write_bytes(b"")
    assert gguf_folder.is_gguf_folder(tmp_path) and not gguf_folder.is_gguf_folder(tmp_path / "README.md")
    assert gguf_folder.gguf_pair(tmp_path) == (tmp_path / "llava-f16.gguf", tmp_path / "mmproj-llava-f16.gguf")
    (tmp_path / "llava-q8_0.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"expected one language-model GGUF.*'llava-f16.gguf', 'llava-q8_0.gguf'"):
        gguf_folder.gguf_pair(tmp_path)


def _written_by_gguf_py(path, *, big_endian: bool = False):
    """A GGUF file written by gguf-py (llama.cpp's own writer) with a value of every kind, and one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    writer.add_uint8("t.u8", 200)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float32("t.f32", 0.5)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.25, -1.5])
    writer.add_array("t.strings", ["a", "", "ünï"])
    writer.add_tensor("w", np.zeros((2, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("big_endian", [False, True])
def test_header_reads_the_values_gguf_pys_reader_reads(tmp_path, big_endian):
    """vlmkit walks the key-value section itself (GGUFReader takes ~20 s on a 152k-token vocabulary): every kind of
    value, in either byte order, as gguf-py's own reader gives it; keys absent are left out."""
    import gguf

    path = _written_by_gguf_py(tmp_path / "m.gguf", big_endian=big_endian)
    fields = gguf.GGUFReader(path, "r").fields
    keys = [k for k in fields if k.startswith("t.")] + ["general.architecture"]
    assert len(keys) == 12
    got = gguf_folder.header(path, *keys, "no.such.key")
    assert got == {k: fields[k].contents() for k in keys}
    assert [type(v) for v in got.values()] == [type(fields[k].contents()) for k in keys]  # True is not 1
    assert list(got) == keys and gguf_folder.header(path, "t.str") == {"t.str": "héllo"}


def test_header_of_a_truncated_or_foreign_file_names_it(tmp_path):
    from vlmkit.errors import CheckpointError

    path = _written_by_gguf_py(tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: the GGUF header cannot be read"):
        gguf_folder.header(cut, "t.strings")
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(CheckpointError, match=r"other\.gguf: not a GGUF file"):
        gguf_folder.header(other, "t.u8")
