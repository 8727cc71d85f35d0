"""The original LLaVA checkpoint forms, presented as one namespace.

The original code (``llava/model/builder.py``) assembles a model from parts, and so does
this module, without loading anything:

* full: ``model.*``, ``lm_head.weight``, ``model.mm_projector.*`` (+ for NeXT
  ``model.image_newline`` and the tower under ``model.vision_tower.vision_tower.*``);
* projector-only (stage 1): ``mm_projector.bin`` + the base LLM (``--model-base``);
* LoRA: the base LLM + ``non_lora_trainables.bin`` (which overrides it) + the adapter;
* plain LLM (training's start from scratch): a transformers causal LM + a CLIP folder, no projector yet.

Whatever the form, the result is the namespace of a full checkpoint, with the CLIP
tower under ``model.vision_tower.vision_tower.vision_model.*`` and LoRA factors beside
the weight they modify (``model.layers.0.self_attn.q_proj.lora_A.weight``), so one rule
set converts them all and one reference model runs them all.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import CheckpointError, ConfigError
from ...options import LoadOptions, read_json
from ...tensors import FLOAT_CODES, TensorSource, open_source, resolve
from ...tensors.views import CombinedSource, RenamedSource
from . import backbones, siglip
from .towers import CLIP_MEAN, CLIP_STD, known_tower

TOWER = "model.vision_tower.vision_tower.vision_model."
UNUSED_CLIP = "clip_unused."  # the CLIP folder's text tower etc.: dropped by rule, with the reason
# Fields of the original config that describe the multimodal parts, not the language model.
MULTIMODAL_FIELDS = {
    "mm_vision_tower", "vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "image_aspect_ratio",
    "mm_patch_merge_type", "image_grid_pinpoints", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "use_mm_proj", "mm_projector_lr", "mm_vision_tower_lr",
    "image_crop_resolution", "image_split_resolution", "tokenizer_model_max_length", "tokenizer_padding_side",
    "mm_resampler_type", "mm_mask_type", "mm_spatial_pool_mode", "mm_tunable_parts", "s2", "s2_scales", "architectures", "model_type", "_name_or_path",
    "transformers_version", "torch_dtype", "dtype", "max_length", "pretraining_tp", "use_cache",
}
PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass
class LoraInfo:
    scale: float
    modules: list[str]  # module paths with {layer}, e.g. "model.layers.{layer}.self_attn.q_proj"
    adapter_config: dict
    base_dtype: str = "F32"  # the base model's dtype: what a merge writes unless --dtype says otherwise


@dataclass
class OriginalCheckpoint:
    """An original LLaVA checkpoint of any form, ready to convert or to run."""

    path: Path
    form: str  # "full" | "projector" | "lora" | "plain_llm" (training's new LLaVA)
    config: dict  # the original config.json
    source: TensorSource  # the full-checkpoint namespace (see module docstring)
    tokenizer_folder: Path
    backbone: str  # the language model's row in ``backbones.ROWS``
    vision_config: dict  # CLIPVisionConfig fields, or SiglipVisionConfig's of the trimmed tower (siglip.py)
    preprocessor: dict  # the tower's preprocessor_config.json fields
    lora: LoraInfo | None = None
    notes: list[str] = field(default_factory=list)
    # values no file of the original states (from --config or --assume-clip-defaults), each with its origin
    assumptions: list[str] = field(default_factory=list)

    @property
    def row(self) -> backbones.Backbone:
        return backbones.ROWS[self.backbone]

    @property
    def is_next(self) -> bool:
        return self.config.get("image_aspect_ratio") == "anyres"

    @property
    def projector_depth(self) -> int:
        """Number of Linear layers of the projector (0 for identity)."""
        kind = self.config.get("mm_projector_type", "linear")
        if kind == "linear":
            return 1
        if kind == "identity":
            return 0
        return int(PROJECTOR.match(kind).group(1))


def form_of(path: Path) -> str | None:
    """Which original form a folder holds, from its files alone."""
    if not path.is_dir():
        return None
    if (path / "adapter_config.json").exists() and (path / "non_lora_trainables.bin").exists():
        return "lora"
    if (path / "mm_projector.bin").exists():
        return "projector"
    config = path / "config.json"
    if config.exists():
        data = read_json(config)
        if "mm_vision_tower" in data or any(a in backbones.ARCHITECTURES for a in data.get("architectures") or []):
            return "full"
    return None


def is_plain_llm(config: dict | None) -> bool:
    """A transformers causal LM's config (Vicuna, Mistral ...), not a LLaVA's: what a new LLaVA starts from."""
    config = config or {}
    return backbones.of_plain(config) is not None and "mm_vision_tower" not in config


def open_original(path: Path, options: LoadOptions) -> OriginalCheckpoint:
    """Open an original checkpoint of any form; checks everything that can be checked without data.

    Raises:
        ConfigError / CheckpointError: naming the missing part, the field or the file, and the flag that fixes it.
    """
    form = form_of(path)
    if form is None:
        raise CheckpointError(f"{path}: not an original LLaVA checkpoint (no config.json with mm_* fields, "
                              "mm_projector.bin or adapter_config.json + non_lora_trainables.bin)")
    config = read_json(path / "config.json")
    _check_multimodal_fields(path, config)
    notes: list[str] = []
    lora = None
    if form == "full":
        llm, tokenizer_folder = open_source(path), path
    else:
        base = _model_base(path, form, config, options)
        llm, tokenizer_folder = open_source(base), base
        if form == "projector":
            projector = open_source(path / "mm_projector.bin")
            llm = CombinedSource([("", llm), ("", projector)], path=path)
        else:
            llm, lora = _with_lora(path, llm, notes)
    backbone = backbones.backbone_of(config, path, tokenizer_folder).name
    kind, kind_note = siglip.tower_kind(config.get("mm_vision_tower") or config.get("vision_tower"))
    notes += [n for n in (kind_note,) if n]
    if kind == "siglip":  # LLaVA-NeXT's SigLIP tower: its own config rule, always inside the checkpoint here
        name = config.get("mm_vision_tower") or config.get("vision_tower")
        if options.vision_tower:
            raise ConfigError(f"{path}/config.json: mm_vision_tower '{name}' is a SigLIP tower, read from the "
                              "checkpoint as the original builds it; --vision-tower names a CLIP tower",
                              hint="leave out --vision-tower")
        vision_config, preprocessor, assumptions = siglip.tower_config(
            name, llm, TOWER, (options.config or {}).get("vision_config") or {})
        notes += [n for n in (siglip.select_layer_note(config),) if n]
        _check_tower(path, config, vision_config)
        return OriginalCheckpoint(path, form, config, llm, tokenizer_folder, backbone, vision_config, preprocessor,
                                  lora, notes, assumptions)
    tower = _tower_folder(path, config, options, inside=any(k.startswith(TOWER) for k in llm.keys()))
    if tower.note:
        notes.append(tower.note)
    elif tower.folder is None and known_tower(tower.name) is not None:
        notes.append(f"vision tower config from vlmkit's table of released towers ({tower.name})")
    parts: list[tuple[str, TensorSource]] = [("", llm)]
    if tower.folder is not None and not any(k.startswith(TOWER) for k in llm.keys()):
        parts.append(("", _tower_source(tower.folder)))
    source = CombinedSource(parts, path=path) if len(parts) > 1 else llm
    vision_config, preprocessor, assumptions = _vision_config(source, tower, options)
    _check_tower(path, config, vision_config)
    return OriginalCheckpoint(path, form, config, source, tokenizer_folder, backbone, vision_config, preprocessor,
                              lora, notes, assumptions)


def open_composed(path: Path, config: dict, options: LoadOptions, backbone: backbones.Backbone) -> OriginalCheckpoint:
    """A plain language model + the vision tower ``config`` names: form ``plain_llm``, no projector yet.

    Args:
        config: the LLaVA config made for it (``train_model.compose``); ``mm_hidden_size`` comes from the tower.
        backbone: the language model's row.
    """
    _check_multimodal_fields(path, config)
    tower = _tower_folder(path, config, options, inside=False)
    source = CombinedSource([("", open_source(path)), ("", _tower_source(tower.folder))], path=path)
    vision_config, preprocessor, assumptions = _vision_config(source, tower, options)
    config = {**config, "mm_hidden_size": vision_config["hidden_size"]}
    return OriginalCheckpoint(path, "plain_llm", config, source, path, backbone.name, vision_config, preprocessor,
                              assumptions=assumptions)


def _check_multimodal_fields(path: Path, config: dict) -> None:
    kind = config.get("mm_projector_type", "linear")
    if kind not in ("linear", "identity") and not PROJECTOR.match(kind):
        raise ConfigError(f"{path}/config.json: unknown mm_projector_type {kind!r}",
                          hint="the original code knows linear, mlpNx_gelu (e.g. mlp2x_gelu) and identity")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ConfigError(f"{path}/config.json: mm_use_im_start_end / mm_use_im_patch_token checkpoints "
                          "(extra image tokens) are not supported; the released LLaVA-1.5/1.6 models set both false")
    if "mm_vision_select_layer" not in config:
        raise ConfigError(f"{path}/config.json: mm_vision_select_layer is missing",
                          hint="add it (LLaVA-1.5/1.6 use -2) or pass --config with it")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConfigError(f"{path}/config.json: mm_vision_select_feature {feature!r} is neither 'patch' nor 'cls_patch'")



def _model_base(path: Path, form: str, config: dict, options: LoadOptions) -> Path:
    what = "LoRA adapter" if form == "lora" else "projector-only checkpoint (mm_projector.bin)"
    if not options.model_base:
        trained_on = config.get("_name_or_path") or "?"
        if form == "lora":
            trained_on = read_json(path / "adapter_config.json").get("base_model_name_or_path", trained_on)
        raise ConfigError(f"{path} is a {what}: it needs the base language model it was trained on ({trained_on})",
                          hint="pass --model-base PATH (the base LLM folder, e.g. vicuna-7b-v1.5)")
    return resolve(options.model_base)


def _strip_training_prefixes(names: list[str]) -> dict[str, str]:
    """The original builder's renaming of non_lora_trainables keys, in its order."""
    mapping = {n: n[len("base_model."):] if n.startswith("base_model.") else n for n in names}
    if any(v.startswith("model.model.") for v in mapping.values()):
        mapping = {k: v[len("model."):] if v.startswith("model.") else v for k, v in mapping.items()}
    return mapping


