"""LLaVA-1.5 / NeXT as the two GGUF files llama.cpp's multimodal tools take (``-m`` and ``--mmproj``).

Every input is first put in the published transformers names, then planned to GGUF names:

* an original checkpoint of any form (``checkpoint.open_original``): the first stage IS the
  ``--to hf`` conversion's checked plan (LoRA merged by its merge op, the vocabulary grown
  with the same seeded rows), read through ``PlannedSource``: nothing is read twice, and the
  GGUF holds exactly what the transformers folder would;
* a transformers ``Llava`` / ``LlavaNext`` folder, in any layout transformers writes (``layout``);
* a ``llava.projector`` file (``llava_surgery.py``'s output) with ``--vision-tower``: mmproj only.

The language model: llama.cpp's architecture for the backbone (``backbones.Backbone.gguf_arch``), names from
gguf-py's ``TensorNameMap``, q/k rows in llama.cpp's RoPE order, the SentencePiece vocabulary
with real scores padded to the embedding rows, the chat template of the original
conversation template. The mmproj: the CLIP tower up to the feature layer in the legacy
layout (``families/clip/gguf_export.py``), the projector as ``mm.0`` / ``mm.2``, always
``clip.vision.feature_layer`` (without it llama.cpp runs one block too few, llama.cpp
#25817), ``v.image_newline`` and the grid pinpoints for NeXT, the image mean/std.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ...conversion import Conversion, Custom, drop, rename, transform
from ...conversion.engine import plan_for
from ...conversion.gguf_sink import GGUFConversion, GGUFFile, GGUFOptions, GGUFType
from ...conversion import gguf_vocab
from ...conversion.rules import Rule
from ...conversion.staged import PlannedSource
from ...errors import ConfigError
from ...options import LoadOptions, read_json
from ...runtime import images, templates
from ...tensors import TensorSource, open_source
from ...tensors.torch_io import TorchSource
from ...tensors.views import CombinedSource, RenamedSource
from ..clip import gguf_export as clip_gguf
from . import backbones, layout

MT = gguf.MODEL_TENSOR


ARCHS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}  # "llama" -> gguf.MODEL_ARCH.LLAMA
PROJECTOR_TYPE = "mlp"  # clip.cpp PROJECTOR_TYPE_MLP: mm.0 -> GELU -> mm.2 (gguf-py has no constant for it)
# transformers' linear_1 / linear_2 -> the original Sequential indices clip.cpp reads (TN_LLAVA_PROJ "mm.%d")
PROJECTOR_INDEX = {1: 0, 2: 2}
# published names gguf-py knows under the original code's name
NAME_ALIASES = {"image_newline": "model.image_newline"}
LM = "language_model."
TOWER = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
POST_NORM_WHY = "LLaVA takes the feature layer's hidden state; CLIP's post-layernorm is never applied"


@dataclass
class Tokenizer:
    """What the language-model GGUF needs of the tokenizer."""

    folder: Path  # holds tokenizer.model or tokenizer.json
    added: dict[str, int]
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


@dataclass
class Llava:
    """A LLaVA model in the published transformers names, with the facts its two GGUF files need."""

    path: Path
    source: TensorSource
    vision: object  # CLIPVisionConfig
    feature_layer: int
    strategy: str  # transformers' vision_feature_select_strategy
    projector_act: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    text: object | None = None  # transformers text config; None: no language model (a llava.projector input)
    backbone: backbones.Backbone | None = None  # the language model's row (None: not a known backbone)
    tokenizer: Tokenizer | None = None
    pinpoints: list[list[int]] | None = None  # (width, height), the original's and clip.cpp's order
    merge_type: str | None = None
    template: str = ""
    what: str = ""
    notes: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)  # the original checkpoint's (see checkpoint.py)

    @property
    def is_next(self) -> bool:
        return self.pinpoints is not None

    @property
    def run_layers(self) -> int:
        """Vision blocks LLaVA runs: the feature layer as a non-negative ``hidden_states`` index."""
        n = self.vision.num_hidden_layers
        return n + self.feature_layer + 1 if self.feature_layer < 0 else self.feature_layer


# ----------------------------------------------------------------------------- inputs


def _tokenizer_flags(folder: Path) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS: a byte-level BPE says so by its post-processor (Llama 3 wraps every
    text in <|begin_of_text|>, Qwen2 adds nothing), a SentencePiece LLaMA by ``tokenizer_config.json``."""
    from ...runtime.vocab import kind_of, open_vocab

    if kind_of(folder) == "bpe":
        vocab = open_vocab(folder, "bpe")
        return vocab.add_bos, vocab.add_eos
    file = folder / "tokenizer_config.json"
    data = json.loads(file.read_text()) if file.is_file() else {}
    return data.get("add_bos_token", True) is not False, bool(data.get("add_eos_token", False))


