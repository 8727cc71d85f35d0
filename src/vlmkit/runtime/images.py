"""LLaVA image preprocessing exactly as the ORIGINAL code does it (haotian-liu/LLaVA ``mm_utils.py`` on top of
transformers 4.37 ``CLIPImageProcessor``), written on PIL + numpy.

This module is the reference for ``verify`` and the implementation the runtime uses; it never calls a
transformers processor. :func:`hf_image_processor` builds the transformers 5 processor that reproduces it, for
converted models. Sizes follow the original: ``image_size`` / ``original_size`` are PIL ``(width, height)``,
``grid_pinpoints`` are ``(width, height)`` pairs.

Example:
    >>> cfg = ImageConfig.from_original({"image_aspect_ratio": "pad"}, {"size": 336, "crop_size": 336})
    >>> pixel_values, sizes = preprocess([load_image("cat.png")], cfg)   # [1, 3, 336, 336], [(451, 300)]
"""

from __future__ import annotations

import ast
import io
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, ImageFile, UnidentifiedImageError

from vlmkit.errors import ConfigError, ImageError
from vlmkit.lazy import numpy as np

if TYPE_CHECKING:  # torch is imported by preprocess, not with this module (`vlmkit data check` needs no torch)
    import torch

__all__ = ["DEFAULT_MAX_PIXELS", "ImageConfig", "load_image", "expand2square", "clip_preprocess",
           "select_best_resolution", "resize_and_pad_image", "divide_to_patches", "process_anyres", "preprocess",
           "anyres_grid_shape", "unpad_features", "hf_image_processor"]

DEFAULT_MAX_PIXELS = 8192 * 8192  # 64 Mpx: above any camera photo, below PIL's own 89 Mpx warning
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN, CLIPImageProcessor's default
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = Image.Resampling.BICUBIC  # also what the original's bare `image.resize(size)` uses for RGB images

# image_aspect_ratio in the original config.json -> what process_images does. The original sends every value
# other than "pad"/"anyres" (and a missing key) to the plain CLIP branch; we name that branch "square" and
# refuse values this codebase does not know (e.g. LLaVA-NeXT-repo "anyres_max_9") instead of silently squaring.
_ASPECTS = {None: "square", "square": "square", "pad": "pad", "anyres": "anyres"}
# CLIPImageProcessor switches that must keep their default (True) for this pipeline to be the original's.
_MUST_BE_TRUE = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


