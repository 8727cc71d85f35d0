"""The LLaVA image path, once: tower -> select layer -> projector -> anyres/unpad -> newline -> splice.

``llava_arch.py``'s ``encode_images`` and ``prepare_inputs_labels_for_multimodal`` as plain
functions over the modules they are given: the reference of the original forward
(``reference.OriginalLlava``, under ``no_grad``) and training (``train_model.LlavaTraining``, with
gradients) run this same code with their own modules.

* :func:`projector`: the ``mm_projector`` module a checkpoint describes;
* :func:`encode_images`: the CLIP tower's hidden state at ``mm_vision_select_layer`` (no
  post-layernorm), ``patch`` dropping the CLS position, through the ``mm_projector``;
* :func:`image_features`: one ``[T_i, hidden]`` tensor per image; NeXT: the base image's features
  first, then the crops' grid, unpadded to the image's aspect ratio, an ``image_newline`` at the
  end of every row (``spatial_unpad``);
* :func:`splice`: the features in place of each ``IMAGE_TOKEN_INDEX`` (-200) of one sequence's
  input embeddings (labels ``IGNORE_INDEX`` there), cut at ``tokenizer_model_max_length``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...runtime import images
from ...runtime.tokens import IMAGE_TOKEN_INDEX
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


def encode_images(tower: nn.Module, mm_projector: nn.Module, pixel_values: torch.Tensor, config: dict,
                  dtype: torch.dtype, *, tower_grad: bool = False) -> torch.Tensor:
    """``[N, 3, H, W]`` -> projected features ``[N, T, hidden]`` (CLIP layer, patch selection, projector).

    Args:
        tower: a transformers ``CLIPVisionModel``.
        mm_projector: the projector module (:func:`projector`).
        config: the checkpoint's config (``mm_vision_select_layer``, ``mm_vision_select_feature``).
        dtype: the pixels' dtype in the tower.
        tower_grad: let gradients through the tower (the original's ``CLIPVisionTower.forward`` is
            always ``no_grad``; training's ``--train-vision`` is not).
    """
    with torch.enable_grad() if tower_grad else torch.no_grad():
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
    if not ckpt.is_next:
        return list(encode(pixel_values))
    merge = ckpt.config.get("mm_patch_merge_type", "flat")
    side = ckpt.vision_config["image_size"] // ckpt.vision_config["patch_size"]
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
        npw, nph = images.anyres_grid_shape(size, image_config.grid_pinpoints, ckpt.vision_config["image_size"])
        grid = grid.view(nph, npw, side, side, -1)
        if "unpad" in merge:
            grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # C, rows, cols
            grid = images.unpad_features(grid, size)
            newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1)
            grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
        else:
            grid = grid.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        result.append(torch.cat([base, grid], 0))
    return result


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