def _with_lora(path: Path, base: TensorSource, notes: list[str]) -> tuple[TensorSource, LoraInfo]:
    adapter_config = read_json(path / "adapter_config.json")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}/adapter_config.json: peft_type {adapter_config.get('peft_type')!r} is not LORA")
    files = [path / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (path / f).exists()]
    if not files:
        raise CheckpointError(f"{path}: adapter_config.json but no adapter_model.safetensors / adapter_model.bin")
    adapter = open_source(files[0])
    non_lora = open_source(path / "non_lora_trainables.bin")
    overrides = RenamedSource(non_lora, _strip_training_prefixes(non_lora.keys()))
    replaced = set(overrides.keys()) & set(base.keys())
    if replaced:
        notes.append(f"non_lora_trainables.bin replaces {len(replaced)} base tensor(s), e.g. {sorted(replaced)[0]}")
    base_kept = RenamedSource(base, {n: n for n in base.keys() if n not in replaced})
    # peft names: base_model.model.<module>.lora_A.weight (older peft: ...lora_A.default.weight)
    lora_names = {}
    modules = set()
    for name in adapter.keys():
        m = re.match(r"^base_model\.model\.(.+)\.(lora_[AB])(?:\.default)?\.weight$", name)
        if not m:
            raise CheckpointError(f"{files[0]}: unexpected adapter tensor '{name}' (expected ...lora_A/lora_B.weight)")
        lora_names[name] = f"{m.group(1)}.{m.group(2)}.weight"
        modules.add(re.sub(r"\.layers\.\d+\.", ".layers.{layer}.", m.group(1)))
    missing = [w for n in lora_names.values() if (w := n.rsplit(".lora_", 1)[0] + ".weight") not in base.keys()]
    if missing:
        raise ConfigError(f"{path}: the adapter modifies '{missing[0]}' but the base model has no such weight",
                          hint="is --model-base the model this adapter was trained on?")
    rank, alpha = adapter_config.get("r", 8), adapter_config.get("lora_alpha", 8)
    scale = alpha / rank**0.5 if adapter_config.get("use_rslora") else alpha / rank
    combined = CombinedSource([("", base_kept), ("", overrides), ("", RenamedSource(adapter, lora_names))], path=path)
    # Adapters and non_lora_trainables.bin are often float32 or bfloat16 beside a float16 base (finetune_lora.sh):
    # the merged model takes the base's dtype, as the original builder loads everything into the base model.
    floats = Counter(base.info(n).dtype for n in base.keys() if base.info(n).dtype in FLOAT_CODES)
    base_dtype = floats.most_common(1)[0][0] if floats else "F32"
    return combined, LoraInfo(scale, sorted(modules), adapter_config, base_dtype)


