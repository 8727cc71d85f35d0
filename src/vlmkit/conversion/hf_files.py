"""The files beside the tensors of a transformers folder: ``config.json``, ``generation_config.json`` and the
processor's, as the published repositories have them. The families' ``hf_output.write`` share it."""

from __future__ import annotations

import json
from pathlib import Path

from .. import dtypes


def write_hf_files(folder: Path, config: dict, architecture: str, stored_dtype: str, processor,
                   generation_config: dict | None = None) -> None:
    """``config`` (a transformers config's ``to_dict()``) naming ``architecture`` and the dtype the tensors were
    stored in, ``generation_config`` when given, and ``processor``'s files."""
    config = {**config, "architectures": [architecture], "torch_dtype": dtypes.config_name(stored_dtype)}
    config.pop("dtype", None)  # transformers 5's name for it; 4.x and vLLM read torch_dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    processor.save_pretrained(folder)
    # transformers 5 nests the image processor in processor_config.json; 4.x and vLLM read preprocessor_config.json
    processor.image_processor.save_pretrained(folder)