def from_original(path: Path, options: LoadOptions, gguf_options: GGUFOptions) -> Llava:
    """An original checkpoint: the ``--to hf`` conversion's own plan, read as the first stage."""
    from . import convert, hf_output, onevision
    from .checkpoint import open_original

    if not gguf_options.text_only and (path / "config.json").is_file():
        check_image_path(path, read_json(path / "config.json"))
    ckpt = open_original(path, options)
    check_backbone(ckpt.row, ckpt.row.hf_model_type, path)
    kind = ckpt.config.get("mm_projector_type", "linear")
    if kind != "mlp2x_gelu":
        raise ConfigError(f"{path}/config.json: mm_projector_type {kind!r}; llama.cpp's LLaVA graph (projector type "
                          f"'{PROJECTOR_TYPE}') runs Linear -> GELU -> Linear, i.e. mlp2x_gelu only",
                          hint="this projector cannot run in llama.cpp; convert with --to hf instead")
    if onevision.is_onevision(ckpt):  # only --text-only gets here (check_image_path): the Qwen2 language model
        hf, tok, template, _ = onevision.target(ckpt, options)
        first, chat, act = onevision.tensors(ckpt, hf, seed=options.seed), onevision.chat_template(ckpt, template), "gelu"
    else:
        target = hf_output.target_for(ckpt, options)
        rows = target.hf_config.text_config.vocab_size
        convert._check_vocabulary(ckpt, target)
        rules, act = convert.rules_for(ckpt, rows, options.seed)
        first = Conversion(ckpt.source, rules, expected=convert.expected_tensors(target.hf_config))
        hf, tok, template, chat = target.hf_config, target.tokenizer, target.template, target.processor.chat_template
    source = PlannedSource(plan_for(first), ckpt.source)
    add_bos, add_eos = _tokenizer_flags(ckpt.tokenizer_folder)
    mean, std = clip_gguf.image_stats(ckpt.preprocessor, gguf_options, f"{path} (vision tower preprocessor)")
    return Llava(
        path, source, hf.vision_config, hf.vision_feature_layer, hf.vision_feature_select_strategy, act, mean, std,
        text=hf.text_config, backbone=ckpt.row,
        tokenizer=Tokenizer(ckpt.tokenizer_folder, dict(tok.get_added_vocab()), tok.pad_token_id, add_bos, add_eos,
                            chat),
        pinpoints=[list(p) for p in images.ImageConfig.from_original(ckpt.config, ckpt.preprocessor).grid_pinpoints]
        if ckpt.is_next else None,
        merge_type=ckpt.config.get("mm_patch_merge_type") if ckpt.is_next else None,
        template=template, notes=list(ckpt.notes), assumptions=list(ckpt.assumptions),
        what=f"original {ckpt.form} checkpoint, {ckpt.backbone} backbone")


def _added_tokens(folder: Path) -> dict[str, int]:
    added: dict[str, int] = {}
    if (folder / "tokenizer.json").is_file():
        data = read_json(folder / "tokenizer.json")
        added.update({t["content"]: int(t["id"]) for t in data.get("added_tokens", [])})
    if (folder / "added_tokens.json").is_file():
        added.update(json.loads((folder / "added_tokens.json").read_text()))
    return added


