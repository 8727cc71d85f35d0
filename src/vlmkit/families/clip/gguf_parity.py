"""CLIP GGUF files read back into transformers, and ``vlmkit verify CLIP_FOLDER GGUF_FOLDER``.

llama.cpp loads only projector GGUFs (a CLIP-only file is refused with "unknown projector
type"), so a CLIP GGUF is proved by reading it back with gguf-py alone: the config from its
keys, the weights from its tensors through ``LEGACY_NAMES`` (llama.cpp's legacy
``get_tensor_name`` read backwards, written independently of the converter's gguf-py
table), and the image and text embeddings compared with the original model's.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

from ...conversion import output
from ...errors import ConfigError, ManifestError
from ...options import LoadOptions
from ...parity import Check, Report, compare_tensors
from ...runtime import images

# GGUF name pieces -> transformers CLIP names (the legacy converter's string replacements, backwards).
TOWERS = {"t.": "text_model.", "v.": "vision_model."}
LEGACY_NAMES = [
    (r"^token_embd\.", "embeddings.token_embedding."),
    (r"^position_embd\.", "embeddings.position_embedding."),
    (r"^patch_embd\.", "embeddings.patch_embedding."),
    (r"^class_embd$", "embeddings.class_embedding"),
    (r"^pre_ln\.", "pre_layrnorm."),
    (r"^blk\.(\d+)\.attn_q\.", r"encoder.layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"encoder.layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"encoder.layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_out\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^blk\.(\d+)\.ln1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blk\.(\d+)\.ln2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blk\.(\d+)\.ffn_down\.", r"encoder.layers.\1.mlp.fc1."),  # the legacy layout's swap
    (r"^blk\.(\d+)\.ffn_up\.", r"encoder.layers.\1.mlp.fc2."),
]
POST_NORM = {"t.": "final_layer_norm.", "v.": "post_layernorm."}
# (max abs diff, cosine) of the embeddings read back vs the original's, per type; measured on the tiny CLIP
# (f16: 7e-4, q8_0: 3e-2) with margin.
BOUNDS = {"f32": (1e-5, 0.9999), "f16": (5e-3, 0.999), "bf16": (5e-2, 0.995), "q8_0": (1e-1, 0.995)}
LOOSE = (5e-1, 0.98)


def hf_name(name: str) -> str:
    """The transformers ``CLIPModel`` name of a legacy-layout GGUF tensor."""
    if name in ("visual_projection.weight", "text_projection.weight"):
        return name
    tower = name[:2]
    if tower not in TOWERS:
        raise ConfigError(f"tensor '{name}' is not in the CLIP GGUF layout (t.* / v.*)")
    rest = name[2:]
    if rest.startswith("post_ln."):
        return TOWERS[tower] + POST_NORM[tower] + rest[len("post_ln."):]
    for pattern, replacement in LEGACY_NAMES:
        if re.match(pattern, rest):
            return TOWERS[tower] + re.sub(pattern, replacement, rest)
    raise ConfigError(f"tensor '{name}' is not in the CLIP GGUF layout")


def _tensor(t) -> torch.Tensor:
    shape = list(reversed([int(d) for d in t.shape]))
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        data = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).float()
    else:
        data = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    return data.reshape(shape)


def read_clip(path: Path):
    """A transformers CLIP built from a CLIP GGUF alone (gguf-py): ``CLIPModel``, or one tower with its projection.

    Returns:
        (model, fields): the model in eval mode, float32; the file's metadata.
    """
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    act = "gelu" if f.get("clip.use_gelu") else "quick_gelu"
    text = vision = None
    if f.get("clip.has_text_encoder"):
        text = CLIPTextConfig(
            vocab_size=len(f["tokenizer.ggml.tokens"]), max_position_embeddings=f["clip.text.context_length"],
            hidden_size=f["clip.text.embedding_length"], intermediate_size=f["clip.text.feed_forward_length"],
            num_attention_heads=f["clip.text.attention.head_count"], num_hidden_layers=f["clip.text.block_count"],
            layer_norm_eps=f["clip.text.attention.layer_norm_epsilon"], projection_dim=f["clip.text.projection_dim"],
            hidden_act=act)
    if f.get("clip.has_vision_encoder"):
        vision = CLIPVisionConfig(
            image_size=f["clip.vision.image_size"], patch_size=f["clip.vision.patch_size"],
            hidden_size=f["clip.vision.embedding_length"], intermediate_size=f["clip.vision.feed_forward_length"],
            num_attention_heads=f["clip.vision.attention.head_count"], num_hidden_layers=f["clip.vision.block_count"],
            layer_norm_eps=f["clip.vision.attention.layer_norm_epsilon"],
            projection_dim=f["clip.vision.projection_dim"], hidden_act=act)
    if text is not None and vision is not None:
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                     projection_dim=text.projection_dim))
    else:
        model = CLIPTextModelWithProjection(text) if text is not None else CLIPVisionModelWithProjection(vision)
    state = {hf_name(t.name): _tensor(t) for t in reader.tensors}
    if isinstance(model, CLIPModel):
        state["logit_scale"] = model.logit_scale.detach().clone()  # not stored: not part of either tower
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise ConfigError(f"{path}: the GGUF does not fill a transformers CLIP: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return model.eval(), f


@torch.no_grad()
def embeddings(model, pixels: torch.Tensor | None, ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Projected image / text embeddings of any of the three model kinds."""
    out = {}
    if pixels is not None:
        if hasattr(model, "get_image_features"):
            out["image"] = _features(model.get_image_features(pixel_values=pixels))
        elif hasattr(model, "visual_projection"):
            out["image"] = model(pixel_values=pixels).image_embeds
    if ids is not None:
        if hasattr(model, "get_text_features"):
            out["text"] = _features(model.get_text_features(input_ids=ids))
        elif hasattr(model, "text_projection"):
            out["text"] = model(input_ids=ids).text_embeds
    return out