# ---------------------------------------------------------------------------------------------- loading
def load_image(source: str | os.PathLike | bytes | Image.Image, *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image safely and return it decoded as RGB (the original does ``Image.open(f).convert("RGB")``).

    The size is checked from the header before any pixel is decoded; truncated files are refused, PNGs by a
    chunk-by-chunk check that does not depend on PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES``.

    Args:
        source: a path, the encoded bytes, or a PIL image.
        max_pixels: refuse images with more pixels than this (decompression bombs).

    Returns:
        The decoded RGB image. EXIF orientation is not applied (neither does the original).

    Raises:
        ImageError: missing or unreadable file, not an image, truncated or corrupt data, too many pixels.
    """
    if isinstance(source, Image.Image):
        _check_pixels("PIL image", source.size, max_pixels)
        _guard("PIL image", source.load)
        return source if source.mode == "RGB" else source.convert("RGB")
    name, reopen = _describe(source)
    try:
        with reopen() as fp:
            try:
                im = Image.open(fp)
            except Image.DecompressionBombError as e:
                raise ImageError(f"{name}: the header claims a huge image ({e})",
                                 hint=f"downscale it below {max_pixels:,} pixels") from e
            except UnidentifiedImageError:  # its message shows the file object's repr, an address
                fp.seek(0)
                raise ImageError(f"{name}: not an image that PIL can read (it begins with {fp.read(8)!r}), or its "
                                 "header is cut", hint="pass a PNG, JPEG, WebP, GIF or BMP file") from None
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"{name}: not an image that PIL can read, or its header is cut ({e})",
                                 hint="pass a PNG, JPEG, WebP, GIF or BMP file") from e
            _check_pixels(name, im.size, max_pixels)
            check = _INTEGRITY.get(im.format)
            if check is not None:
                with reopen() as fp2:
                    _guard(name, lambda: check(fp2))
            _guard(name, im.load)
            return im.convert("RGB")
    except OSError as e:
        raise file_error(name, e) from e


def file_error(name: str, e: OSError) -> ImageError:
    """The ``ImageError`` for an image file that cannot be opened (missing, a folder, no permission)."""
    if isinstance(e, FileNotFoundError):
        return ImageError(f"{name}: no such file", hint="check the path")
    return ImageError(f"{name}: cannot read the file ({e.strerror or e})", hint="pass a readable image file")


def _describe(source: Any) -> tuple[str, Callable[[], IO[bytes]]]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return "image bytes", lambda: io.BytesIO(data)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), lambda: open(source, "rb")
    raise TypeError(f"load_image takes a path, bytes or a PIL image, not {type(source).__name__}")


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h == 0:
        raise ImageError(f"{name}: image is {w}x{h}, it has no pixels", hint="pass a non-empty image")
    if w * h > max_pixels:
        raise ImageError(f"{name}: image is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}",
                         hint="downscale the image, or raise max_pixels if you trust its source")


def _guard(name: str, step: Callable[[], object]) -> None:
    try:
        step()
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise ImageError(f"{name}: image data is truncated or corrupt ({e})",
                         hint="re-download or re-export the image") from e


def _verify_png(fp: IO[bytes]) -> None:
    Image.open(fp).verify()  # reads every chunk to IEND and checks CRCs, whatever LOAD_TRUNCATED_IMAGES says


def _verify_jpeg(fp: IO[bytes]) -> None:
    # PIL refuses truncated JPEGs unless someone switched the global LOAD_TRUNCATED_IMAGES on; then (only
    # then, since some cameras append data after it) insist on the end-of-image marker.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        fp.seek(-2, io.SEEK_END)
        if fp.read(2) != b"\xff\xd9":
            raise OSError("JPEG data ends without its end-of-image marker")


_INTEGRITY: dict[str | None, Callable[[IO[bytes]], None]] = {"PNG": _verify_png, "JPEG": _verify_jpeg}


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ImageConfig:
    """Preprocessing of one LLaVA checkpoint, as data.

    Attributes:
        aspect: "pad" (v1.5: expand2square), "square" (plain CLIP: resize + center crop), "anyres" (v1.6).
        size: CLIP ``size.shortest_edge``; also the side of anyres's squashed base image.
        crop: CLIP ``crop_size`` as (height, width).
        mean, std: normalisation per channel; ``mean`` also gives expand2square's background colour.
        rescale: ``rescale_factor`` (1/255).
        grid_pinpoints: anyres canvases as (width, height), in the original's order (ties go to the first).
        patch: anyres crop side; the original always uses ``crop_size["height"]``.
    """

    aspect: str = "pad"
    size: int = 336
    crop: tuple[int, int] = (336, 336)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale: float = 1 / 255
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    patch: int = 336

    def __post_init__(self) -> None:
        problems = []
        if self.aspect not in _ASPECTS.values():
            problems.append(f"aspect={self.aspect!r} is not one of {sorted(set(_ASPECTS.values()))}")
        if self.size <= 0 or min(self.crop) <= 0 or max(self.crop) > self.size:
            # transformers 4.37 pads a crop larger than the resized image with an off-by-one; no CLIP tower does it
            problems.append(f"crop={self.crop} must be positive and fit inside size={self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean={self.mean} / std={self.std} need 3 values each, std > 0")
        if self.aspect == "anyres":
            if not self.grid_pinpoints:
                problems.append("aspect='anyres' needs grid_pinpoints")
            if self.patch != self.crop[0]:
                problems.append(f"patch={self.patch} must equal crop height {self.crop[0]} (the original uses it)")
            bad = [p for p in self.grid_pinpoints if min(p) <= 0 or p[0] % self.patch or p[1] % self.patch]
            if bad:  # the original's model code views the crops as a (h // patch, w // patch) grid and would fail
                problems.append(f"grid_pinpoints {bad} are not positive multiples of patch={self.patch}")
        if problems:
            raise ConfigError("image preprocessing config: " + "; ".join(problems),
                              hint="fix config.json / preprocessor_config.json, or override them with --config")

    def per_image(self, img: Image.Image) -> np.ndarray:
        """One image's pixels, [3, H, W] or [1 + n, 3, H, W] (any config with this method can drive ``preprocess``)."""
        return _PER_IMAGE[self.aspect](img, self)

    @classmethod
    def from_original(cls, llava_config: dict, clip_preprocessor: dict) -> ImageConfig:
        """Build the config from an original checkpoint's files.

        Args:
            llava_config: the original ``config.json`` (``image_aspect_ratio``, ``image_grid_pinpoints``).
            clip_preprocessor: the vision tower's ``preprocessor_config.json`` (CLIPImageProcessor fields; old
                files give ``size``/``crop_size`` as ints, which 4.37 reads as shortest edge / square crop).

        Raises:
            ConfigError: a field has a value the original pipeline does not handle, naming it.
        """
        ratio = llava_config.get("image_aspect_ratio")
        if ratio not in _ASPECTS:
            raise ConfigError(f"config.json: image_aspect_ratio={ratio!r} is not handled by the original LLaVA "
                              f"code (known: {[k for k in _ASPECTS if k]})",
                              hint="set image_aspect_ratio to 'square' if the plain CLIP branch is meant")
        p = clip_preprocessor
        for flag in _MUST_BE_TRUE:
            if p.get(flag, True) is not True:
                raise ConfigError(f"preprocessor_config.json: {flag}={p[flag]!r} is not supported",
                                  hint=f"the LLaVA pipeline needs {flag}=true")
        if p.get("resample", 3) != 3:
            raise ConfigError(f"preprocessor_config.json: resample={p['resample']!r}; only 3 (bicubic) is supported",
                              hint="LLaVA's anyres steps are bicubic whatever this says; set resample to 3")
        size = p.get("size", {"shortest_edge": 224})
        size = size.get("shortest_edge") if isinstance(size, dict) else size
        if not isinstance(size, int):
            raise ConfigError(f"preprocessor_config.json: size={p.get('size')!r} has no shortest_edge",
                              hint='give size as {"shortest_edge": N}')
        crop = p.get("crop_size", {"height": 224, "width": 224})
        crop = (crop, crop) if isinstance(crop, int) else (crop.get("height"), crop.get("width"))
        if not all(isinstance(c, int) for c in crop):
            raise ConfigError(f"preprocessor_config.json: crop_size={p['crop_size']!r} needs height and width",
                              hint='give crop_size as {"height": N, "width": N}')
        pinpoints = llava_config.get("image_grid_pinpoints") or ()
        return cls(aspect=_ASPECTS[ratio], size=size, crop=crop,
                   mean=tuple(p.get("image_mean", CLIP_MEAN)), std=tuple(p.get("image_std", CLIP_STD)),
                   rescale=p.get("rescale_factor", 1 / 255), grid_pinpoints=_pinpoints(pinpoints), patch=crop[0])


def _pinpoints(value: str | Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    # The original accepts a list or its string form (ast.literal_eval); both mean [(width, height), ...].
    value = ast.literal_eval(value) if isinstance(value, str) else value
    return tuple((int(w), int(h)) for w, h in value)


# ---------------------------------------------------------------------------------------------- pipeline
def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad to a square, image centred (offset rounded down), as the original ``expand2square``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def clip_preprocess(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """transformers 4.37 ``CLIPImageProcessor.preprocess`` of one image: float32 array [3, crop_h, crop_w]."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    # 4.37 get_resize_output_image_size: the short edge becomes `size`, the long edge int(size * long / short).
    # (4.37 would also misread a 1- or 3-pixel-tall array as channels-first; that quirk is not reproduced.)
    long_edge = int(cfg.size * max(w, h) / min(w, h))
    new_w, new_h = (cfg.size, long_edge) if w <= h else (long_edge, cfg.size)
    x = np.asarray(img.resize((new_w, new_h), BICUBIC))  # PIL returns a copy when the size is unchanged
    crop_h, crop_w = cfg.crop
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    x = x[top:top + crop_h, left:left + crop_w]
    x = (x.astype(np.float64) * cfg.rescale).astype(np.float32)  # 4.37 rescale: float64 product, then float32
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)  # 4.37 normalize, in float32
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def select_best_resolution(size_wh: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The original's choice of anyres canvas: most effective pixels, then least waste; FIRST candidate on ties.

    Args:
        size_wh: image (width, height).
        pinpoints: candidates as (width, height).

    Returns:
        The chosen (width, height).
    """
    width, height = size_wh
    if not pinpoints:
        raise ConfigError("grid_pinpoints is empty", hint="set image_grid_pinpoints in config.json")
    best, best_key = None, (0, -math.inf)  # the original starts from effective 0, waste infinity
    for cand_w, cand_h in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(cand_w * cand_h - effective))
        if key > best_key:  # strictly better only, so ties keep the earlier candidate
            best, best_key = (cand_w, cand_h), key
    return best


def resize_and_pad_image(img: Image.Image, target_wh: tuple[int, int]) -> Image.Image:
    """Fit inside ``target_wh`` keeping the aspect (ceil, capped), centre on BLACK (not the mean colour)."""
    width, height = img.size
    target_w, target_h = target_wh
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * (target_w / width)), target_h)
    else:
        new_w, new_h = min(math.ceil(width * (target_h / height)), target_w), target_h
    out = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    out.paste(img.resize((new_w, new_h), BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return out


def divide_to_patches(img: Image.Image, patch: int) -> list[Image.Image]:
    """Square crops of side ``patch``, row by row (left to right, then top to bottom)."""
    width, height = img.size
    return [img.crop((left, top, left + patch, top + patch))
            for top in range(0, height, patch) for left in range(0, width, patch)]


def process_anyres(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """The original ``process_anyres_image``: [1 + n_crops, 3, H, W], the squashed whole image first."""
    canvas = resize_and_pad_image(img, select_best_resolution(img.size, cfg.grid_pinpoints))
    base = img.resize((cfg.size, cfg.size), BICUBIC)  # squashed, aspect ratio NOT kept (as the original)
    return np.stack([clip_preprocess(p, cfg) for p in [base, *divide_to_patches(canvas, cfg.patch)]])


def _pad_then_clip(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    return clip_preprocess(expand2square(img, tuple(int(m * 255) for m in cfg.mean)), cfg)


_PER_IMAGE: dict[str, Callable[[Image.Image, ImageConfig], np.ndarray]] = {
    "pad": _pad_then_clip, "square": clip_preprocess, "anyres": process_anyres}


def preprocess(images: Sequence[Image.Image | str | os.PathLike | bytes],
               cfg: ImageConfig) -> tuple[torch.Tensor | list[torch.Tensor], list[tuple[int, int]]]:
    """The original ``process_images`` for a batch.

    Args:
        images: PIL images, or sources for :func:`load_image`.
        cfg: the checkpoint's preprocessing: an :class:`ImageConfig`, or a family's own config with ``per_image``.

    Returns:
        ``(pixel_values, image_sizes)``: float32 [B, 3, H, W] for pad/square; [B, 1 + n, 3, H, W] for anyres,
        or a list of [1 + n_i, 3, H, W] when the crop counts differ (as the original); sizes are (W, H).
    """
    import torch

    if not images:
        raise ImageError("preprocess: no images given", hint="pass at least one image")
    loaded = [load_image(im) for im in images]
    tensors = [torch.from_numpy(cfg.per_image(im)) for im in loaded]
    same = len({t.shape for t in tensors}) == 1
    return (torch.stack(tensors) if same else tensors), [im.size for im in loaded]


# ---------------------------------------------------------------------------------------------- model side
def anyres_grid_shape(image_size_wh: tuple[int, int], pinpoints: str | Sequence[Sequence[int]],
                      patch: int) -> tuple[int, int]:
    """The original ``get_anyres_image_grid_shape``: (crops across, crops down) for an image of (W, H).

    ``patch`` is the vision tower's ``image_size`` (336), as the original model passes it.
    """
    width, height = select_best_resolution(image_size_wh, _pinpoints(pinpoints))
    return width // patch, height // patch


def unpad_features(tensor: torch.Tensor, original_size_wh: tuple[int, int]) -> torch.Tensor:
    """The original ``unpad_image``: cut the rows/columns that the black anyres padding produced.

    Args:
        tensor: features [C, H, W] on the padded canvas grid.
        original_size_wh: the image's (width, height).

    Returns:
        A view of ``tensor``. The new extent is truncated with plain ``int()`` (transformers 5 uses
        ``int(round(x, 7))``), and the cut is symmetric, so an odd remainder leaves one extra row/column.
    """
    orig_w, orig_h = original_size_wh
    cur_h, cur_w = tensor.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:
        pad = (cur_h - int(orig_h * (cur_w / orig_w))) // 2
        return tensor[:, pad:cur_h - pad, :]
    pad = (cur_w - int(orig_w * (cur_h / orig_h))) // 2
    return tensor[:, :, pad:cur_w - pad]


# ---------------------------------------------------------------------------------------------- transformers
def hf_pinpoints(cfg: ImageConfig) -> list[list[int]] | None:
    """An anyres checkpoint's pinpoints as transformers reads them, (height, width): each original pair swapped
    (see ``hf_image_processor``); None unless anyres."""
    return [[h, w] for w, h in cfg.grid_pinpoints] if cfg.aspect == "anyres" else None


def hf_image_processor(cfg: ImageConfig, class_name: str) -> tuple[Any, list[list[int]] | None]:
    """The transformers 5 image processor whose ``pixel_values`` equal :func:`preprocess`'s.

    It is the PIL backend class: PIL bicubic resizes, numpy rescale/normalize, bit-identical to the reference.
    Its saved ``preprocessor_config.json`` says ``LlavaImageProcessor`` / ``LlavaNextImageProcessor``;
    ``AutoImageProcessor`` loads that as the PIL class only where torchvision is absent or with
    ``backend="pil"`` (the torchvision backend resizes with torch, not bit-identical), so load it with
    ``AutoImageProcessor.from_pretrained(path, backend="pil")``.

    Args:
        cfg: the original checkpoint's preprocessing.
        class_name: the transformers image processor class that does ``cfg.aspect`` (the family's table says
            which, e.g. ``families/llava/hf_output.py``).

    Returns:
        ``(processor, image_grid_pinpoints)``: the pinpoints to write into the converted ``config.json`` too
        (the model derives the grid shape from them and must agree with the processor), or None unless anyres.

    Deliberate differences that remain (transformers behaviour, documented not removed):
        - pinpoints: transformers reads each pair as (height, width), the original as (width, height); both
          take the first candidate on ties. Writing each pair swapped, in the same order, makes every choice
          identical, including ties (for the released list: W <= 336 and H <= 336), where llava-hf's
          published list picks the transposed canvas. Hence our pinpoints differ from llava-hf's for the same checkpoint.
        - anyres batches: transformers zero-pads the crop dimension to the batch maximum (the model strips it
          using image_sizes); the original returns a list. ``image_sizes`` there are (H, W), ours (W, H).
        - the model's unpad rounds ``int(round(x, 7))`` where the original truncates with ``int(x)``: a pair of
          feature rows/columns more where the product lands just below an integer (an 88x55 image keeps 14
          rows in the original, 16 in transformers); see the tests.
    """
    import transformers

    extra: dict[str, Any] = {"do_pad": cfg.aspect == "pad"}  # pad-to-square with int(mean*255)
    pinpoints = hf_pinpoints(cfg)
    if pinpoints is not None:
        extra = {"do_pad": True, "image_grid_pinpoints": pinpoints}
    processor = getattr(transformers, class_name)(
        size={"shortest_edge": cfg.size}, crop_size={"height": cfg.crop[0], "width": cfg.crop[1]},
        image_mean=list(cfg.mean), image_std=list(cfg.std), rescale_factor=cfg.rescale, resample=int(BICUBIC),
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, **extra)
    return processor, pinpoints
