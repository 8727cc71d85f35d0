"""LLaVA-NeXT's ``anyres_max_N`` with a SigLIP tower: pixels and the feature arrangement.

Written from ``llava/mm_utils.py`` (``process_anyres_image``, ``get_anyres_image_grid_shape``) and
``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``, the ``anyres_max`` +
``unpad`` branch). The steps shared with LLaVA-1.6's anyres (``select_best_resolution`` in
(width, height), ``resize_and_pad_image`` on black, row-major crops, ``unpad_image`` with
truncation) are ``runtime.images``'; what is new here:

* pinpoints may be the range form ``"(1x1),...,(6x6)"`` (every (i, j) of the rectangle times the
  tower's size, read as (width, height));
* SigLIP's processor: every tile (the squashed base image and each crop) resized to exactly
  ``size`` x ``size`` (no aspect ratio, no crop), rescaled, normalised with 0.5/0.5;
* the unpadded grid is bilinearly shrunk when it holds more than ~N tiles' worth of features
  (``times = sqrt(h*w / (N*27^2)) > 1.1``), then ``image_newline`` ends every row, and the base
  image's features (no newline) come first.

(To move into ``image_path.py`` once that module is on main, so the reference and training share it.)
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ...errors import ConfigError
from ...runtime import images

BICUBIC = Image.Resampling.BICUBIC
# mm_utils.py asserts the tower size before expanding the range form
RANGE_FORM_SIZES = (224, 336, 384, 448, 512)


def max_patches(image_aspect_ratio: str) -> int | None:
    """N of ``anyres_max_N`` (the original's ``re.match``), or None for another aspect."""
    match = re.match(r"anyres_max_(\d+)", image_aspect_ratio or "")
    return int(match.group(1)) if match else None


def pinpoints(value: str | Sequence[Sequence[int]], tower_size: int) -> tuple[tuple[int, int], ...]:
    """The canvases as (width, height): a list, its string form, or the range form ``"(AxB),...,(CxD)"``.

    Raises:
        ConfigError: a range form with a tower size the original refuses, or no pairs at all.
    """
    if isinstance(value, str) and "x" in value:
        found = re.findall(r"\((\d+)x(\d+)\)", value)
        if not found:
            raise ConfigError(f"config.json: image_grid_pinpoints={value!r} has no '(AxB)' pair",
                              hint='write it as "(1x1),...,(6x6)" or as a list of [width, height] pairs')
        if tower_size not in RANGE_FORM_SIZES:
            raise ConfigError(f"config.json: image_grid_pinpoints={value!r} (range form) with a {tower_size}-pixel "
                              f"tower: the original accepts the range form only for {list(RANGE_FORM_SIZES)}",
                              hint="write the pinpoints as a list of [width, height] pairs")
        (a, b), (c, d) = (tuple(map(int, p)) for p in (found[0], found[-1]))
        return tuple((i * tower_size, j * tower_size) for i in range(a, c + 1) for j in range(b, d + 1))
    value = ast.literal_eval(value) if isinstance(value, str) else value
    return tuple((int(w), int(h)) for w, h in value)


def siglip_preprocess(img: Image.Image, *, size: int, mean: Sequence[float], std: Sequence[float],
                      rescale: float = 1 / 255) -> np.ndarray:
    """LLaVA-NeXT's ``SigLipImageProcessor.preprocess`` of one image: float32 ``[3, size, size]``."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    x = np.asarray(img.resize((size, size), BICUBIC))  # squashed to the square, as the original
    x = (x.astype(np.float64) * rescale).astype(np.float32)  # transformers' rescale: float64 product, float32
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def process(img: Image.Image, canvases: Sequence[tuple[int, int]], *, size: int, mean: Sequence[float],
            std: Sequence[float], rescale: float = 1 / 255) -> np.ndarray:
    """``process_anyres_image`` with SigLIP's processor: ``[1 + n_crops, 3, size, size]``, base image first.

    Args:
        img: the image.
        canvases: :func:`pinpoints`' (width, height) pairs.
        size: the processor's size (the crop side and the base image's side).
    """
    canvas = images.resize_and_pad_image(img, images.select_best_resolution(img.size, canvases))
    base = img.resize((size, size), BICUBIC)  # squashed, not padded (the original keeps this known quirk)
    tiles = [base, *images.divide_to_patches(canvas, size)]
    return np.stack([siglip_preprocess(t, size=size, mean=mean, std=std, rescale=rescale) for t in tiles])


def arrange(features, size_wh: tuple[int, int], canvases: Sequence[tuple[int, int]], *, tower_size: int,
            image_newline, max_num_patches: int):
    """One image's ``[1 + n, T, C]`` projected features -> its ``[T', C]`` sequence (``spatial_unpad``).

    Args:
        features: base image first, then the crops in row-major order; ``T`` = side².
        size_wh: the image's (width, height).
        canvases: the pinpoints as (width, height).
        tower_size: the tower's ``image_size`` (the grid shape divides the canvas by it).
        image_newline: ``model.image_newline`` [C].
        max_num_patches: N of ``anyres_max_N``.
    """
    import torch
    import torch.nn.functional as F

    if features.shape[0] == 1:  # one tile: its features and one newline
        return torch.cat([features[0], image_newline[None]], 0)
    base, grid = features[0], features[1:]
    side = math.isqrt(base.shape[0])
    width, height = images.select_best_resolution(size_wh, canvases)
    cols, rows = width // tower_size, height // tower_size
    grid = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    grid = images.unpad_features(grid, size_wh)
    _, h, w = grid.shape
    times = math.sqrt(h * w / (max_num_patches * side ** 2))
    if times > 1.1:  # float floor division then int(), bilinear without align_corners, as the original
        grid = F.interpolate(grid[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
    grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat([base, grid], 0)
