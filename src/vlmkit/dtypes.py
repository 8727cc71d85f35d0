"""The one dtype vocabulary: every command, the Python API and every family spell dtypes through it.

Inside vlmkit a dtype is a safetensors code ("F32", "F16", "BF16", ...), the on-disk vocabulary
the formats share. Users may write any usual spelling: ``float16``, ``fp16``, ``f16``, ``half``,
``torch.float16`` or the ``torch.float16`` object itself all mean "F16". This module does not
import torch (``vlmkit --help`` and ``vlmkit inspect`` must start fast); ``torch_dtype`` imports
it when a tensor is really made.
"""

from __future__ import annotations

from .errors import ConfigError

# code -> (torch / transformers name, bytes per element)
CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# the spellings people use besides the codes and the torch names (lower case)
ALIASES: dict[str, str] = {
    "fp64": "F64", "f64": "F64", "double": "F64",
    "fp32": "F32", "f32": "F32", "float": "F32",
    "fp16": "F16", "f16": "F16", "half": "F16",
    "bf16": "BF16",
}
_BY_NAME = {name: code for code, (name, _) in CODES.items()} | ALIASES
# what to suggest when a spelling is unknown: the dtypes a model is loaded or written in
SUGGESTED = "float32, float16 or bfloat16 (also fp16, f16, half, bf16, torch.float16, F16 ...)"


def code(dtype, *, field: str = "dtype") -> str:
    """The safetensors code of any usual spelling of a dtype, or of a ``torch.dtype``.

    Raises:
        ConfigError: an unknown spelling, naming ``field`` (``--dtype``, ``dtype=``).
    """
    text = str(dtype).strip()  # str(torch.float16) is "torch.float16"
    key = text.removeprefix("torch.")
    if key.upper() in CODES:
        return key.upper()
    if key.lower() in _BY_NAME:
        return _BY_NAME[key.lower()]
    raise ConfigError(f"{field} {dtype!r} is not a dtype vlmkit knows", hint=f"use {SUGGESTED}")


def optional_code(dtype, *, field: str = "dtype") -> str | None:
    """``code(dtype)``, or None for None / "" (as stored)."""
    return None if dtype is None or dtype == "" else code(dtype, field=field)


def name(code_: str) -> str:
    """The torch / transformers name ("float16") of a code, as config.json's ``torch_dtype`` spells it."""
    return CODES[code_][0]


# the dtypes models are published and run in (config.json's torch_dtype, vLLM's --dtype)
MODEL_CODES = ("F32", "F16", "BF16")


def model_name(code_: str | None) -> str | None:
    """The name ("float16") of a code models are published and run in (:data:`MODEL_CODES`), else None."""
    return name(code_) if code_ in MODEL_CODES else None


def config_name(code_: str | None) -> str:
    """config.json's ``torch_dtype`` for weights stored as ``code_``: :func:`model_name`, else float32."""
    return model_name(code_) or "float32"


def element_size(code_: str) -> int:
    """Bytes per element of a code."""
    return CODES[code_][1]


def torch_dtype(code_: str | None, default: str = "F32"):
    """The ``torch.dtype`` of a code (``default`` for None). Imports torch."""
    import torch

    return getattr(torch, name(code_ or default))
