"""One dtype vocabulary: which dtypes a model is published and run in is said once, in vlmkit.dtypes."""

from __future__ import annotations

import ast
from pathlib import Path

from vlmkit import dtypes
from vlmkit.options import LoadOptions
from vlmkit.serve.engines import vllm

SRC = Path(dtypes.__file__).resolve().parent


def test_no_module_lists_the_model_dtypes_itself():
    # a tuple / set / list of exactly the codes config.json and vLLM name: the copy that drifts from vlmkit.dtypes
    owner = Path(dtypes.__file__).resolve()
    copies = []
    for file in SRC.rglob("*.py"):
        if file.resolve() == owner:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.Tuple, ast.Set, ast.List)) and len(node.elts) == 3 and {
                    getattr(e, "value", None) for e in node.elts} == {"F32", "F16", "BF16"}:
                copies.append(f"{file.relative_to(SRC)}:{node.lineno}")
    assert not copies, f"use vlmkit.dtypes.MODEL_CODES / model_name: {copies}"


def test_vllm_and_config_json_name_the_same_dtypes():
    # vLLM's --dtype values (float32, float16, bfloat16; anything else: auto) and transformers' torch_dtype
    assert vllm.dtype(LoadOptions(dtype="half"), {}) == "float16"
    assert vllm.dtype(LoadOptions(), {"torch_dtype": "bfloat16"}) == "bfloat16"
    assert vllm.dtype(LoadOptions(), {"torch_dtype": "float64"}) == "auto"
    assert dtypes.config_name("F64") == "float32" and dtypes.config_name("BF16") == "bfloat16"
