"""LLaVA-NeXT's ``anyres_max_N`` with a SigLIP tower: the pinpoints and the pixels.

Written from ``llava/mm_utils.py`` (``process_anyres_image``, ``get_anyres_image_grid_shape``) and
``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``, the ``anyres_max`` +
``unpad`` branch). The steps shared with LLaVA-1.6's anyres (``select_best_resolution`` in
(width, height), ``resize_and_pad_image`` on black, row-major crops, ``unpad_image`` with
truncation) are ``runtime.images``'; what is new here:

* pinpoints may be the range form ``"(1x1),...,(6x6)"`` (every (i, j) of the rectangle times the
  tower's size, read as (width, height));
* SigLIP's processor: every tile (the squashed base image and each crop) resized to exactly
  ``size`` x ``size`` (no aspect ratio, no crop), rescaled, normalised with 0.5/0.5;
* the model side (the unpadded grid shrunk when it holds more than ~N tiles' worth of features,
  then ``image_newline`` per row after the base image's features) is ``image_path.image_features``,
  which the reference and training share.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass

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



@dataclass(frozen=True)
class ImageConfig:
    """The preprocessing of an ``anyres_max_N`` checkpoint with a SigLIP tower, as data.

    It drives ``runtime.images.preprocess`` (through :meth:`per_image`) as the CLIP ``ImageConfig`` does.

    Attributes:
        size: the tower's image size: every tile's side (and the crop side).
        mean, std, rescale: SigLIP's normalisation.
        grid_pinpoints: the canvases as (width, height), expanded from the range form.
        max_num_patches: N.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float
    grid_pinpoints: tuple[tuple[int, int], ...]
    max_num_patches: int
    aspect: str = "anyres_max"

    @classmethod
    def from_original(cls, llava_config: dict, preprocessor: dict, tower_size: int) -> ImageConfig:
        """From the original ``config.json`` and the tower's preprocessor (SigLIP's: ``size`` height x width)."""
        size = preprocessor.get("size", {}).get("height", tower_size)
        if size != tower_size:
            raise ConfigError(f"SigLIP preprocessor size {size} but the tower takes {tower_size}-pixel images",
                              hint="the original resizes every tile to the tower's size")
        ratio = llava_config.get("image_aspect_ratio")
        return cls(size=size, mean=tuple(preprocessor["image_mean"]), std=tuple(preprocessor["image_std"]),
                   rescale=preprocessor.get("rescale_factor", 1 / 255),
                   grid_pinpoints=pinpoints(llava_config["image_grid_pinpoints"], tower_size),
                   max_num_patches=max_patches(ratio))

    def per_image(self, img: Image.Image) -> np.ndarray:
        return process(img, self.grid_pinpoints, size=self.size, mean=self.mean, std=self.std, rescale=self.rescale)

    def frames(self, frames: Sequence[Image.Image]) -> np.ndarray:
        """A video's frames as the original feeds them (``image_processor.preprocess(frames)``: no anyres, each
        frame squashed to ``size`` x ``size``): ``[F, 3, size, size]``."""
        return np.stack([siglip_preprocess(f, size=self.size, mean=self.mean, std=self.std, rescale=self.rescale)
                         for f in frames])
