import json

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from .conftest import run_cli, run_cli_process


def _sharded_bin(folder):
    folder.mkdir()
    torch.save({"model.embed_tokens.weight": torch.randn(16, 8)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"lm_head.weight": torch.randn(16, 8)}, folder / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin",
                            "lm_head.weight": "pytorch_model-00002-of-00002.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "vocab_size": 16}))


def _gguf(path):
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_inspect_safetensors_bin_and_gguf(tmp_path):
    save_file({"w": torch.zeros(3, 4, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    r = run_cli("inspect", tmp_path / "m.safetensors")
    assert r.code == 0 and "w" in r.out and "[3, 4]" in r.out and "BF16" in r.out and "12 parameters" in r.out

    _sharded_bin(tmp_path / "bin")
    report = json.loads(run_cli("inspect", tmp_path / "bin", "--json").out)
    assert report["format"] == "pytorch" and report["parameters"] == 256 and report["bytes"] == 1024
    assert report["config"]["model_type"] == "llama" and len(report["files"]) == 2

    _gguf(tmp_path / "m.gguf")
    report = json.loads(run_cli("inspect", tmp_path / "m.gguf", "--json").out)
    assert report["format"] == "gguf" and report["tensors"][0]["shape"] == [16, 8]
    assert report["config"]["general.architecture"] == "llama"


def test_dry_run_on_each_format_writes_nothing(tmp_path):
    save_file({"w": torch.zeros(3, 4)}, tmp_path / "m.safetensors")
    _sharded_bin(tmp_path / "bin")
    _gguf(tmp_path / "m.gguf")
    for src in (tmp_path / "m.safetensors", tmp_path / "bin", tmp_path / "m.gguf"):
        r = run_cli("convert", src, tmp_path / "out", "--dry-run", "--dtype", "float16")
        assert r.code == 0, r.err
        assert "dry run: nothing was written" in r.out and "F16" in r.out
        assert not (tmp_path / "out").exists()


def test_convert_bin_shards_to_safetensors(tmp_path):
    _sharded_bin(tmp_path / "bin")
    r = run_cli("convert", tmp_path / "bin", tmp_path / "out", "--quiet")
    assert r.code == 0, r.err
    out = json.loads(run_cli("inspect", tmp_path / "out", "--json").out)
    assert out["format"] == "safetensors" and out["parameters"] == 256
    assert run_cli("verify-files", tmp_path / "out").code == 0


def test_errors_are_one_sentence_without_traceback(tmp_path):
    r = run_cli("inspect", tmp_path / "nothing-here")
    assert r.code == 1 and r.err.startswith("error: ") and "no such file or folder" in r.err
    proc = run_cli_process("inspect", tmp_path / "nothing-here")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    proc = run_cli_process("--debug", "inspect", tmp_path / "nothing-here")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_hub_id_offline_names_the_id_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    proc = run_cli_process("inspect", "someone/not-downloaded-model", env={**__import__("os").environ})
    assert proc.returncode == 1
    assert "'someone/not-downloaded-model'" in proc.stderr and "*.safetensors" in proc.stderr
    assert "hint: download it where you have network" in proc.stderr