def from_transformers(path: Path, options: LoadOptions, gguf_options: GGUFOptions) -> Llava:
    """A transformers ``Llava`` / ``LlavaNext`` folder."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    source = layout.published(open_source(path))  # any layout transformers writes
    has_model = (path / "tokenizer.model").is_file()
    tokenizer_folder = path if has_model or not options.model_base else Path(options.model_base)
    add_bos, add_eos = _tokenizer_flags(path)
    template = templates.read_chat_template(path)
    mean, std = clip_gguf.image_stats(clip_gguf.read_preprocessor(path), gguf_options,
                                      f"{path}/preprocessor_config.json")
    is_next = config.model_type == "llava_next"
    pad = getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else getattr(config.text_config, "pad_token_id", None)
    return Llava(
        path, source, config.vision_config, config.vision_feature_layer, config.vision_feature_select_strategy,
        config.projector_hidden_act, mean, std, text=config.text_config,
        backbone=backbones.of_model_type(config.text_config.model_type, tokenizer_folder),
        tokenizer=Tokenizer(tokenizer_folder, _added_tokens(path), pad, add_bos, add_eos, template),
        # transformers lists canvases as (height, width); clip.cpp, like the original, reads (width, height)
        pinpoints=[[w, h] for h, w in config.image_grid_pinpoints] if is_next else None,
        merge_type="spatial_unpad" if is_next else None,  # transformers' LlavaNext always unpads with image_newline
        template=templates.marked_name(template) or "", what=f"transformers {type(config).__name__} folder")


def from_projector_file(path: Path, options: LoadOptions, gguf_options: GGUFOptions) -> Llava:
    """A ``llava.projector`` file (``llava_surgery.py``) + ``--vision-tower``: the mmproj only.

    Facts no file holds come from ``--config`` (a transformers Llava config): ``vision_feature_layer``
    (default -2, LLaVA-1.5/1.6's ``mm_vision_select_layer``) and, for a NeXT projector (one
    with ``model.image_newline``), ``image_grid_pinpoints``.
    """
    from transformers import AutoConfig

    if not options.vision_tower:
        raise ConfigError(f"{path} holds only the projector; the mmproj also needs the CLIP vision tower",
                          hint="pass --vision-tower CLIP_FOLDER (e.g. clip-vit-large-patch14-336)")
    overrides = options.config or {}
    projector = TorchSource(path, [path])
    names = {"model.mm_projector.0": PROJECTOR + "linear_1", "model.mm_projector.2": PROJECTOR + "linear_2",
             "model.image_newline": "image_newline"}
    mapping = {}
    for name in projector.keys():
        head = next((k for k in names if name == k or name.startswith(k + ".")), None)
        if head is None:
            raise ConfigError(f"{path}: tensor '{name}' is not part of an mlp2x_gelu projector "
                              "(model.mm_projector.0/2.*, model.image_newline)",
                              hint="llama.cpp's LLaVA graph runs Linear -> GELU -> Linear projectors only")
        mapping[name] = names[head] + name[len(head):]
    tower_folder = Path(options.vision_tower)
    clip = open_source(tower_folder)
    tower = RenamedSource(clip, {n: (TOWER + n[len("vision_model."):]) if n.startswith("vision_model.")
                                 else "clip_unused." + n for n in clip.keys()})
    source = CombinedSource([("", RenamedSource(projector, mapping)), ("", tower)], path=path)
    vision = AutoConfig.from_pretrained(tower_folder)
    vision = getattr(vision, "vision_config", vision)
    mean, std = clip_gguf.image_stats(clip_gguf.read_preprocessor(tower_folder), gguf_options,
                                      f"{tower_folder}/preprocessor_config.json")
    is_next = "image_newline" in source.keys()
    pinpoints = overrides.get("image_grid_pinpoints")
    if is_next and not pinpoints:
        raise ConfigError(f"{path} has model.image_newline (a LLaVA-NeXT projector) but no grid pinpoints are known",
                          hint='pass --config FILE with {"image_grid_pinpoints": [[336, 672], ...]} '
                               "from the model's config.json")
    return Llava(path, source, vision, overrides.get("vision_feature_layer", -2), "default", "gelu", mean, std,
                 pinpoints=pinpoints if is_next else None, merge_type="spatial_unpad" if is_next else None,
                 what="llava.projector + CLIP tower",
                 notes=[f"vision_feature_layer {overrides.get('vision_feature_layer', -2)} "
                        "(LLaVA-1.5/1.6's; --config overrides it)"])


# ------------------------------------------------------------------------- checks


def check_backbone(backbone: backbones.Backbone | None, model_type: str, where: object) -> None:
    """Refuse a language model llama.cpp (or vlmkit's export) has no architecture for."""
    if backbone is None or backbone.gguf_arch is None:
        has = (f"llama.cpp has an architecture '{model_type}' but vlmkit's GGUF export does not write it yet"
               if model_type in ARCHS else f"llama.cpp has no architecture for the backbone '{model_type}'")
        writes = [row.name for row in backbones.ROWS.values() if row.gguf_arch]
        raise ConfigError(f"{where}: {has}", hint=f"vlmkit writes GGUF for LLaVA with a {' or '.join(writes)} backbone")


def check_image_path(path: Path, config: dict) -> None:
    """Refuse the mmproj of an ``anyres_max_N`` checkpoint (LLaVA-OneVision, LLaVA-Video), from its config alone.

    The bundled llama.cpp's multimodal tools have no ``anyres_max`` (no shrinking of the tile grid),
    and no LLaVA graph applies ``spatial_unpad`` or ``image_newline`` (the field is parsed, then only
    reported); its slicer would feed each tile alone, so the image tokens would not be the original's.
    """
    from .anyres_max import max_patches

    aspect = config.get("image_aspect_ratio")
    if max_patches(aspect) is None:
        return
    raise ConfigError(f"{path}/config.json: image_aspect_ratio {aspect!r} (mm_patch_merge_type "
                      f"{config.get('mm_patch_merge_type')!r}): llama.cpp's multimodal tools have no anyres_max "
                      "down-scaling and no LLaVA graph unpads the tile grid or adds image_newline, so an mmproj "
                      "would not give the original's image tokens",
                      hint="convert with --to hf instead: llama.cpp cannot run this image path (--to gguf "
                           "--text-only writes the language model alone)")


def _check_vision(llava: Llava) -> None:
    """The mmproj's side of ``check_runnable``."""
    where = llava.path
    if llava.projector_act != "gelu" or not all(f"{PROJECTOR}linear_{i}.weight" in llava.source.keys() for i in (1, 2)):
        raise ConfigError(f"{where}: the projector is not Linear -> GELU -> Linear (activation "
                          f"{llava.projector_act!r}); llama.cpp's LLaVA graph (projector type '{PROJECTOR_TYPE}') "
                          "runs only that", hint="this projector cannot run in llama.cpp; convert with --to hf instead")
    if llava.strategy != "default":
        raise ConfigError(f"{where}: vision_feature_select_strategy {llava.strategy!r} (mm_vision_select_feature "
                          "cls_patch) keeps the CLS position; clip.cpp always drops it",
                          hint="only 'patch' (transformers: 'default') LLaVA models run in llama.cpp")
    if not isinstance(llava.feature_layer, int):
        raise ConfigError(f"{where}: vision_feature_layer {llava.feature_layer!r}; LLaVA uses one layer",
                          hint="pass --config with an integer vision_feature_layer")
    n = llava.vision.num_hidden_layers
    if not -n - 1 <= llava.feature_layer <= n or llava.run_layers < 1:
        raise ConfigError(f"{where}: vision_feature_layer {llava.feature_layer} is outside the tower's {n} layers")
    clip_gguf.use_gelu(llava.vision.hidden_act, f"{where}: vision tower")


def check_runnable(llava: Llava, *, text_only: bool = False) -> None:
    """Refuse what llama.cpp's LLaVA graph cannot run, before anything is read (``text_only``: the language model's
    side only).

    Raises:
        ConfigError: naming the field, the value and what llama.cpp runs.
    """
    where = llava.path
    if not text_only:
        _check_vision(llava)
    if llava.text is None:
        return
    check_backbone(llava.backbone, llava.text.model_type, where)
    rope = getattr(llava.text, "rope_parameters", None) or getattr(llava.text, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{where}: rope scaling {rope} is not written to GGUF yet",
                          hint="only LLaVA models with plain RoPE are exported")
    embed, head = LM + "model.embed_tokens.weight", LM + "lm_head.weight"
    rows = llava.source.info(embed).shape[0]
    head_rows = llava.source.info(head).shape[0] if head in llava.source.keys() else rows
    if not rows == head_rows == llava.text.vocab_size:
        raise ConfigError(f"{where}: the vocabulary does not match: embed_tokens has {rows} rows, lm_head {head_rows}, "
                          f"text_config.vocab_size is {llava.text.vocab_size}",
                          hint="the weights and config.json come from different models")


# -------------------------------------------------------------------------- rules


def rope_permute(heads: int) -> Custom:
    """q/k rows from the transformers (half-split) RoPE order to llama.cpp's interleaved order, and back."""

    def forward(tensors):
        (w,) = tensors
        return [w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)]

    def backward(tensors):
        (w,) = tensors
        return [w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)]

    def shapes(s):
        (shape,) = s
        if shape[0] % (2 * heads):
            raise ValueError(f"{shape[0]} rows do not split into {heads} heads of RoPE pairs")
        return [shape]

    inverse = Custom(f"transformers RoPE order ({heads} heads)", backward, shapes)
    return Custom(f"llama.cpp RoPE order ({heads} heads)", forward, shapes, inverse_op=inverse)


