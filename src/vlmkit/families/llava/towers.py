"""The released CLIP towers LLaVA checkpoints name, with their real configs (data, not guesses).

A LLaVA-NeXT checkpoint carries its fine-tuned tower's weights but not the tower's config:
``mm_vision_tower`` names the CLIP model it started from. When that name is one of these
towers, its config and image preprocessing come from here, so converting a real release
offline needs no download. The values are those of the hub repositories' ``config.json``
(``vision_config``) and ``preprocessor_config.json``; a tower whose tensor shapes disagree
with its entry is refused (the name does not describe the weights).

``KNOWN_TOWERS`` are CLIP: haotian-liu/LLaVA builds a ``CLIPVisionTower`` for every tower it
accepts. LLaVA-NeXT (OneVision, LLaVA-Video) also builds SigLIP for a hub name containing
``siglip``; those towers are ``SIGLIP_TOWERS``, kept apart so that no CLIP path reads them
(``siglip.py`` says how the original builds and trims them).
"""

from __future__ import annotations

# OpenAI CLIP's image normalisation (every openai/clip-* preprocessor_config.json).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _openai_clip(*, hidden: int, intermediate: int, layers: int, heads: int, patch: int, image: int,
                 projection: int) -> dict:
    vision = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "patch_size": patch, "image_size": image, "projection_dim": projection,
              "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "attention_dropout": 0.0,
              "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}
    preprocessor = {"crop_size": image, "size": image, "do_center_crop": True, "do_normalize": True,
                    "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3}
    return {"vision_config": vision, "preprocessor": preprocessor}


KNOWN_TOWERS: dict[str, dict] = {
    # LLaVA-1.5 and LLaVA-NeXT (1.6)
    "openai/clip-vit-large-patch14-336": _openai_clip(hidden=1024, intermediate=4096, layers=24, heads=16, patch=14,
                                                      image=336, projection=768),
    # LLaVA (v1, 224 px)
    "openai/clip-vit-large-patch14": _openai_clip(hidden=1024, intermediate=4096, layers=24, heads=16, patch=14,
                                                  image=224, projection=768),
    "openai/clip-vit-base-patch32": _openai_clip(hidden=768, intermediate=3072, layers=12, heads=12, patch=32,
                                                 image=224, projection=512),
    "openai/clip-vit-base-patch16": _openai_clip(hidden=768, intermediate=3072, layers=12, heads=12, patch=16,
                                                 image=224, projection=512),
}


def known_tower(name: str | None) -> dict | None:
    """The table entry of a tower name (``{"vision_config": ..., "preprocessor": ...}``, copies), or None."""
    entry = KNOWN_TOWERS.get((name or "").strip().rstrip("/"))
    if entry is None:
        return None
    return {"vision_config": dict(entry["vision_config"]), "preprocessor": dict(entry["preprocessor"])}


# SigLIP's image normalisation (google/siglip-* preprocessor_config.json; also the original's
# SigLipImageProcessor class defaults in LLaVA-NeXT's siglip_encoder.py)
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

SIGLIP_TOWERS: dict[str, dict] = {
    # LLaVA-OneVision, LLaVA-Video: google/siglip-so400m-patch14-384 config.json vision_config (fields it
    # omits are SiglipVisionConfig's defaults, written out) and its preprocessor_config.json (SiglipImageProcessor:
    # a plain resize to 384x384, bicubic, no crop)
    "google/siglip-so400m-patch14-384": {
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "patch_size": 14, "image_size": 384, "num_channels": 3,
                          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06, "attention_dropout": 0.0,
                          "model_type": "siglip_vision_model"},
        "preprocessor": {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": SIGLIP_MEAN,
                         "image_std": SIGLIP_STD, "image_processor_type": "SiglipImageProcessor", "resample": 3,
                         "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}},
    },
}


def known_siglip(name: str | None) -> dict | None:
    """The SigLIP table entry of a tower name (copies), or None."""
    entry = SIGLIP_TOWERS.get((name or "").strip().rstrip("/"))
    if entry is None:
        return None
    return {"vision_config": dict(entry["vision_config"]), "preprocessor": dict(entry["preprocessor"])}
