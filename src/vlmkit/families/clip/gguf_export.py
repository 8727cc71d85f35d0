"""CLIP as GGUF, in the layout of llama.cpp's legacy ``convert_image_encoder_to_gguf.py``.

One file holds both towers (or one of them): ``clip.has_text_encoder`` /
``clip.has_vision_encoder``, each tower's hyper-parameters under ``clip.text.*`` /
``clip.vision.*``, the image mean/std, the activation (``clip.use_gelu``: ``gelu`` vs
``quick_gelu``) and the text tower's 49,408 BPE tokens. Tensor names come from gguf-py
(``TensorNameMap`` for ``MODEL_ARCH.MMPROJ``: ``v.blk.N.attn_q``, ``v.pre_ln``, ...); the text
tower uses the same names under ``t.``. Two choices keep the legacy layout on purpose:

* ``mlp.fc1`` is written as ``ffn_down`` and ``fc2`` as ``ffn_up``: clip.cpp un-swaps LLaVA
  projector files by shape (``is_ffn_swapped``: an ``ffn_down`` whose first dimension is the
  embedding width), which is right for this layout always, and wrong for the unswapped
  names whenever ``intermediate_size == hidden_size``;
* the projections keep their transformers names (``visual_projection.weight``): gguf-py has none.

LLaVA's mmproj (``families/llava/gguf_export.py``) is the vision half of this layout plus the projector.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from ...conversion import drop, rename
from ...conversion.gguf_sink import GGUFConversion, GGUFFile, GGUFOptions, GGUFType, TypeRule
from ...conversion.gguf_vocab import clip_bpe
from ...conversion.rules import Rule
from ...errors import ConfigError
from ...options import LoadOptions
from ...tensors import open_source

MT = gguf.MODEL_TENSOR
T = gguf.GGMLQuantizationType
# Keys clip.cpp and the legacy converter use that gguf-py 0.19 has no constant for (clip-impl.h KEY_*).
HAS_TEXT_ENCODER = "clip.has_text_encoder"
FEATURE_LAYER = "clip.vision.feature_layer"
GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"
PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"
TEXT_ARCH = "clip.text"  # the legacy converter fills gguf-py's "{arch}.*" LLM keys with this for the text tower
TEXT_PROJECTION_DIM = "clip.text.projection_dim"
# The one activation key covers both towers: True -> gelu, False -> quick_gelu (clip.cpp's default).
USE_GELU = {"gelu": True, "quick_gelu": False}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Legacy layout: fc1 under ffn_down, fc2 under ffn_up (see the module docstring).
LEGACY_SWAP = {MT.V_ENC_FFN_UP: MT.V_ENC_FFN_DOWN, MT.V_ENC_FFN_DOWN: MT.V_ENC_FFN_UP}
# Text-tower tensors with no vision counterpart, named by gguf-py's closest tensor.
TEXT_TENSORS = {"embeddings.token_embedding": MT.TOKEN_EMBD, "final_layer_norm": MT.V_POST_NORM}
# Looked up in gguf-py's table under the name transformers' LLaVA gives the tower.
LOOKUP_PREFIX = "vision_tower.vision_model."
LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")



def type_rules(towers: tuple[str, ...] = ("v", "t")) -> list[TypeRule]:
    """Tensors of a CLIP GGUF whose type does not follow the one asked for."""
    rules = [TypeRule(f"{tower}.position_embd.weight", T.F32,
                      "position embeddings stay F32, as llama.cpp's converter keeps them (V_ENC_EMBD_POS)")
             for tower in towers]
    return rules + [TypeRule("v.patch_embd.weight", T.F32, "the patch convolution: F16 when F16 is asked, else F32, "
                             "as llama.cpp's mmproj converter writes it (never quantised)", table=((T.F16, T.F16),))]


def _under(tower: str, name: str) -> str:
    return f"{tower}.{name[2:] if name.startswith('v.') else name}"


def gguf_name(tensor_map: gguf.TensorNameMap, rest: str, tower: str) -> str | None:
    """The legacy-layout GGUF name of a CLIP tower tensor (``rest`` is its name inside the tower), or None."""
    layer = LAYER.match(rest)
    bid = int(layer.group(1)) if layer else None
    for prefix, kind in TEXT_TENSORS.items():
        if tower == "t" and rest.startswith(prefix + "."):
            return _under(tower, gguf.TENSOR_NAMES[kind] + rest[len(prefix):])
    found = tensor_map.get_type_and_name(LOOKUP_PREFIX + rest, try_suffixes=(".weight", ".bias"))
    if found is None:
        return None
    kind, name = found
    if kind in LEGACY_SWAP:
        base = gguf.TENSOR_NAMES[kind].format(bid=bid)
        name = gguf.TENSOR_NAMES[LEGACY_SWAP[kind]].format(bid=bid) + name[len(base):]
    return _under(tower, name)


def tower_rules(keys: list[str], prefix: str, tower: str, layers: int, *, keep_layers: int | None = None,
                drop_post_norm: str = "") -> list[Rule]:
    """Rules for one CLIP tower's tensors (``prefix`` + transformers names) to ``v.*`` / ``t.*``.

    Args:
        keys: the source's tensor names (others are ignored).
        prefix: where the tower sits in the source (``vision_model.``, ``vision_tower.vision_model.``).
        tower: ``"v"`` or ``"t"``.
        layers: the tower's ``num_hidden_layers`` (for gguf-py's table, built fresh here).
        keep_layers: write only layers below this (LLaVA: the feature layer); the rest are dropped.
        drop_post_norm: drop the post-layernorm, for this reason (LLaVA never applies it).
    """
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, layers)
    rules: list[Rule] = []
    for key in keys:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        layer = LAYER.match(rest)
        if rest.endswith("position_ids"):
            rules.append(drop(key, why="a buffer of positions 0..n-1 that clip.cpp rebuilds"))
        elif keep_layers is not None and layer and int(layer.group(1)) >= keep_layers:
            rules.append(drop(key, why=f"layer {layer.group(1)} comes after the feature layer: LLaVA never runs it"))
        elif drop_post_norm and rest.startswith("post_layernorm."):
            rules.append(drop(key, why=drop_post_norm))
        elif (name := gguf_name(tensor_map, rest, tower)) is not None:
            rules.append(rename(key, name))
    return rules  # a tensor gguf-py cannot name is left unclaimed: the plan reports it


def use_gelu(act: str, where: str) -> bool:
    if act not in USE_GELU:
        raise ConfigError(f"{where}: hidden_act {act!r}; clip.cpp runs gelu or quick_gelu (clip.use_gelu)",
                          hint="this tower cannot run in llama.cpp's CLIP graph")
    return USE_GELU[act]


def write_vision(w: gguf.GGUFWriter, vision, *, block_count: int, projection_dim: int, mean, std) -> None:
    """The ``clip.vision.*`` hyper-parameters, with gguf-py's typed calls."""
    w.add_vision_image_size(vision.image_size)
    w.add_vision_patch_size(vision.patch_size)
    w.add_vision_embedding_length(vision.hidden_size)
    w.add_vision_feed_forward_length(vision.intermediate_size)
    w.add_vision_projection_dim(projection_dim)
    w.add_vision_head_count(vision.num_attention_heads)
    w.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    w.add_vision_block_count(block_count)
    w.add_vision_image_mean(list(mean))
    w.add_vision_image_std(list(std))


