import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vlmkit
from vlmkit.errors import ConfigError

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


# ------------------------------------------------------------------ one error path for every command

PHOTO = Path(__file__).parent / "fixtures" / "images" / "chelsea.png"


def _one_line_error(r, *names):
    """A VlmkitError as the README promises: exit 1, 'error: ...' naming the thing, a hint, no traceback."""
    assert r.code == 1, (r.code, r.err)
    assert r.err.startswith("error: ") and "\nhint: " in r.err and "Traceback" not in r.err, r.err
    for name in names:
        assert name in r.err, (name, r.err)


def _truncated_copy(folder, tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(folder, copy)
    weights = next(copy.glob("*.safetensors"))
    with open(weights, "r+b") as f:  # an interrupted download: the file stops part-way through the data
        f.truncate(weights.stat().st_size // 3)
    return copy, weights


def test_chat_bad_images_are_one_line_errors(models, tmp_path):
    _one_line_error(run_cli("chat", models["v15-hf"], "--image", tmp_path / "missing.png", "--prompt", "hi"),
                    "missing.png", "no such file")
    _one_line_error(run_cli("chat", models["v15-hf"], "--image", tmp_path, "--prompt", "hi"), str(tmp_path))


def test_truncated_model_folder_is_one_line_error_in_every_command(models, tmp_path):
    folder, weights = _truncated_copy(models["v15-hf"], tmp_path)
    for args in (("inspect", folder), ("chat", folder, "--prompt", "hi"), ("verify", models["v15"], folder)):
        _one_line_error(run_cli(*args), weights.name, "truncated")
    (folder / "config.json").write_text('{"architectures": ["LlavaForConditio')  # cut JSON
    _one_line_error(run_cli("chat", folder, "--prompt", "hi"), "config.json")


def test_devices_this_machine_lacks_and_nonsense_devices(models):
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    _one_line_error(run_cli("chat", models["v15-hf"], "--device", missing, "--prompt", "hi"), f"--device {missing}")
    _one_line_error(run_cli("chat", models["v15-hf"], "--device", "nonsense", "--prompt", "hi"), "'nonsense'")
    with pytest.raises(ConfigError, match="nonsense"):
        vlmkit.load(models["v15-hf"], device="nonsense")


def test_verify_gguf_without_llama_cpp_names_the_extra(models, tmp_path, monkeypatch):
    gguf_folder = tmp_path / "gguf"
    assert run_cli("convert", models["v15"], gguf_folder, "--to", "gguf", "--quiet").code == 0
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` meets where it is not installed
    _one_line_error(run_cli("verify", models["v15"], gguf_folder), "llama", "vlmkit[gguf]")


def test_train_refuses_loading_flags_it_has_no_use_for(tmp_path):
    base = ("train", tmp_path / "model", "--data", tmp_path / "d.json", "--output", tmp_path / "run")
    for flag, value in (("--dtype", "float16"), ("--device", "cpu"), ("--config", tmp_path / "c.json")):
        _one_line_error(run_cli(*base, flag, value), flag, "does not apply to vlmkit train")
    assert not (tmp_path / "run").exists()


def _offered(*command: str) -> set[str]:
    """The options ``vlmkit COMMAND --help`` lists (``("data", "tokenize")`` for a sub-command's): the flag that
    starts each option line (other help texts may name a flag, e.g. merge-lora's --base names LLaVA's --model-base)."""
    import argparse

    from vlmkit.cli import build_parser

    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return set(re.findall(r"^\s+(--[\w-]+)", parser.format_help(), re.M))


def test_train_help_does_not_offer_the_loading_flags_it_refuses():
    offered = _offered("train")
    assert not {"--dtype", "--device", "--config"} & offered, offered
    assert {"--vision-tower", "--model-base", "--template", "--seed"} <= offered


@pytest.mark.parametrize("command, refused", [
    (("convert", "{src}", "{out}"), ("--device",)),
    (("merge-lora", "{src}", "--base", "{src}", "{out}"), ("--device", "--model-base")),
    (("data", "tokenize", "{src}", "--model", "{src}", "--out", "{out}"), ("--device", "--dtype")),
    (("data", "check", "{src}", "--model", "{src}"), ("--device", "--dtype")),
    (("verify", "{src}", "{out}"), ("--device", "--dtype")),
])
def test_commands_that_place_no_model_on_a_device_refuse_device_and_do_not_offer_it(tmp_path, command, refused):
    # the flag is refused before anything is read, so no model is needed (the paths do not exist)
    args = [a.format(src=tmp_path / "in", out=tmp_path / "out") for a in command]
    name = command[:2] if command[0] == "data" else command[:1]
    values = {"--device": ("cuda", "meta"), "--dtype": ("float16",), "--model-base": (tmp_path / "in",)}
    for flag in refused:
        for value in values[flag]:
            _one_line_error(run_cli(*args, flag, value), f"{flag} does not apply to vlmkit {' '.join(name)}")
    assert not (tmp_path / "out").exists()
    offered = _offered(*name)
    assert not set(refused) & offered and "--vision-tower" in offered, offered


# ------------------------------------------------------------------ one set of range checks

@pytest.mark.parametrize("args, flag", [
    (("chat", "m", "--max-new-tokens", "-1"), "--max-new-tokens"),
    (("chat", "m", "--temperature", "-5"), "--temperature"),
    (("chat", "m", "--top-p", "7"), "--top-p"),
    (("chat", "m", "--top-p", "0"), "--top-p"),
    (("convert", "a", "b", "--max-shard-size", "0"), "--max-shard-size"),
    (("verify", "a", "b", "--max-new-tokens", "0"), "--max-new-tokens"),
])
def test_cli_refuses_out_of_range_numbers(args, flag):
    proc = run_cli_process(*args)
    assert proc.returncode == 2 and f"argument {flag}: " in proc.stderr and "out of range" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_api_and_server_share_the_cli_ranges(tmp_path):
    from pydantic import ValidationError

    from vlmkit.runtime.generation import SamplingParams
    from vlmkit.serve.protocol import ChatCompletionRequest

    for bad in ({"max_new_tokens": -1}, {"temperature": -5}, {"top_p": 7}, {"top_p": 0}, {"temperature": 2.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingParams(**bad)
        wire = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in bad.items()}
        with pytest.raises(ValidationError):
            ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **wire)
    assert SamplingParams(max_new_tokens=1, temperature=2, top_p=1).temperature == 2
    save_file({"w": torch.zeros(3, 4)}, tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="max_shard_size"):
        vlmkit.convert(tmp_path / "m.safetensors", tmp_path / "out", max_shard_size=0)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ one dtype vocabulary

SPELLINGS = ["float16", "fp16", "f16", "half", "torch.float16", torch.float16]


@pytest.mark.parametrize("spelling", SPELLINGS, ids=str)
def test_convert_accepts_every_spelling_of_a_dtype(tmp_path, spelling):
    save_file({"w": torch.ones(3, 4)}, tmp_path / "m.safetensors")
    vlmkit.convert(tmp_path / "m.safetensors", tmp_path / "out", dtype=spelling)
    report = vlmkit.inspect(tmp_path / "out")
    assert [t["dtype"] for t in report["tensors"]] == ["F16"]
    if isinstance(spelling, str):
        assert run_cli("convert", tmp_path / "m.safetensors", tmp_path / "cli", "--dtype", spelling, "--quiet").code == 0
        assert [t["dtype"] for t in vlmkit.inspect(tmp_path / "cli")["tensors"]] == ["F16"]


def test_load_accepts_the_same_spellings_as_convert(models):
    for spelling in ("float16", "half", "torch.float16", torch.float16):
        model = vlmkit.load(models["v15-hf"], dtype=spelling)
        assert model.backend.model.dtype == torch.float16, spelling
    with pytest.raises(ConfigError, match="'float17'"):
        vlmkit.load(models["v15-hf"], dtype="float17")
    with pytest.raises(ConfigError, match="'float17'"):
        vlmkit.convert(models["v15-hf"], "unused", dtype="float17")


# ------------------------------------------------------------------ killed conversions leave nothing behind

def _slow_conversion(tmp_path):
    """A conversion that takes a while (many shards, a cast) as a separate process, and its destination."""
    src = tmp_path / "big.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(1024, 1024) for i in range(64)}, src)  # 256 MB of float32
    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "convert", src, dst, "--dtype", "float16",
                             "--max-shard-size", "2MB", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, dst


def _temporaries(dst):
    return sorted(dst.parent.glob(f".{dst.name}.vlmkit-tmp-*"))


def _wait_until_writing(proc, dst):
    """Wait until the conversion has written its first shard into its temporary folder."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(any(t.glob("*.safetensors")) for t in _temporaries(dst)):
            return
        time.sleep(0.01)
    raise AssertionError(f"the conversion never wrote a shard (exit {proc.poll()})")


def test_sigterm_removes_the_temporary_folder(tmp_path):
    proc, dst = _slow_conversion(tmp_path)
    _wait_until_writing(proc, dst)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted: nothing was written" in err, err
    assert _temporaries(dst) == [] and not dst.exists()


def test_next_run_removes_the_temporary_a_killed_run_left(tmp_path):
    proc, dst = _slow_conversion(tmp_path)
    _wait_until_writing(proc, dst)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate(timeout=60)
    stale = _temporaries(dst)
    assert len(stale) == 1
    r = run_cli("convert", tmp_path / "big.safetensors", dst, "--dtype", "float16", "--quiet")
    assert r.code == 0, r.err
    assert _temporaries(dst) == [] and stale[0].name in r.err
    assert run_cli("verify-files", dst).code == 0


# ------------------------------------------------------------------ start-up imports only what the command runs

HEAVY = ("torch", "transformers", "peft")


def _heavy_modules_after(*argv_lists):
    script = ("import sys\nfrom vlmkit.cli import main\n"
              f"for argv in {[list(map(str, a)) for a in argv_lists]!r}:\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def test_help_and_version_import_no_heavy_library():
    assert _heavy_modules_after(["--help"], ["--version"], ["chat", "--help"], ["train", "--help"],
                                ["data", "--help"], ["convert", "--help"]) == ""


def test_inspect_of_a_safetensors_file_imports_no_heavy_library(tmp_path):
    save_file({"w": torch.zeros(3, 4, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    assert _heavy_modules_after(["inspect", tmp_path / "m.safetensors"]) == ""


# Commands run one after the other in one interpreter, each as `python -m vlmkit.cli ARGS` runs it (vlmkit.cli as
# __main__, which the default warning filters single out); prints the exit codes. Python prints a warning the
# first time it is raised from a place, so what they print together is what each prints in a process of its own.
_AS_MAIN = """
import runpy, sys
codes = []
for argv in {argv!r}:
    sys.argv = ["vlmkit", *argv]
    try:
        runpy.run_module("vlmkit.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        codes.append(e.code)
print("\\nexit codes:", codes)
"""


def test_chat_and_verify_print_no_deprecation_warnings(models):
    commands = [["chat", models["v15-hf"], "--image", PHOTO, "--prompt", "hi", "--max-new-tokens", "3"],
                ["chat", models["v15"], "--vision-tower", models["clip"], "--image", PHOTO, "--prompt", "hi",
                 "--max-new-tokens", "3"],
                ["verify", models["v15"], models["v15-hf"], "--max-new-tokens", "3"]]
    argv = [list(map(str, c)) for c in commands]
    proc = subprocess.run([sys.executable, "-c", _AS_MAIN.format(argv=argv)], capture_output=True, text=True)
    assert proc.returncode == 0 and "\nexit codes: [0, 0, 0]" in proc.stdout, proc.stdout + proc.stderr
    assert "deprecated" not in proc.stderr.lower() and "Warning" not in proc.stderr, proc.stderr


def test_gguf_of_a_family_without_gguf_says_what_it_is_and_what_vlmkit_can_do(tmp_path):
    """One refusal shape (the registry's): the path, the family and form, what vlmkit can do with it instead."""
    from vlmkit.families.flava import tiny as flava_tiny

    flava = flava_tiny.make_flava(tmp_path / "flava-tiny")
    _one_line_error(run_cli("convert", flava, tmp_path / "out", "--to", "gguf"), str(flava),
                    "a flava checkpoint (original form)", "cannot convert it to GGUF (--to gguf)",
                    "it can describe it (vlmkit inspect); convert it to transformers (--to hf)")
    assert not (tmp_path / "out").exists()
