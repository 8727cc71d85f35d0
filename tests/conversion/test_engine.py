import json
import os
import resource
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmkit.conversion import (MANIFEST, Conversion, ResizeRows, drop, fuse, identity, rename, reverse, run, split,
                            transform, transpose, verify_files)
from vlmkit.errors import ManifestError, OutputError
from vlmkit.tensors import open_source

from ..conftest import run_cli_process


def _checkpoint(folder):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"l.{i}.{p}": torch.randn(4, 6) for i in range(2) for p in "qkv"}
    tensors.update({"emb": torch.randn(10, 6), "ab": torch.randn(3, 8), "inv_freq": torch.randn(3),
                    "pos_ids": torch.arange(5)})
    save_file(tensors, folder / "model.safetensors")
    return tensors


RULES = [
    drop("inv_freq", why="recomputed at load"),
    fuse(["l.{i}.q", "l.{i}.k", "l.{i}.v"], "blk.{i}.qkv", dim=0),
    transpose("emb", "emb_t"),
    split("ab", ["a", "b"], dim=1),
    rename("{rest:path}", "kept.{rest:path}"),
]


def _read_all(folder):
    source = open_source(folder)
    return {n: source.read(n) for n in source.keys()}


def test_conversion_applies_every_op(tmp_path):
    src = _checkpoint(tmp_path / "src")
    result = run(Conversion(open_source(tmp_path / "src"), RULES), tmp_path / "out", dtype="F16")
    out = _read_all(tmp_path / "out")
    assert torch.equal(out["blk.1.qkv"], torch.cat([src["l.1.q"], src["l.1.k"], src["l.1.v"]]).half())
    assert torch.equal(out["emb_t"], src["emb"].T.half())
    assert torch.equal(out["a"], src["ab"][:, :4].half()) and torch.equal(out["b"], src["ab"][:, 4:].half())
    assert torch.equal(out["kept.pos_ids"], src["pos_ids"])
    assert "inv_freq" not in out and "kept.inv_freq" not in out
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == result.files["model.safetensors"]
    assert manifest["plan"]["drops"] == [{"name": "inv_freq", "why": "recomputed at load"}]
    assert verify_files(tmp_path / "out")["checked"] == 2  # the shard and the model card


def test_round_trip_reproduces_identical_bytes(tmp_path):
    rules = [r for r in RULES if not r.is_drop] + [transform("x", "x_big", ResizeRows(3, 5))]
    folder = tmp_path / "src"
    folder.mkdir()
    original = {f"l.0.{p}": torch.randn(4, 6) for p in "qkv"}
    original.update({"emb": torch.randn(10, 6).bfloat16(), "ab": torch.randn(3, 8), "x": torch.randn(3, 2)})
    run(identity_of(original, folder), tmp_path / "a")  # a vlmkit-written source, so file order is ours
    run(Conversion(open_source(tmp_path / "a"), rules), tmp_path / "b")
    run(Conversion(open_source(tmp_path / "b"), reverse(rules)), tmp_path / "c")
    a, c = _read_all(tmp_path / "a"), _read_all(tmp_path / "c")
    assert a.keys() == c.keys()
    for name in a:
        assert a[name].dtype == c[name].dtype
        assert a[name].view(-1).view(torch.uint8).tolist() == c[name].view(-1).view(torch.uint8).tolist(), name


def identity_of(tensors, folder):
    save_file(tensors, folder / "model.safetensors")
    return identity(open_source(folder))


def test_sharding_follows_max_shard_size(tmp_path):
    _checkpoint(tmp_path / "src")
    run(identity(open_source(tmp_path / "src")), tmp_path / "out", max_shard_size=200)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / "out" / file, "pt") as f:
            assert name in f.keys()


def test_existing_destination_refused_then_replaced_with_force(tmp_path):
    _checkpoint(tmp_path / "src")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="already exists"):
        run(identity(open_source(tmp_path / "src")), dst)
    assert (dst / "precious.txt").read_text() == "keep me"
    run(identity(open_source(tmp_path / "src")), dst, force=True)
    assert not (dst / "precious.txt").exists() and (dst / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_destination_holding_the_source_is_refused(tmp_path):
    _checkpoint(tmp_path / "src")
    with pytest.raises(OutputError, match="contains the source"):
        run(identity(open_source(tmp_path / "src")), tmp_path / "src", force=True)
    with pytest.raises(OutputError, match="contains the source"):
        run(identity(open_source(tmp_path / "src")), tmp_path, force=True)
    assert (tmp_path / "src" / "model.safetensors").exists()


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failure_midway_leaves_nothing(tmp_path, error):
    _checkpoint(tmp_path / "src")
    source = open_source(tmp_path / "src")
    calls = {"n": 0}
    read = source.read

    def failing_read(name):
        calls["n"] += 1
        if calls["n"] == 4:
            raise error()
        return read(name)

    source.read = failing_read
    source.stored_at = lambda name: None  # every tensor read (none copied file to file)
    with pytest.raises(error):
        run(identity(source), tmp_path / "out", max_shard_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_disk_full_leaves_nothing_and_says_so(tmp_path):
    """A real write failure: the child process may not write files beyond 4 KB (RLIMIT_FSIZE)."""
    _checkpoint(tmp_path / "src")
    save_file({"big": torch.randn(64, 64)}, tmp_path / "src" / "model-big.safetensors")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = run_cli_process("convert", tmp_path / "src", tmp_path / "out", "--quiet", preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr
    assert "could not write" in proc.stderr and "nothing was left behind" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.skipif(sys.platform != "linux", reason="permission errors are simulated through os.open on Linux")
def test_permission_error_while_writing_leaves_nothing(tmp_path, monkeypatch):
    _checkpoint(tmp_path / "src")
    import builtins

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(OutputError, match="permission denied; nothing was left behind"):
        run(identity(open_source(tmp_path / "src")), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_verify_files_catches_tampering(tmp_path):
    _checkpoint(tmp_path / "src")
    run(identity(open_source(tmp_path / "src")), tmp_path / "out")
    shard = tmp_path / "out" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "out" / "extra.txt").write_text("?")
    with pytest.raises(ManifestError) as e:
        verify_files(tmp_path / "out")
    assert "model.safetensors: content changed" in str(e.value) and "extra.txt: not in the manifest" in str(e.value)


def test_source_is_never_written(tmp_path):
    _checkpoint(tmp_path / "src")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "src").iterdir()}
    run(Conversion(open_source(tmp_path / "src"), RULES), tmp_path / "out", dtype="BF16")
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "src").iterdir()}
    assert before == after