def lm_rules(llava: Llava) -> list[Rule]:
    """The language model's tensors -> llama.cpp names (a fresh ``TensorNameMap``), q/k permuted."""
    text, backbone = llava.text, llava.backbone
    tensor_map = gguf.get_tensor_name_map(ARCHS[backbone.gguf_arch], text.num_hidden_layers)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    ops = {MT.ATTN_Q: (rope_permute(text.num_attention_heads),), MT.ATTN_K: (rope_permute(kv_heads),)} \
        if backbone.permute_qk else {}
    rules = [drop(TOWER + "{rest:path}", why="the vision tower goes into the mmproj file"),
             drop(PROJECTOR + "{rest:path}", why="the projector goes into the mmproj file"),
             drop("image_newline", why="goes into the mmproj file"),
             drop(LM + "model.layers.{layer}.self_attn.rotary_emb.inv_freq", why="llama.cpp recomputes it")]
    for key in llava.source.keys():
        found = tensor_map.get_type_and_name(key[len(LM):], try_suffixes=(".weight", ".bias")) \
            if key.startswith(LM) else None
        if found:
            kind, name = found
            rules.append(transform(key, name, *ops.get(kind, ())))
    return rules  # tensors gguf-py cannot name stay unclaimed: the plan lists them


def mmproj_rules(llava: Llava) -> list[Rule]:
    """Tower (legacy layout, up to the feature layer), projector (``mm.0`` / ``mm.2``), ``v.image_newline``."""
    keys = llava.source.keys()
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, llava.vision.num_hidden_layers)
    rules = [drop(LM + "{rest:path}", why="the language model goes into its own file"),
             drop("clip_unused.{rest:path}", why="only CLIP's vision tower is part of LLaVA")]
    rules += clip_gguf.tower_rules(keys, TOWER, "v", llava.vision.num_hidden_layers, keep_layers=llava.run_layers,
                                   drop_post_norm=POST_NORM_WHY)
    for key in keys:
        found = tensor_map.get_type_and_name(NAME_ALIASES.get(key, key), try_suffixes=(".weight", ".bias"))
        if found is None or not key.startswith((PROJECTOR, "image_newline")):
            continue
        kind, name = found
        if kind == MT.V_MMPROJ:
            bid = int(re.match(r"multi_modal_projector\.linear_(\d+)\.", key).group(1))
            if bid not in PROJECTOR_INDEX:
                continue  # unclaimed: the plan names it
            base = gguf.TENSOR_NAMES[kind].format(bid=bid)
            name = gguf.TENSOR_NAMES[kind].format(bid=PROJECTOR_INDEX[bid]) + name[len(base):]
        rules.append(rename(key, name))
    return rules