@dataclass(frozen=True)
class TowerRef:
    """Where the vision tower is: its name as given, the flag or field that gave it, the local folder (if any)."""

    name: str | None
    given_by: str  # "--vision-tower" | "mm_vision_tower"
    folder: Path | None
    note: str = ""  # how a name that is not a path from here was found


def _beside_checkpoint(name: str, path: Path) -> list[Path]:
    """Where a tower path from the training machine may sit here: its tails under the checkpoint and its parent.

    ``./checkpoints/clip-vit-large-patch14-336`` was relative to the directory training ran in;
    a copied checkpoint folder usually has the tower beside it, so each tail of the path
    (longest first) is tried in the checkpoint's folder, then in its parent.
    """
    given = Path(name)
    parts = [p for p in given.parts if p not in (given.anchor, ".", "..")]
    root = path.resolve()
    return [base.joinpath(*parts[i:]) for base in (root, root.parent) for i in range(len(parts))]


def _tower_folder(path: Path, config: dict, options: LoadOptions, *, inside: bool) -> TowerRef:
    """The CLIP tower: ``--vision-tower``, else ``mm_vision_tower`` (a local path or a hub id).

    A name from the checkpoint is first a path from the working directory (as the original
    code reads it), then a path beside the checkpoint (``_beside_checkpoint``), then, for a
    tower inside the checkpoint whose name is a known release (``towers``), nothing more
    (its config is in the table), else a hub id.
    """
    given_by = "--vision-tower" if options.vision_tower else "mm_vision_tower"
    name = options.vision_tower or config.get("mm_vision_tower") or config.get("vision_tower")
    if name is None:
        if inside:
            return TowerRef(None, given_by, None)
        raise ConfigError(f"{path}/config.json names no vision tower (mm_vision_tower)",
                          hint="pass --vision-tower PATH (a CLIP folder)")
    local = Path(name).expanduser()
    if local.exists():
        return TowerRef(name, given_by, local)
    if not options.vision_tower:
        for candidate in _beside_checkpoint(name, path):
            if (candidate / "config.json").is_file():
                return TowerRef(name, given_by, candidate, f"mm_vision_tower '{name}' is not a path from here; "
                                                           f"used {candidate} beside the checkpoint")
    if inside and known_tower(name) is not None:
        return TowerRef(name, given_by, None)  # the config is in the table; the weights are in the checkpoint
    try:
        folder = resolve(name, allow_patterns=["*.json", "*.safetensors", "*.bin"] if not inside else ["*.json"])
    except Exception as e:  # noqa: BLE001 - a tower inside the checkpoint needs only its config: decided later
        if inside:
            return TowerRef(name, given_by, None)
        raise ConfigError(f"the vision tower '{name}' (from {given_by}) is not a local folder (also looked beside "
                          f"the checkpoint) and could not be fetched: {getattr(e, 'message', e)}",
                          hint="pass --vision-tower PATH (a local copy of the CLIP model)") from None
    return TowerRef(name, given_by, folder)


