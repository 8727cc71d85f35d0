"""The LLaVA image path, once: tower -> select layer -> projector -> anyres/unpad -> newline -> splice.

``llava_arch.py``'s ``encode_images`` and ``prepare_inputs_labels_for_multimodal`` as plain
functions over the modules they are given: the reference of the original forward
(``reference.OriginalLlava``, under ``no_grad``) and training (``train_model.LlavaTraining``, with
gradients) run this same code with their own modules.

* :func:`projector`: the ``mm_projector`` module a checkpoint describes;
* :func:`encode_images`: the CLIP tower's hidden state at ``mm_vision_select_layer`` (no
  post-layernorm), ``patch`` dropping the CLS position, through the ``mm_projector``; a SigLIP
  tower (LLaVA-NeXT repository) gives its last hidden state, every token (``siglip.py``);
* :func:`image_features`: one ``[T_i, hidden]`` tensor per image; NeXT: the base image's features
  first, then the crops' grid, unpadded to the image's aspect ratio (``anyres_max_N``: then shrunk,
  :func:`anyres_max_shrink`), an ``image_newline`` at the end of every row (``spatial_unpad``);
* :func:`video_config`, :func:`pool_frames`, :func:`place_video_newlines`, :func:`video_features`: a
  video (LLaVA-OneVision, LLaVA-Video): its frames through the tower, each frame's feature grid pooled
  (``get_2dPool``), newlines placed by ``mm_newline_position``; one placeholder for the whole video;
* :func:`splice`: the features in place of each ``IMAGE_TOKEN_INDEX`` (-200) of one sequence's
  input embeddings (labels ``IGNORE_INDEX`` there), cut at ``tokenizer_model_max_length``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError
from ...runtime import images
from ...runtime.tokens import IMAGE_TOKEN_INDEX
from . import anyres_max, siglip
from .checkpoint import OriginalCheckpoint


def projector(ckpt: OriginalCheckpoint, hidden: int) -> nn.Module:
    """The ``mm_projector`` of ``build_vision_projector``: Linear, Linear-GELU-Linear... (mlpNx_gelu) or identity."""
    width = ckpt.config.get("mm_hidden_size", ckpt.vision_config["hidden_size"])
    depth = ckpt.projector_depth
    if depth == 0:
        return nn.Identity()
    if ckpt.config.get("mm_projector_type", "linear") == "linear":
        return nn.Linear(width, hidden)
    layers: list[nn.Module] = [nn.Linear(width, hidden)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


def image_config(ckpt: OriginalCheckpoint):
    """The checkpoint's preprocessing: ``anyres_max.ImageConfig`` for ``anyres_max_N``, else CLIP's ``ImageConfig``."""
    ratio = ckpt.config.get("image_aspect_ratio")
    if anyres_max.max_patches(ratio) is not None:
        return anyres_max.ImageConfig.from_original(ckpt.config, ckpt.preprocessor, ckpt.vision_config["image_size"])
    if ckpt.vision_config.get("model_type") == "siglip_vision_model":
        raise ConfigError(f"{ckpt.path}/config.json: a SigLIP tower with image_aspect_ratio {ratio!r}: vlmkit "
                          "reproduces the original's SigLIP preprocessing for anyres_max_N only",
                          hint="set image_aspect_ratio to the value the model was trained with (OneVision: anyres_max_9)")
    return images.ImageConfig.from_original(ckpt.config, ckpt.preprocessor)


def encode_images(tower: nn.Module, mm_projector: nn.Module, pixel_values: torch.Tensor, config: dict,
                  dtype: torch.dtype, *, tower_grad: bool = False) -> torch.Tensor:
    """``[N, 3, H, W]`` -> projected features ``[N, T, hidden]`` (CLIP layer, patch selection, projector).

    Args:
        tower: a transformers ``CLIPVisionModel``, or the trimmed ``SiglipVisionModel`` of ``siglip.build``.
        mm_projector: the projector module (:func:`projector`).
        config: the checkpoint's config (``mm_vision_select_layer``, ``mm_vision_select_feature``).
        dtype: the pixels' dtype in the tower.
        tower_grad: let gradients through the tower (the original's ``CLIPVisionTower.forward`` is
            always ``no_grad``; training's ``--train-vision`` is not).
    """
    with torch.enable_grad() if tower_grad else torch.no_grad():
        if tower.config.model_type == "siglip_vision_model":  # select layer and feature ignored, as the original
            features = siglip.encode(tower, pixel_values.to(dtype))
        else:
            out = tower(pixel_values.to(dtype), output_hidden_states=True)
            features = out.hidden_states[config["mm_vision_select_layer"]]
            if config.get("mm_vision_select_feature", "patch") == "patch":
                features = features[:, 1:]
    return mm_projector(features)


def image_features(ckpt: OriginalCheckpoint, encode: Callable[[torch.Tensor], torch.Tensor], pixel_values,
                   image_sizes: list[tuple[int, int]], *, image_config: images.ImageConfig,
                   image_newline: torch.Tensor | None) -> list[torch.Tensor]:
    """One ``[T_i, hidden]`` tensor per image, arranged as ``prepare_inputs_labels_for_multimodal`` does.

    Args:
        ckpt: the checkpoint (its config's ``mm_patch_merge_type``, the tower's image and patch size).
        encode: pixels -> projected features (:func:`encode_images` over the caller's modules).
        pixel_values: from ``runtime.images.preprocess`` ([B,3,H,W], or [B,1+n,3,H,W] / a list for anyres).
        image_sizes: original (width, height) of each image.
        image_config: the checkpoint's preprocessing (anyres grid pinpoints).
        image_newline: NeXT's ``model.image_newline`` (None for 1.5).
    """
    limit = anyres_max.max_patches(ckpt.config.get("image_aspect_ratio"))
    if not ckpt.is_next and limit is None:
        return list(encode(pixel_values))
    merge = ckpt.config.get("mm_patch_merge_type", "flat")
    tower_size = ckpt.vision_config["image_size"]
    side = tower_size // ckpt.vision_config["patch_size"]
    canvases = (image_config.grid_pinpoints if image_config is not None
                else anyres_max.pinpoints(ckpt.config["image_grid_pinpoints"], tower_size))
    result = []
    for crops, size in zip(pixel_values, image_sizes):
        f = encode(crops)
        if merge == "flat":
            result.append(f.flatten(0, 1))
            continue
        if f.shape[0] == 1:
            single = f[0]
            if "unpad" in merge:
                single = torch.cat([single, image_newline[None]], 0)
            result.append(single)
            continue
        base, grid = f[0], f[1:]
        npw, nph = images.anyres_grid_shape(size, canvases, tower_size)
        grid = grid.view(nph, npw, side, side, -1)
        if "unpad" in merge:
            grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # C, rows, cols
            grid = images.unpad_features(grid, size)
            if limit is not None:
                grid = anyres_max_shrink(grid, limit, side)
            newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1)
            grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
        else:
            grid = grid.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        result.append(torch.cat([base, grid], 0))
    return result


def anyres_max_shrink(grid: torch.Tensor, max_num_patches: int, unit: int) -> torch.Tensor:
    """``anyres_max_N``'s downscale of an unpadded ``[C, h, w]`` grid (``llava_arch.py``).

    When the grid holds more than about N tiles' worth of features (``times = sqrt(h*w / (N*unit²))``
    above 1.1) it is resized bilinearly (``align_corners`` False) to ``int(h // times) x int(w // times)``
    (float floor division, then ``int``), keeping its aspect ratio; otherwise it is kept.
    """
    _, h, w = grid.shape
    times = math.sqrt(h * w / (max_num_patches * unit ** 2))
    if times <= 1.1:
        return grid
    return nn.functional.interpolate(grid[None], [int(h // times), int(w // times)], mode="bilinear")[0]


# ---------------------------------------------------------------------------------------------- video
# LLaVA-NeXT's ``prepare_inputs_labels_for_multimodal`` for ``modalities=["video"]`` (``llava_arch.py``, read at
# df17966): the frames, preprocessed like single tiles, go through the tower and projector together; each
# frame's square grid is pooled by ``get_2dPool`` and the newlines placed by ``mm_newline_position``.
POOL_MODES = ("average", "max", "bilinear")  # get_2dPool raises ValueError on any other mm_spatial_pool_mode
NEWLINE_POSITIONS = ("grid", "frame", "one_token", "no_token")
# prepare_inputs_labels_for_multimodal calls get_2dPool(feature) with its default stride; mm_spatial_pool_stride
# is read only by encode_multimodals, whose call is commented out since the video code of August 2024
POOL_STRIDE = 2


@dataclass(frozen=True)
class VideoConfig:
    """How a checkpoint arranges a video's features, read from its ``config.json`` as the original reads it.

    Attributes:
        pool_mode: ``mm_spatial_pool_mode`` (no default in the original: an absent field is an error there).
        newline_position: ``mm_newline_position`` (the original's ``getattr`` default ``one_token``).
        merge: ``mm_patch_merge_type`` (``flat``: frames flattened, no newline at all).
        notes: fields the original reads differently from what they seem to say (``mm_spatial_pool_stride``).
    """

    pool_mode: str
    newline_position: str
    merge: str
    notes: tuple[str, ...] = ()


def video_config(ckpt: OriginalCheckpoint) -> VideoConfig:
    """The checkpoint's video arrangement.

    Raises:
        ConfigError: naming the field: not a LLaVA-NeXT-repository SigLIP checkpoint (``anyres_max_N``), a pool
            mode or newline position the original refuses, or ``add_faster_video`` (slow/fast frames).
    """
    config, where = ckpt.config, f"{ckpt.path}/config.json"
    if anyres_max.max_patches(config.get("image_aspect_ratio")) is None:
        raise ConfigError(f"{where}: video frames are read for LLaVA-NeXT-repository checkpoints with a SigLIP tower "
                          f"and anyres_max_N (LLaVA-OneVision, LLaVA-Video); this one has image_aspect_ratio "
                          f"{config.get('image_aspect_ratio')!r}", hint="give the frames as images instead")
    if config.get("add_faster_video"):
        # llava_arch.py's grid branch reads all_faster_video_features, which only the commented-out
        # encode_multimodals computes: the original itself fails on such a config
        raise ConfigError(f"{where}: add_faster_video is true: the original's slow/fast frame tokens "
                          "(faster_token every faster_token_stride frames) depend on code LLaVA-NeXT has commented "
                          "out, so vlmkit does not reproduce them",
                          hint="set add_faster_video to false if the model was trained without slow/fast frames")
    mode = config.get("mm_spatial_pool_mode")
    if mode not in POOL_MODES:
        raise ConfigError(f"{where}: mm_spatial_pool_mode {mode!r}: the original pools video frames with one of "
                          f"{', '.join(POOL_MODES)} (get_2dPool; no default)",
                          hint="set it to the mode the model was trained with (LLaVA's train.py default: bilinear)")
    newline = config.get("mm_newline_position", "one_token")
    if newline not in NEWLINE_POSITIONS:
        raise ConfigError(f"{where}: mm_newline_position {newline!r}: the original knows "
                          f"{', '.join(NEWLINE_POSITIONS)}")
    stride = config.get("mm_spatial_pool_stride")
    notes = () if stride in (None, POOL_STRIDE) else (
        f"mm_spatial_pool_stride {stride} is not used: the original pools video frames with get_2dPool's default "
        f"stride {POOL_STRIDE} (its encode_multimodals, which read the field, is commented out)",)
    return VideoConfig(mode, newline, config.get("mm_patch_merge_type", "flat"), notes)


def pool_frames(features: torch.Tensor, mode: str, side: int, stride: int = POOL_STRIDE) -> torch.Tensor:
    """``get_2dPool``: ``[F, side*side, C]`` -> ``[F, T, C]``, each frame's grid pooled spatially.

    ``average`` / ``max``: 2-D pooling with kernel = stride (floor: 27 -> 13); ``bilinear``: resized to
    ``ceil(side / stride)`` per side (27 -> 14), ``align_corners`` False.
    """
    frames, _, dim = features.shape
    grid = features.view(frames, side, side, dim).permute(0, 3, 1, 2)
    if mode == "average":
        grid = nn.functional.avg_pool2d(grid, stride)
    elif mode == "max":
        grid = nn.functional.max_pool2d(grid, stride)
    else:
        grid = nn.functional.interpolate(grid, size=[math.ceil(side / stride)] * 2, mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(frames, -1, dim)


def place_video_newlines(frames: torch.Tensor, position: str, merge: str,
                         image_newline: torch.Tensor | None) -> torch.Tensor:
    """A video's pooled frames ``[F, T, C]`` as one ``[N, C]`` sequence with ``image_newline`` where the
    original puts it: ``grid`` after every row of every frame (``add_token_per_grid``), ``frame`` after every frame
    (``add_token_per_frame``), ``one_token`` once after all frames (``spatial_unpad`` only), ``no_token`` nowhere.
    A ``flat`` merge type never adds one."""
    count, tokens, dim = frames.shape
    if merge == "flat" or position == "no_token" or (position == "one_token" and "unpad" not in merge):
        return frames.flatten(0, 1)
    if image_newline is None:
        raise ConfigError(f"mm_newline_position {position!r} needs model.image_newline, which the checkpoint lacks")
    if position == "one_token":
        return torch.cat([frames.flatten(0, 1), image_newline[None]], 0)
    if position == "frame":
        return torch.cat([frames, image_newline.expand(count, 1, dim)], 1).flatten(0, 1)
    side = int(math.sqrt(tokens))  # grid: the pooled frame is square
    rows = frames.view(count, side, side, dim)
    return torch.cat([rows, image_newline.expand(count, side, 1, dim)], 2).flatten(0, 2)


def video_features(ckpt: OriginalCheckpoint, encode: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor,
                   *, video: VideoConfig, image_newline: torch.Tensor | None) -> torch.Tensor:
    """One video's ``[N, hidden]`` features, for the one placeholder that stands for the whole video.

    Args:
        ckpt: the checkpoint (the tower's image and patch size give the frame's grid side).
        encode: pixels -> projected features (:func:`encode_images` over the caller's modules).
        frames: ``[F, 3, H, W]``, each frame preprocessed as one tile (``anyres_max.ImageConfig.frames``).
        video: :func:`video_config`.
        image_newline: the checkpoint's ``model.image_newline``.
    """
    side = ckpt.vision_config["image_size"] // ckpt.vision_config["patch_size"]
    pooled = pool_frames(encode(frames), video.pool_mode, side)
    return place_video_newlines(pooled, video.newline_position, video.merge, image_newline)


def splice(embed: nn.Module, ids: torch.Tensor, features: Sequence[torch.Tensor], *,
           labels: torch.Tensor | None = None, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sequence's input embeddings ``[L', hidden]`` with ``features[i]`` at its i-th -200.

    Args:
        embed: the language model's input embeddings.
        ids: ``[L]`` token ids with ``IMAGE_TOKEN_INDEX`` per image, on the embeddings' device.
        features: one ``[T_i, hidden]`` tensor per placeholder, in order.
        labels: ``[L]`` labels (training): returned spliced, ``IGNORE_INDEX`` at the image positions.
        limit: ``tokenizer_model_max_length``: embeddings (and labels) are cut there.

    Returns:
        (embeddings, labels or None).

    Raises:
        VlmkitError: the placeholders and the images differ in number.
    """
    marks = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(marks) != len(features):
        from ...errors import VlmkitError

        raise VlmkitError(f"the prompt has {len(marks)} image placeholder(s) but {len(features)} image(s) were given")
    bounds = [-1] + marks + [len(ids)]
    spans = [slice(bounds[i] + 1, bounds[i + 1]) for i in range(len(bounds) - 1)]
    # the text between the images, embedded in one call and split again (as the original)
    text = torch.split(embed(torch.cat([ids[s] for s in spans])), [s.stop - s.start for s in spans])
    pieces = []
    for i, piece in enumerate(text):
        pieces.append(piece)
        if i < len(marks):
            pieces.append(features[i].to(piece.dtype))
    embeds = torch.cat(pieces, 0)
    if labels is not None:
        from ...data.tokenize import IGNORE_INDEX  # training only: the data package is not loaded to chat

        parts = []
        for i, span in enumerate(spans):
            parts.append(labels[span])
            if i < len(marks):
                image = features[i].shape[0]
                parts.append(torch.full((image,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
        labels = torch.cat(parts)
    if limit:
        embeds = embeds[:limit]
        labels = labels[:limit] if labels is not None else None
    return embeds, labels
