"""`vlmkit data` at scale: what `data convert` imports, tokenize / check on a process pool and on Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA

SRC = Path(__file__).resolve().parents[2] / "src"

# `vlmkit data convert`'s own function, in a fresh interpreter (not through vlmkit.cli, whose laziness is its own
# concern): the modules it leaves loaded are the ones a CSV -> JSONL conversion paid for.
_CONVERT_AND_LIST_MODULES = """
import argparse, json, sys
from vlmkit.data import cli
p = argparse.ArgumentParser()
cli._convert_arguments(p)
code = cli.cmd_convert(p.parse_args(sys.argv[1:]))
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_data_convert_imports_no_torch_transformers_or_pil(tmp_path):
    out = tmp_path / "wukong.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CONVERT_AND_LIST_MODULES, str(DATA / "wukong_tiny.csv"), str(out),
                           "--image-column", "dir", "--text-column", "text", "--prompt", "为该图片生成标注。"],
                          capture_output=True, text=True, env=env, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and len(out.read_text(encoding="utf-8").splitlines()) == 4
    heavy = sorted({m.split(".")[0] for m in result["modules"]} & {"torch", "transformers", "PIL", "tokenizers",
                                                                  "numpy", "pandas"})
    assert heavy == []


def _mix665k_like(count: int) -> list[dict]:
    """Entries shaped as llava_v1_5_mix665k.json's: captioning and multi-turn VQA with an image, text-only
    ShareGPT conversations, and two the original cannot train (roles that do not alternate, <image> twice)."""
    kinds = [
        lambda i: {"id": f"coco-{i}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the cat doing?"},
            {"from": "gpt", "value": f"The cat {i} is lying on the floor."},
            {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "Orange with stripes."}]},
        lambda i: {"id": f"gqa-{i}", "image": f"gqa/images/{i}.jpg", "conversations": [
            {"from": "human", "value": "为该图片生成标注。\n<image>"}, {"from": "gpt", "value": "一杯咖啡，放在木桌上。" * (i % 5 + 1)}]},
        lambda i: {"id": f"sharegpt-{i}", "conversations": [
            {"from": "human", "value": f"Write a haiku about the number {i}."},
            {"from": "gpt", "value": "Silent numbers fall\nlike snow on a quiet field\ncounting every flake"}]},
        lambda i: {"id": f"bad-roles-{i}", "image": "x.jpg", "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "human", "value": "Again?"}]},
        lambda i: {"id": f"two-images-{i}", "image": "y.jpg", "conversations": [
            {"from": "human", "value": "<image>\nA"}, {"from": "gpt", "value": "B"},
            {"from": "human", "value": "<image>\nC"}, {"from": "gpt", "value": "D"}]},
    ]
    return [kinds[(i * 7) % len(kinds)](i) for i in range(count)]


def _write_jsonl(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return path


def test_tokenize_and_check_on_a_process_pool_match_one_process(tmp_path, tiny_models, vlmkit_data):
    from vlmkit.data.pool import CHUNK

    entries = _mix665k_like(3 * CHUNK + 17)  # four chunks: the pool runs
    records = _write_jsonl(tmp_path / "mix.jsonl", entries)
    refused = sum(e["id"].startswith(("bad-roles", "two-images")) for e in entries)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"tokens-{workers}.jsonl"
        result = vlmkit_data("tokenize", records, "--model", tiny_models["v15"], "--out", out, "--workers", workers)
        assert result.code == 3 and f"{len(entries) - refused} example(s), {refused} refused" in result.err, result.err
        outputs[workers] = out.read_bytes()
    assert outputs[1] == outputs[2]  # same lines, same order
    lines = [json.loads(line) for line in outputs[2].decode().splitlines()]
    assert [line["id"] for line in lines] == [e["id"] for e in entries]
    bad = next(k for k, e in enumerate(entries) if e["id"].startswith("bad-roles") and k > 2 * CHUNK)
    assert "roles must alternate" in lines[bad]["error"] and f"mix.jsonl:{bad + 1}" in lines[bad]["error"]

    reports = []
    for workers in (1, 2):
        report = vlmkit_data("check", records, "--model", tiny_models["v15"], "--json", "--workers", workers)
        assert report.code == 3, report.err
        reports.append({k: v for k, v in json.loads(report.out).items() if k != "seconds"})
    assert reports[0] == reports[1]
    # no --image-folder: the records with an image have a missing image, only the text-only ones are tokenised
    assert reports[0]["tokens"]["records"] == sum("image" not in e for e in entries)


# Ray's start and its actors' (each imports vlmkit and loads the tokenizer) take about a minute on two cores.
@pytest.mark.xdist_group("ray")  # one Ray at a time on a 2-core machine (tests/engines/test_ray.py)
@pytest.mark.slow
def test_tokenize_on_ray_is_byte_identical_to_one_process(tmp_path, tiny_models, vlmkit_data, local_ray):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    entries = _mix665k_like(300)
    shards = tmp_path / "shards"
    shards.mkdir()
    # two shards of several row groups, as a Parquet export of a Hugging Face dataset has them
    pq.write_table(pa.Table.from_pylist(entries[:180]), shards / "train-00000-of-00002.parquet", row_group_size=64)
    pq.write_table(pa.Table.from_pylist(entries[180:]), shards / "train-00001-of-00002.parquet", row_group_size=64)
    single = b""
    for shard in sorted(shards.iterdir()):
        out = tmp_path / f"{shard.stem}.jsonl"
        assert vlmkit_data("tokenize", shard, "--model", tiny_models["v15"], "--out", out, "--workers", 1).code == 3
        single += out.read_bytes()
    on_ray = tmp_path / "ray.jsonl"
    result = vlmkit_data("tokenize", shards, "--model", tiny_models["v15"], "--out", on_ray, "--ray", "--workers", 2)
    assert result.code == 3, result.err
    assert on_ray.read_bytes() == single
    # the second shard's rows are named by their own row numbers, as in a single run over that shard
    lines = [json.loads(line) for line in single.decode().splitlines()]
    assert any("train-00001-of-00002.parquet:#" in line.get("error", "") for line in lines)


def test_tokenize_on_ray_refuses_what_is_not_parquet(tmp_path, tiny_models, vlmkit_data):
    records = _write_jsonl(tmp_path / "mix.jsonl", _mix665k_like(3))
    result = vlmkit_data("tokenize", records, "--model", tiny_models["v15"], "--out", tmp_path / "t.jsonl", "--ray")
    assert result.code == 1 and "--ray reads a Parquet file or a folder of Parquet shards" in result.err
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize("args", [["tokenize", "--model", "m", "--out", "t.jsonl", "--ray-address", "auto"],
                                  ["download", "--out", "o", "--prompt", "p", "--ray-address", "auto"]])
def test_ray_address_without_ray_is_refused(tmp_path, vlmkit_data, args):
    data = _write_jsonl(tmp_path / "mix.jsonl", _mix665k_like(1))
    result = vlmkit_data(args[0], data, *args[1:])
    assert result.code == 1 and "--ray-address is for" in result.err