def _tower_source(folder: Path) -> TensorSource:
    """A CLIP folder's tensors named as the tower inside a LLaVA checkpoint; the rest kept for explicit drops."""
    source = open_source(folder)
    names = source.keys()
    bare = not any(n.startswith("vision_model.") for n in names)  # a CLIPVisionModel saved without the prefix
    mapping = {}
    for n in names:
        if n.startswith("vision_model."):
            mapping[n] = TOWER + n[len("vision_model."):]
        elif bare and n.split(".")[0] in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm"):
            mapping[n] = TOWER + n
        else:
            mapping[n] = UNUSED_CLIP + n
    return RenamedSource(source, mapping)


# What a CLIP config holds that no tensor shape does, and OpenAI CLIP's value of each: used only
# with --assume-clip-defaults, and then listed as assumptions wherever the result goes.
CLIP_DEFAULTS = {
    "num_attention_heads": ("OpenAI CLIP's 64-wide heads", lambda facts: max(1, facts["hidden_size"] // 64)),
    "hidden_act": ("OpenAI CLIP's activation", lambda facts: "quick_gelu"),
    "layer_norm_eps": ("OpenAI CLIP's layer norm epsilon", lambda facts: 1e-5),
}
PREPROCESSOR_DEFAULTS = "image_mean, image_std, resample (preprocessor_config.json)"
CONFIG_FIELDS_DROPPED = ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype")


def _vision_config(source: TensorSource, tower: TowerRef | Path | None,
                   options: LoadOptions) -> tuple[dict, dict, list[str]]:
    """The ORIGINAL tower's CLIPVisionConfig fields and preprocessor, and the assumptions they rest on.

    They come from the tower folder's own files, else from the table of released towers
    (``towers``), else from tensor shapes (what they hold: widths, depth, patch and image
    size). What shapes do not hold (head count, activation, epsilon, normalisation) is taken
    from ``--config`` or, with ``--assume-clip-defaults``, from OpenAI CLIP, and each such
    value is listed as an assumption; without either the checkpoint is refused.

    ``--config`` only fills what the original's files do not state: it describes the
    target, so the converter applies it on top (``hf_output``) but the original (``verify``'s
    reference) stays what its own files say.
    """
    if not isinstance(tower, TowerRef):
        tower = TowerRef(None, "--vision-tower", tower)
    facts = _shape_facts(source)
    preprocessor: dict = {}
    config: dict = {}
    origin = ""
    if tower.folder is not None and (tower.folder / "config.json").exists():
        origin = str(tower.folder / "config.json")
        data = read_json(tower.folder / "config.json")
        config = dict(data.get("vision_config") or data)
        if (tower.folder / "preprocessor_config.json").exists():
            preprocessor = read_json(tower.folder / "preprocessor_config.json")
    elif (entry := known_tower(tower.name)) is not None:
        origin = f"vlmkit's table of released towers ({tower.name})"
        config, preprocessor = entry["vision_config"], entry["preprocessor"]
    if config and facts:
        _check_shapes(config, facts, origin, tower)
    assumptions: list[str] = []
    if not config:
        if facts is None:
            raise ConfigError("the checkpoint has no complete vision tower and no CLIP config was found",
                              hint="pass --vision-tower PATH (a CLIP folder) or --config with a vision_config")
        config = dict(facts)
        override = (options.config or {}).get("vision_config") or {}
        for key in CLIP_DEFAULTS:
            if key in override:
                config[key] = override[key]
                assumptions.append(f"vision_config.{key} = {override[key]!r} (from --config; no file of the "
                                   "original states it)")
        missing = [k for k in CLIP_DEFAULTS if k not in config] + ([] if preprocessor else [PREPROCESSOR_DEFAULTS])
        if missing and not options.assume_clip_defaults:
            where = (f"'{tower.name}' (from {tower.given_by}) is neither a folder here nor a known released tower"
                     if tower.name else "the checkpoint names no vision tower")
            fields = [k for k in CLIP_DEFAULTS if k not in config]
            ways = ["--vision-tower PATH (the CLIP folder it was trained from: config.json + preprocessor_config.json)"]
            if fields:
                ways.append(f"--config with a vision_config giving {', '.join(fields)}")
            raise ConfigError(f"the vision tower's config is missing: {where}, and no tensor shape holds "
                              f"{', '.join(missing)}",
                              hint=f"pass {' or '.join(ways)}; or --assume-clip-defaults to take OpenAI CLIP's "
                                   "values for what is missing (then listed as assumptions in the plan, the manifest "
                                   "and the parity report)")
        for key in CLIP_DEFAULTS:
            if key not in config:
                why, value = CLIP_DEFAULTS[key][0], CLIP_DEFAULTS[key][1](facts)
                config[key] = value
                assumptions.append(f"vision_config.{key} = {value!r} ({why}; --assume-clip-defaults)")
    elif not preprocessor and not options.assume_clip_defaults:
        raise ConfigError(f"{tower.folder}: config.json but no preprocessor_config.json (the original reads its "
                          "image normalisation there)",
                          hint="copy preprocessor_config.json from the CLIP model, or pass --assume-clip-defaults")
    config = {**config, "model_type": "clip_vision_model"}
    for key in CONFIG_FIELDS_DROPPED:
        config.pop(key, None)
    if not preprocessor:
        size = config["image_size"]
        preprocessor = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
                        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_center_crop": True, "resample": 3,
                        "rescale_factor": 1 / 255}
        assumptions.append(f"{PREPROCESSOR_DEFAULTS} = OpenAI CLIP's (--assume-clip-defaults)")
    return config, preprocessor, assumptions


def _shape_facts(source: TensorSource) -> dict | None:
    """What the tower's tensor shapes tell (None when the source holds no complete tower)."""
    try:
        patch = source.info(TOWER + "embeddings.patch_embedding.weight").shape
        positions = source.info(TOWER + "embeddings.position_embedding.weight").shape[0]
        fc1 = source.info(TOWER + "encoder.layers.0.mlp.fc1.weight").shape
    except KeyError:
        return None
    layers = 1 + max(int(m.group(1)) for n in source.keys() if (m := re.match(re.escape(TOWER) + r"encoder\.layers\.(\d+)\.", n)))
    hidden, channels, p, _ = patch
    side = round((positions - 1) ** 0.5)
    return {"hidden_size": hidden, "intermediate_size": fc1[0], "num_hidden_layers": layers, "patch_size": p,
            "image_size": side * p, "num_channels": channels}


def _check_shapes(config: dict, facts: dict, origin: str, tower: TowerRef) -> None:
    """A tower config that does not describe the checkpoint's tower is refused, naming each field."""
    from transformers import CLIPVisionConfig

    defaults = CLIPVisionConfig()  # what transformers (and so the original) reads for a field a file omits
    wrong = [f"{k} {config.get(k, getattr(defaults, k))} vs {v}" for k, v in facts.items()
             if config.get(k, getattr(defaults, k)) != v]
    if wrong:
        raise ConfigError(f"the vision tower config from {origin} does not describe the checkpoint's tower "
                          f"(config vs tensor shapes: {'; '.join(wrong)})",
                          hint=f"{tower.given_by} names another model than the one these weights come from; pass "
                               "--vision-tower PATH with the CLIP folder it was trained from")


def _check_tower(path: Path, config: dict, vision: dict) -> None:
    hidden = config.get("mm_hidden_size")
    width = vision.get("hidden_size")
    if hidden is not None and width is not None and hidden != width:
        raise ConfigError(f"{path}/config.json: mm_hidden_size is {hidden} but the vision tower is {width} wide",
                          hint="pass --vision-tower with the CLIP model this checkpoint was trained with")
