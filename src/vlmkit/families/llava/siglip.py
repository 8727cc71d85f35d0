"""The SigLIP tower as LLaVA-NeXT builds it (``llava/model/multimodal_encoder/siglip_encoder.py``).

LLaVA-OneVision and LLaVA-Video carry a SigLIP so400m/384 tower; the original code builds it
in a way no config field describes, and this module is the one place that says how:

* which class: ``builder.py`` tests ``os.path.exists(mm_vision_tower)`` FIRST and builds a CLIP
  tower for any local path, and a SigLIP tower only for a non-local name containing ``siglip``
  (:func:`tower_kind`; a local SigLIP folder gets CLIP in the original, and vlmkit says so);
* its config: the ``SigLipVisionConfig`` class defaults (:data:`ORIGINAL_DEFAULTS`), not the
  checkpoint's; the weights are those of the named model, then the checkpoint's;
* trimmed: the last encoder layer deleted, the attention-pooling head replaced by identity
  (:func:`trimmed_config` describes the result as transformers' ``SiglipVisionConfig``);
* the features: ``hidden_states[-1]`` of the TRIMMED model (before ``post_layernorm``), every
  patch token (no CLS to drop: 729 for 384/14); ``mm_vision_select_layer`` is ignored
  (:func:`select_layer_note` says so when a config names another layer).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ...errors import ConfigError
from .towers import SIGLIP_TOWERS, known_siglip

# siglip_encoder.py SigLipVisionConfig.__init__ defaults: what the original builds whatever the checkpoint says
ORIGINAL_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                     "num_attention_heads": 16, "num_channels": 3, "image_size": 384, "patch_size": 14,
                     "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0}

# the layer the original reads, counted in the UNTRIMMED tower: -1 of the trimmed one is -2 of the full one
ORIGINAL_LAYER = -2


def tower_kind(name: str | None) -> tuple[str, str | None]:
    """``("siglip" | "clip", note)``: the tower class ``build_vision_tower`` picks for ``mm_vision_tower``.

    The note (or None) says where the original does something a user may not expect: a local
    folder whose name says SigLIP is built as CLIP there (the path test comes first).
    """
    if not name:
        return "clip", None
    if Path(name).expanduser().exists():
        note = None
        if "siglip" in name.lower():
            note = (f"mm_vision_tower '{name}' is a local path: the original code builds a CLIP tower for every "
                    "existing path (builder.py tests the path before the 'siglip' name), so it would not run this "
                    "SigLIP tower; name the hub id (google/siglip-so400m-patch14-384) for the original's behaviour")
        return "clip", note
    return ("siglip", None) if "siglip" in name.lower() else ("clip", None)


def trimmed_config(published: dict) -> dict:
    """transformers ``SiglipVisionConfig`` fields of the tower the original runs.

    Args:
        published: the named tower's vision config as published (its ``num_hidden_layers`` counts the
            layer the original deletes).

    Raises:
        ConfigError: a tower with fewer than two layers cannot lose its last one.
    """
    layers = published["num_hidden_layers"]
    if layers < 2:
        raise ConfigError(f"SigLIP tower with num_hidden_layers={layers}: the original deletes the last layer and "
                          "reads the one before it", hint="name the tower the checkpoint was trained from")
    fields = {k: v for k, v in published.items() if k not in ("model_type", "vision_use_head")}
    return {**fields, "num_hidden_layers": layers - 1, "vision_use_head": False, "model_type": "siglip_vision_model"}


def shape_facts(source, prefix: str) -> dict | None:
    """What the tower's tensor shapes under ``prefix`` tell (None when no complete tower is there).

    SigLIP has no CLS position: ``side`` (patches per side) is ``sqrt(positions)``; the image size is
    not held exactly (384 with 14-pixel patches gives 27 per side, as 378 would).
    """
    try:
        patch = source.info(prefix + "embeddings.patch_embedding.weight").shape
        positions = source.info(prefix + "embeddings.position_embedding.weight").shape[0]
        fc1 = source.info(prefix + "encoder.layers.0.mlp.fc1.weight").shape
    except KeyError:
        return None
    layers = 1 + max(int(m.group(1)) for n in source.keys()
                     if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n)))
    hidden, channels, p, _ = patch
    return {"hidden_size": hidden, "intermediate_size": fc1[0], "num_hidden_layers": layers, "patch_size": p,
            "side": math.isqrt(positions), "num_channels": channels}


def tower_config(name: str, source, prefix: str, vision_override: dict) -> tuple[dict, dict, list[str]]:
    """The trimmed tower's ``SiglipVisionConfig`` fields, its preprocessor, and what they assume.

    A released tower (``towers.SIGLIP_TOWERS``) gives both, checked against the checkpoint's tensor
    shapes. Another ``siglip`` name: the shapes give the widths, depth, patch and image size;
    ``num_attention_heads`` must come from ``--config`` (``vision_config``); activation and epsilon are
    ``--config``'s or the original's class defaults, the preprocessing the original's processor class
    defaults at the tower's image size; each is listed as an assumption.

    Args:
        name: ``mm_vision_tower``.
        source: the checkpoint's tensors; the tower under ``prefix``.
        vision_override: ``--config``'s ``vision_config`` (may be empty).

    Raises:
        ConfigError: no tower in the checkpoint, shapes that contradict the table, or no head count.
    """
    facts = shape_facts(source, prefix)
    if facts is None:
        raise ConfigError(f"mm_vision_tower '{name}' is a SigLIP tower but the checkpoint holds no complete tower "
                          f"({prefix}*): the original downloads it from the hub, vlmkit reads it from the checkpoint",
                          hint="convert a checkpoint that contains its vision tower (a full release or fine-tune)")
    entry = known_siglip(name)
    assumptions: list[str] = []
    if entry is not None:
        config = trimmed_config(entry["vision_config"])
        stated = {**config, "side": config["image_size"] // config["patch_size"]}
        wrong = [f"{k} {stated[k]} vs {v}" for k, v in facts.items() if stated.get(k) != v]
        if wrong:
            raise ConfigError(f"mm_vision_tower '{name}': its published config, less the layer the original "
                              f"deletes, does not describe the checkpoint's tower ({'; '.join(wrong)})",
                              hint="the weights come from another SigLIP model; set mm_vision_tower to its hub name")
        return config, entry["preprocessor"], assumptions
    if "num_attention_heads" not in vision_override:
        raise ConfigError(f"mm_vision_tower '{name}' is not a SigLIP tower vlmkit knows "
                          f"(known: {', '.join(SIGLIP_TOWERS)}), and no tensor shape holds its head count",
                          hint='pass --config \'{"vision_config": {"num_attention_heads": N}}\' with the tower\'s value')
    side = facts.pop("side")
    image_size = vision_override.get("image_size", side * facts["patch_size"])
    if image_size // facts["patch_size"] != side:
        raise ConfigError(f"--config vision_config.image_size {image_size} does not give the checkpoint's {side} "
                          f"patches per side", hint="give the tower's image_size")
    given = {k: vision_override[k] for k in ("hidden_act", "layer_norm_eps") if k in vision_override}
    published = {**{k: ORIGINAL_DEFAULTS[k] for k in ("hidden_act", "layer_norm_eps", "attention_dropout")},
                 **given, **facts, "num_hidden_layers": facts["num_hidden_layers"] + 1, "image_size": image_size,
                 "num_attention_heads": vision_override["num_attention_heads"]}
    assumptions.append(f"vision_config.num_attention_heads = {published['num_attention_heads']!r} (from --config)")
    # the original preprocesses with SigLipImageProcessor() whatever the tower (siglip_encoder.py): mean/std 0.5,
    # bicubic, 384 pixels; only its size is assumed to follow the tower's image_size
    assumptions.append(f"vision_config.image_size = {image_size!r} "
                       + ("(from --config)" if "image_size" in vision_override else "(patches per side x patch size)")
                       + ", also the image preprocessing's size (LLaVA-NeXT's SigLipImageProcessor: mean/std 0.5, "
                         "bicubic)")
    for key in ("hidden_act", "layer_norm_eps"):
        source = "(from --config)" if key in given else "(LLaVA-NeXT's SigLipVisionConfig default)"
        assumptions.append(f"vision_config.{key} = {published[key]!r} {source}")
    size = image_size
    preprocessor = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255,
                    "size": {"height": size, "width": size}}
    return trimmed_config(published), preprocessor, assumptions


def select_layer_note(config: dict) -> str | None:
    """A note when ``mm_vision_select_layer`` names another layer than the one the original reads."""
    layer = config.get("mm_vision_select_layer")
    if layer is None or layer == ORIGINAL_LAYER:
        return None
    return (f"config.json: mm_vision_select_layer={layer} is ignored by the original's SigLIP tower, which reads "
            f"the last hidden state of the tower without its last layer ({ORIGINAL_LAYER} of the full tower); "
            "vlmkit does the same")


def build(trimmed: dict, state: dict, *, dtype=None):
    """The trimmed tower as a transformers ``SiglipVisionModel`` holding ``state``.

    Args:
        trimmed: :func:`trimmed_config`'s fields.
        state: the tower's tensors without the checkpoint's ``model.vision_tower.vision_tower.vision_model.``
            prefix (``embeddings.*``, ``encoder.*``, ``post_layernorm.*``: transformers 5's module names);
            a ``head.*`` or a layer beyond the trimmed depth is refused (not the weights the original runs).
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.initialization import no_init_weights  # weights come from the checkpoint

    with no_init_weights():
        tower = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in trimmed.items() if k != "model_type"}))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    tower.load_state_dict(state, strict=True, assign=True)
    return tower.eval()


def encode(tower, pixel_values):
    """``[N, 3, S, S]`` -> ``[N, (S/patch)^2, hidden]``: the trimmed tower's last hidden state, every token.

    ``hidden_states[-1]`` is the encoder's output before ``post_layernorm`` (transformers, like the
    original, applies the post-layernorm to ``last_hidden_state`` only).
    """
    out = tower(pixel_values, output_hidden_states=True)
    features = out.hidden_states[-1]
    side = tower.config.image_size // tower.config.patch_size
    if features.shape[1] != side * side:  # the original asserts 729
        raise ConfigError(f"SigLIP tower gave {features.shape[1]} tokens per image, expected {side * side}")
    return features