# ----------------------------------------------------------------------- metadata


def _lm_metadata(llava: Llava, vocab: gguf_vocab.Vocab):
    text = llava.text
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rope = getattr(text, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    params = sum(llava.source.info(k).numel for k in llava.source.keys() if k.startswith(LM))

    def write(w: gguf.GGUFWriter, asked: GGUFType) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_size_label(gguf.size_label(params, 0, 0, 0))
        w.add_block_count(text.num_hidden_layers)
        w.add_context_length(text.max_position_embeddings)
        w.add_embedding_length(text.hidden_size)
        w.add_feed_forward_length(text.intermediate_size)
        w.add_head_count(heads)
        w.add_head_count_kv(getattr(text, "num_key_value_heads", None) or heads)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(text.rms_norm_eps)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_file_type(asked.file_type)
        w.add_vocab_size(len(vocab))
        w.add_rope_dimension_count(head_dim)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok = llava.tokenizer
        gguf_vocab.write_vocab(w, llava.backbone.gguf_vocab, vocab, pad=tok.pad, add_bos=tok.add_bos,
                               add_eos=tok.add_eos, chat_template=tok.chat_template)

    return write


def _mmproj_metadata(llava: Llava):
    vision = llava.vision
    projection_dim = getattr(vision, "projection_dim", None) or 768

    def write(w: gguf.GGUFWriter, asked: GGUFType) -> None:
        w.add_bool(clip_gguf.HAS_TEXT_ENCODER, False)
        w.add_clip_has_vision_encoder(True)
        w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
        w.add_file_type(asked.file_type)
        w.add_description("image encoder for LLaVA")
        w.add_clip_projector_type(PROJECTOR_TYPE)
        clip_gguf.write_vision(w, vision, block_count=llava.run_layers, projection_dim=projection_dim,
                               mean=llava.mean, std=llava.std)
        if llava.pinpoints:
            w.add_array(clip_gguf.GRID_PINPOINTS, [int(v) for pair in llava.pinpoints for v in pair])
        if llava.merge_type:
            w.add_string(clip_gguf.PATCH_MERGE_TYPE, llava.merge_type)
        w.add_array(clip_gguf.FEATURE_LAYER, [llava.run_layers])  # always: llama.cpp #25817
        w.add_vision_use_gelu(clip_gguf.use_gelu(vision.hidden_act, str(llava.path)))

    return write


# ---------------------------------------------------------------------- conversion


def gguf_files(llava: Llava, gguf_options: GGUFOptions) -> list[GGUFFile]:
    """The language-model file (unless there is none or ``mmproj_only``) and the mmproj file (unless ``text_only``:
    the language model alone, e.g. OneVision's Qwen2, whose image path llama.cpp cannot run)."""
    if gguf_options.text_only and llava.text is None:
        raise ConfigError(f"{llava.path}: --text-only, but it holds no language model (a projector file)")
    check_runnable(llava, text_only=gguf_options.text_only)
    name = re.sub(r"[^\w.-]+", "-", llava.path.resolve().name.removesuffix(".projector"))
    files = []
    if llava.text is not None and not gguf_options.mmproj_only:
        rows = llava.source.info(LM + "model.embed_tokens.weight").shape[0]
        vocab = gguf_vocab.vocabulary(llava.backbone.gguf_vocab, llava.tokenizer.folder, llava.tokenizer.added, rows,
                                      pre=llava.backbone.gguf_pre)
        files.append(GGUFFile(f"{name}-{{type}}.gguf", llava.backbone.gguf_arch,
                              lm_rules(llava), _lm_metadata(llava, vocab)))
    if not gguf_options.text_only:
        files.append(GGUFFile(f"mmproj-{name}-{{type}}.gguf", "clip", mmproj_rules(llava), _mmproj_metadata(llava),
                              types=clip_gguf.type_rules(("v",))))
    return files


def is_transformers(config: dict | None) -> bool:
    return any(a in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
               for a in (config or {}).get("architectures") or [])


def open_input(path: Path, options: LoadOptions, gguf_options: GGUFOptions | None = None) -> Llava:
    """Any LLaVA input (original, transformers folder, ``llava.projector``) in the published names."""
    from .. import read_config

    gguf_options = gguf_options or GGUFOptions()
    if path.is_file() and path.suffix == ".projector":
        return from_projector_file(path, options, gguf_options)
    if is_transformers(read_config(path)):
        return from_transformers(path, options, gguf_options)
    return from_original(path, options, gguf_options)


def conversion(path: Path, options: LoadOptions, gguf_options: GGUFOptions) -> GGUFConversion:
    """The GGUF conversion of any LLaVA input (see the module docstring).

    Raises:
        ConfigError / CheckpointError / PlanError: before anything is read or written.
    """
    llava = open_input(path, options, gguf_options)
    files = gguf_files(llava, gguf_options)
    version = "NeXT" if llava.is_next else "1.5"
    parts = " + ".join("language model" if f.arch != "clip" else "mmproj" for f in files)
    summary = (f"LLaVA-{version} ({llava.what}) -> {parts}"
               f"; vision feature layer {llava.feature_layer} = {llava.run_layers} of {llava.vision.num_hidden_layers} "
               f"CLIP blocks" + (f"; template {llava.template}" if llava.template else "")
               + "".join(f"; {n}" for n in llava.notes) + "".join(f"; assumed {a}" for a in llava.assumptions))
    return GGUFConversion(llava.source, files, summary=summary, assumptions=list(llava.assumptions))