def write_text(w: gguf.GGUFWriter, text, *, projection_dim: int, tokens) -> None:
    """The ``clip.text.*`` hyper-parameters (gguf-py's ``{arch}`` keys under ``clip.text``) and the tokens."""
    keys = gguf.Keys.LLM
    w.add_uint32(keys.CONTEXT_LENGTH.format(arch=TEXT_ARCH), text.max_position_embeddings)
    w.add_uint32(keys.EMBEDDING_LENGTH.format(arch=TEXT_ARCH), text.hidden_size)
    w.add_uint32(keys.FEED_FORWARD_LENGTH.format(arch=TEXT_ARCH), text.intermediate_size)
    w.add_uint32(TEXT_PROJECTION_DIM, projection_dim)
    w.add_uint32(gguf.Keys.Attention.HEAD_COUNT.format(arch=TEXT_ARCH), text.num_attention_heads)
    w.add_float32(gguf.Keys.Attention.LAYERNORM_EPS.format(arch=TEXT_ARCH), text.layer_norm_eps)
    w.add_uint32(keys.BLOCK_COUNT.format(arch=TEXT_ARCH), text.num_hidden_layers)
    w.add_token_list(list(tokens))


def image_stats(stored: dict, options: GGUFOptions, where: object) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean/std: ``--image-mean/--image-std``, else the preprocessor's (``stored``), else OpenAI CLIP's."""
    mean = tuple(float(v) for v in (options.image_mean or stored.get("image_mean") or OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in (options.image_std or stored.get("image_std") or OPENAI_CLIP_STD))
    for what, values in (("image mean", mean), ("image std", std)):
        if len(values) != 3:
            raise ConfigError(f"{where}: the {what} has {len(values)} values; clip.cpp needs one per RGB channel",
                              hint="pass --image-mean R G B / --image-std R G B")
    if any(s <= 0 for s in std):
        raise ConfigError(f"{where}: image std {list(std)} has a value <= 0",
                          hint="pass --image-std R G B with positive values")
    return mean, std


def read_preprocessor(folder: Path) -> dict:
    file = folder / "preprocessor_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


VARIANTS = {  # (text, vision) -> file name part and general.description, as the legacy converter names them
    (True, True): ("", "two-tower CLIP model"),
    (True, False): ("text-", "text-only CLIP model"),
    (False, True): ("vision-", "vision-only CLIP model"),
}


def conversion(path: Path, options: LoadOptions, gguf_options: GGUFOptions) -> GGUFConversion:
    """A ``CLIPModel`` folder as one GGUF file (two-tower, ``--text-only`` or ``--vision-only``).

    Raises:
        ConfigError: both ``--text-only`` and ``--vision-only``; an activation clip.cpp lacks;
            a text vocabulary that does not match the embedding rows; a bad mean/std.
    """
    from transformers import CLIPConfig

    if gguf_options.text_only and gguf_options.vision_only:
        raise ConfigError("--text-only and --vision-only exclude each other", hint="pass one of them, or neither")
    has_text, has_vision = not gguf_options.vision_only, not gguf_options.text_only
    config = CLIPConfig.from_pretrained(path)
    text, vision = config.text_config, config.vision_config
    source = open_source(path)
    keys = source.keys()
    mean, std = image_stats(read_preprocessor(path), gguf_options, f"{path}/preprocessor_config.json")
    acts = {}
    if has_vision:
        acts["vision_config"] = use_gelu(vision.hidden_act, f"{path}/config.json vision_config")
    if has_text:
        acts["text_config"] = use_gelu(text.hidden_act, f"{path}/config.json text_config")
    if len(set(acts.values())) > 1:
        raise ConfigError(f"{path}/config.json: the towers use different activations "
                          f"({vision.hidden_act} / {text.hidden_act}); a CLIP GGUF has one clip.use_gelu",
                          hint="write each tower on its own with --text-only / --vision-only")
    tokens = clip_bpe() if has_text else ()
    if has_text:
        rows = source.info("text_model.embeddings.token_embedding.weight").shape[0]
        if rows != len(tokens) or text.vocab_size != len(tokens):
            raise ConfigError(f"{path}: the text tower has {rows} embedding rows (vocab_size {text.vocab_size}) but "
                              f"CLIP's BPE vocabulary has {len(tokens)} tokens",
                              hint="only CLIP's own BPE vocabulary is known; "
                                   "pass --vision-only to leave the text tower out")
    rules = [drop("logit_scale", why="the contrastive temperature: not part of either tower")]
    for on, prefix, tower, projection, cfg, flag in (
            (has_vision, "vision_model.", "v", "visual_projection.weight", vision, "--text-only"),
            (has_text, "text_model.", "t", "text_projection.weight", text, "--vision-only")):
        if on:
            rules += tower_rules(keys, prefix, tower, cfg.num_hidden_layers)
            rules.append(rename(projection, projection))  # the legacy layout keeps the transformers name
        else:
            rules += [drop(prefix + "{rest:path}", why=f"{flag}: this tower is not written"),
                      drop(projection, why=f"{flag}: this tower is not written")]
    part, description = VARIANTS[(has_text, has_vision)]
    projection_dim = config.projection_dim

    def metadata(w: gguf.GGUFWriter, asked: GGUFType) -> None:
        w.add_bool(HAS_TEXT_ENCODER, has_text)
        w.add_clip_has_vision_encoder(has_vision)
        w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, False)
        w.add_file_type(asked.file_type)
        w.add_description(description)
        if has_text:
            write_text(w, text, projection_dim=getattr(text, "projection_dim", None) or projection_dim, tokens=tokens)
        if has_vision:
            write_vision(w, vision, block_count=vision.num_hidden_layers,
                         projection_dim=getattr(vision, "projection_dim", None) or projection_dim, mean=mean, std=std)
        w.add_vision_use_gelu(next(iter(acts.values())))

    name = re.sub(r"[^\w.-]+", "-", path.resolve().name)
    file = GGUFFile(f"{name}-{part}{{type}}.gguf", "clip", rules, metadata, types=type_rules())
    towers = [f"vision tower ({vision.num_hidden_layers} layers, image mean {list(mean)})"] if has_vision else []
    towers += [f"text tower ({text.num_hidden_layers} layers, {len(tokens)} BPE tokens)"] if has_text else []
    return GGUFConversion(source, [file], summary=f"CLIP: {' + '.join(towers)}")