# ------------------------------------------------------------------------- the pipeline


def _many(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"t{i:02d}": torch.full((4, 4), float(i)) for i in range(n)}, folder / "model.safetensors")


def _wait_for(predicate, seconds=10.0):
    import time

    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_reader_runs_ahead_of_the_writer_by_a_bounded_number_of_steps(tmp_path):
    """While the writer holds one step, the reader fills the queue, then waits: never more in flight."""
    import time

    from vlmkit.conversion.engine import READ_AHEAD, _stream, plan_for

    _many(tmp_path / "src")
    source = open_source(tmp_path / "src")
    reads = []
    read = source.read
    source.read = lambda name: reads.append(name) or read(name)
    steps = _stream(plan_for(identity(source)), source)
    next(steps)  # the writer holds step 0 and writes nothing more
    # one held + READ_AHEAD queued + one read and waiting for room
    assert _wait_for(lambda: len(reads) == READ_AHEAD + 2), reads
    time.sleep(0.3)
    assert len(reads) == READ_AHEAD + 2, reads
    assert len(list(steps)) == 11 and len(reads) == 12


def test_writer_failure_stops_and_joins_the_reader(tmp_path, monkeypatch):
    import threading

    from vlmkit.tensors import safetensors_io

    _many(tmp_path / "src")
    written = {"n": 0}
    write = safetensors_io.SafetensorsWriter.write

    def failing_write(self, name, tensor):
        written["n"] += 1
        if written["n"] == 2:
            raise Boom()
        return write(self, name, tensor)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", failing_write)
    with pytest.raises(Boom):
        run(identity(open_source(tmp_path / "src")), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert not [t for t in threading.enumerate() if t.name == "vlmkit-reader"]


def test_reader_failure_is_raised_once_and_joins_the_reader(tmp_path):
    import threading

    _many(tmp_path / "src")
    source = open_source(tmp_path / "src")
    read = source.read

    def failing_read(name):
        if name == "t05":
            raise Boom("t05 unreadable")
        return read(name)

    source.read = failing_read
    source.stored_at = lambda name: None  # every tensor read (none copied file to file)
    with pytest.raises(Boom, match="t05 unreadable"):
        run(identity(source), tmp_path / "out", max_shard_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert not [t for t in threading.enumerate() if t.name == "vlmkit-reader"]


@pytest.mark.parametrize("pair", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                                  (torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_cast_matches_torch_including_in_place(pair):
    from vlmkit.conversion.engine import cast_tensors

    before, after = pair
    values = torch.cat([torch.randn(5_000_000) * 100, torch.tensor([0.0, -0.0, 1e-8, 7e4, -7e4, 1e6,
                                                                     float("inf"), float("-inf"), float("nan")])])
    t = values.to(before)
    expected = t.to(after)
    (got,) = cast_tensors([t.clone()], [after])
    assert got.dtype == after and got.shape == t.shape
    assert torch.equal(got.view(torch.uint8 if after != torch.float32 else torch.int32),
                       expected.view(torch.uint8 if after != torch.float32 else torch.int32))


def test_cast_never_rewrites_memory_another_output_shares():
    from vlmkit.conversion.engine import cast_tensors

    t = torch.randn(8, 4).to(torch.bfloat16)
    a, b = t.chunk(2)  # views of one buffer
    same = t.clone()
    got = cast_tensors([a, b, same, same], [torch.float16] * 4)
    assert torch.equal(got[0], t[:4].half()) and torch.equal(got[1], t[4:].half())
    assert torch.equal(got[2], t.half()) and torch.equal(got[3], t.half())
    assert torch.equal(a, t[:4]) and same.dtype == torch.bfloat16 and torch.equal(same, t)


def test_extras_failure_leaves_nothing(tmp_path):
    """The non-tensor files are written beside the tensors; their error still leaves nothing behind."""
    _many(tmp_path / "src")

    def failing_extras(folder):
        (folder / "config.json").write_text("{}")
        raise Boom("no tokenizer")

    conversion = identity(open_source(tmp_path / "src"))
    conversion.write_extras = failing_extras
    with pytest.raises(Boom, match="no tokenizer"):
        run(conversion, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
