"""What the data commands need from an original LLaVA checkpoint, read without loading any weights:
its slow tokenizer, conversation template, training length and the features each image becomes
(``data.model.DataModel``)."""

from __future__ import annotations

from collections.abc import Callable

from ...data.encoders import OriginalEncoder
from ...data.model import DataModel, _length, _read
from ...options import LoadOptions


def data_model(found, options: LoadOptions, *, max_length: int | None) -> DataModel:
    """The data commands' view of an original checkpoint of any form (``found.path``)."""
    from .checkpoint import open_original
    from .hf_output import template_for

    folder = found.path
    ckpt = open_original(folder, options)
    encoder = OriginalEncoder.from_folder(ckpt.tokenizer_folder)
    length, source = _length(max_length, ckpt.config, _read(ckpt.tokenizer_folder / "tokenizer_config.json"))
    vision = ckpt.vision_config
    side = vision["image_size"] // vision["patch_size"]
    per_crop = side * side + (1 if ckpt.config.get("mm_vision_select_feature", "patch") == "cls_patch" else 0)
    from ...runtime.templates import get_template

    template = get_template(template_for(ckpt, options)).name
    model = DataModel(folder, "original", template, encoder, length, source, per_crop)
    if ckpt.is_next:
        model.fixed_image_tokens = None
        model.sized_image_tokens = _anyres_counter(ckpt.config, side, vision["image_size"])
    return model


def _anyres_counter(config: dict, side: int, tower_size: int) -> Callable[[tuple[int, int]], int]:
    """Features of one image in the original LLaVA-NeXT: base image, then the crop grid (see ``reference.py``)."""
    import torch

    from ...runtime.images import anyres_grid_shape, unpad_features

    merge = config.get("mm_patch_merge_type", "flat")
    pinpoints = config.get("image_grid_pinpoints")

    def count(size_wh: tuple[int, int]) -> int:
        across, down = anyres_grid_shape(size_wh, pinpoints, tower_size)
        if merge == "flat":
            return (1 + across * down) * side * side
        if "unpad" not in merge:
            return side * side + across * down * side * side
        rows, cols = unpad_features(torch.empty(0, down * side, across * side), size_wh).shape[1:]
        return side * side + rows * (cols + 1)  # an image_newline closes every row

    return count