def _features(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value.pooler_output


# "a photo of a cat" and "a diagram" in CLIP's vocabulary, with <|startoftext|> / <|endoftext|>.
PROBE_IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407], [49406, 320, 22697, 49407, 49407, 49407, 49407]])


def verify(original: Path, folder: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8) -> Report:
    """The CLIP GGUF in ``folder`` read back into transformers against the original ``CLIPModel`` folder."""
    from transformers import CLIPModel

    from .gguf_export import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, read_preprocessor

    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ConfigError(f"{folder}: expected one CLIP GGUF file, found {[p.name for p in files]}")
    model, fields = read_clip(files[0])
    kind = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0"}.get(int(fields.get("general.file_type", 1)), "q")
    report = Report("CLIP GGUF read back with gguf-py vs the original model", str(original), str(folder),
                    inputs={"file": files[0].name, "type": kind, "probes": [Path(i).name for i, _ in probes]})
    try:
        report.checks.append(Check("files", True, output.verify_files(folder), "sha256 of every file = the manifest's"))
    except ManifestError as e:
        report.checks.append(Check("files", False, {}, "sha256 of every file = the manifest's", e.message))
    reference = CLIPModel.from_pretrained(original, dtype=torch.float32).eval()
    pixels = None
    if fields.get("clip.has_vision_encoder"):
        stored = read_preprocessor(original)
        mean, std = stored.get("image_mean", OPENAI_CLIP_MEAN), stored.get("image_std", OPENAI_CLIP_STD)
        stored_in_gguf = [*fields["clip.vision.image_mean"], *fields["clip.vision.image_std"]]
        report.checks.append(compare_tensors("image mean/std", torch.tensor([*mean, *std]), torch.tensor(stored_in_gguf),
                                             atol=1e-6))
        size = reference.config.vision_config.image_size
        cfg = images.ImageConfig(aspect="square", size=size, crop=(size, size), mean=tuple(mean), std=tuple(std))
        pixels = torch.stack([torch.from_numpy(images.clip_preprocess(images.load_image(i), cfg)) for i, _ in probes])
    ids = PROBE_IDS if fields.get("clip.has_text_encoder") else None
    want, got = embeddings(reference, pixels, ids), embeddings(model, pixels, ids)
    for name in want:
        atol, cosine = BOUNDS.get(kind, LOOSE)
        report.checks.append(compare_tensors(f"{name} embeddings", want[name], got[name], atol=atol, min_cosine=cosine))
    return report
