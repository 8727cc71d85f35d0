"""`vlmkit data` at scale: what `data convert` imports, tokenize / check on a process pool and on Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
