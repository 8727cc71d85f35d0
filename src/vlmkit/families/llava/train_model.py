"""The model LLaVA trains: its language model with the vision tower and projector inside, built from parts.

The original (``llava/model/llava_arch.py``) makes ``LlavaLlamaForCausalLM`` a subclass of
``LlamaForCausalLM`` with ``model.vision_tower.vision_tower`` (CLIP) and ``model.mm_projector``
added, and splices the image features into the input embeddings in
``prepare_inputs_labels_for_multimodal``. This module builds the same thing for any backbone
transformers has (a subclass made on the fly, as the original makes one per backbone), so
parameter names are the original's and the outputs are named as LLaVA writes them:
``model.mm_projector.0.weight``, ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
The image path is ``image_path``'s, the code the reference of the original forward runs.

Weights come from ``checkpoint`` (any original form, one namespace), or from a plain language
model plus a CLIP folder with a fresh projector (stage 1 from scratch, as ``pretrain.sh``).
Under ZeRO-3 the model is built partitioned and loaded as ``vlmkit.train.model`` does it.

:class:`Composition` is what ``vlmkit train`` and ``vlmkit merge-lora`` (``vlmkit.train``, which
knows no family) get from the family's ``training`` capability.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...conversion.rules import lora_merge
from ...data.tokenize import IGNORE_INDEX
from ...errors import CheckpointError, ConfigError
from ...options import LoadOptions
from ...runtime import images as image_ops
from ...runtime.tokens import IMAGE_TOKEN_INDEX
from ...tensors import open_source
from ...train.model import Reader, gathered_shape, load, zero_init
from . import checkpoint as llava_checkpoint
from . import image_path, train_outputs
from .backbones import of_plain
from .checkpoint import MULTIMODAL_FIELDS, OriginalCheckpoint

PROJECTOR_PREFIX = "model.mm_projector."


class VisionTower(nn.Module):
    """``CLIPVisionTower`` holding ``CLIPVisionModel`` as ``vision_tower``, so that names read as the original's
    ``model.vision_tower.vision_tower.vision_model.*`` (transformers 5's ``CLIPVisionModel`` itself has lost
    the ``vision_model.`` level, so one more holder puts it back)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = clip


class LlavaTraining:
    """The multimodal half of ``LlavaLlamaForCausalLM``; mixed into the backbone's ``*ForCausalLM``.

    ``self.llava`` (set by :func:`build_model`) is the original checkpoint description: its
    ``config`` dict (``mm_vision_select_layer``, ``tokenizer_model_max_length`` ...) and vision config.
    """

    llava: OriginalCheckpoint
    train_vision: bool = False

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``image_path.encode_images`` over this model's tower and projector, with gradients."""
        return image_path.encode_images(self.model.vision_tower.vision_tower.vision_model, self.model.mm_projector,
                                        pixel_values, self.llava.config,
                                        next(self.model.mm_projector.parameters()).dtype, tower_grad=self.train_vision)

    def image_features(self, pixel_values, image_sizes) -> list[torch.Tensor]:
        """One ``[T_i, hidden]`` tensor per image, arranged as the original (``image_path.image_features``)."""
        return image_path.image_features(self.llava, self.encode_images, pixel_values, image_sizes,
                                         image_config=self.image_config,
                                         image_newline=getattr(self.model, "image_newline", None))

    @functools.cached_property
    def image_config(self) -> image_ops.ImageConfig:
        return image_ops.ImageConfig.from_original(self.llava.config, self.llava.preprocessor)

    def splice(self, input_ids, attention_mask, labels, images, image_sizes):
        """``prepare_inputs_labels_for_multimodal`` for training: embeddings, mask and labels, right-padded.

        Padding (``attention_mask`` False) is removed, each record goes through ``image_path.splice``
        (its images' features at its -200s, labels -100 there, cut at ``tokenizer_model_max_length``),
        and the batch is padded on the right with zeros. A record without an image consumes the batch's
        dummy image with a zero-length slice, so every process runs the tower on every step (as the
        original; ZeRO-3 would hang otherwise).
        """
        features = self.image_features(images, image_sizes) if images is not None else None
        embed = self.get_input_embeddings()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        limit = self.llava.config.get("tokenizer_model_max_length")
        seqs, seq_labels, k = [], [], 0
        for ids, mask, lab in zip(input_ids, attention_mask.bool(), labels):
            ids, lab = ids[mask], lab[mask]
            n = int((ids == IMAGE_TOKEN_INDEX).sum())
            own = features[k:k + n] if features is not None else []
            seq, lab = image_path.splice(embed, ids, own, labels=lab, limit=limit)
            if not n and features is not None:
                seq = torch.cat([seq, features[k][0:0]])
            k += max(n, 1)
            seqs.append(seq)
            seq_labels.append(lab)
        width = max(len(s) for s in seqs)
        batch = len(seqs)
        out = seqs[0].new_zeros((batch, width, seqs[0].shape[-1]))
        out_labels = torch.full((batch, width), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        out_mask = torch.zeros((batch, width), dtype=attention_mask.dtype, device=attention_mask.device)
        for i, (s, lab) in enumerate(zip(seqs, seq_labels)):
            out[i, :len(s)] = s
            out_labels[i, :len(s)] = lab
            out_mask[i, :len(s)] = True
        return out, out_mask, out_labels

    def forward(self, input_ids=None, attention_mask=None, labels=None, images=None, image_sizes=None,
                inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds, attention_mask, labels = self.splice(input_ids, attention_mask, labels, images, image_sizes)
        self.last_tokens = int(attention_mask.sum()) if attention_mask is not None else inputs_embeds.shape[:2].numel()
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs["use_cache"] = False
        return super().forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


@functools.cache
def training_class(base: type) -> type:
    """``Llava<Backbone>ForCausalLM``: the backbone's class with the multimodal half mixed in."""
    return type(f"Llava{base.__name__}", (LlavaTraining, base), {"__module__": __name__})


# ------------------------------------------------------------------------------------------ starting points


@dataclass(frozen=True)
class NewModel:
    """How to make a LLaVA from a plain language model (``pretrain.sh``'s model arguments)."""

    projector_type: str = "mlp2x_gelu"
    select_layer: int = -2
    select_feature: str = "patch"
    image_aspect_ratio: str = "pad"


def compose(path: Path, options: LoadOptions, new: NewModel) -> OriginalCheckpoint:
    """A plain language model + ``--vision-tower`` as an original checkpoint with no projector yet.

    The config is what LLaVA's ``initialize_vision_modules`` writes into the model's config.

    Raises:
        ConfigError: no ``--vision-tower``, or an unknown architecture.
    """
    config = json.loads((path / "config.json").read_text())
    row = of_plain(config, path)
    if not options.vision_tower:
        raise ConfigError(f"{path} is a plain language model ({row.plain_architecture}): a LLaVA made from it needs "
                          "a vision tower",
                          hint="pass --vision-tower PATH (a CLIP folder, e.g. clip-vit-large-patch14-336)")
    # the class the original trains for this backbone, and the model_type its current training code writes
    config = {**config, "architectures": [row.original_architectures[0]], "model_type": row.original_model_types[-1],
              "_name_or_path": str(path), "mm_vision_tower": str(options.vision_tower), "use_mm_proj": True,
              "mm_projector_type": new.projector_type, "mm_vision_select_layer": new.select_layer,
              "mm_vision_select_feature": new.select_feature, "mm_patch_merge_type": "flat",
              "image_aspect_ratio": new.image_aspect_ratio, "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False}
    return llava_checkpoint.open_composed(path, config, options, row)


def open_start(found, options: LoadOptions, new: NewModel) -> OriginalCheckpoint:
    """The checkpoint training starts from: an original LLaVA (any form) or a plain LLM + CLIP.

    Args:
        found: the registry's ``Found`` (form ``plain_llm`` or an original form).

    Raises:
        ConfigError / CheckpointError: naming the file and the flag that fixes it.
    """
    if found.form == "plain_llm":
        return compose(found.path, options, new)
    return llava_checkpoint.open_original(found.path, options)


# ------------------------------------------------------------------------------------------ building


def _text_config(ckpt: OriginalCheckpoint):
    from transformers import AutoConfig

    fields = {k: v for k, v in ckpt.config.items() if k not in MULTIMODAL_FIELDS}
    config = AutoConfig.for_model(ckpt.row.hf_model_type, **fields)
    config.use_cache = False
    return config


def _vision_model(ckpt: OriginalCheckpoint) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in ckpt.vision_config.items() if k != "model_type"}))


def build_model(ckpt: OriginalCheckpoint, *, dtype: torch.dtype = torch.float32, zero3: dict | None = None,
                init_projector: Path | None = None, train_vision: bool = False, seed: int = 0) -> nn.Module:
    """The trainable LLaVA with the checkpoint's weights.

    Args:
        ckpt: where the weights come from (``open_start``).
        dtype: parameter dtype (fp32 on CPU; the trainer's autocast handles bf16/fp16).
        zero3: the DeepSpeed config when ZeRO-3 partitions the parameters at construction.
        init_projector: an ``mm_projector.bin`` to start the projector from (``--pretrain_mm_mlp_adapter``).
        train_vision: let gradients through the vision tower.
        seed: seed of a fresh projector's initialisation.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape (named, with the file).
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.initialization import no_init_weights

    text_config = _text_config(ckpt)
    cls = training_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)])
    partitioned = zero_init(zero3)
    with partitioned:
        with no_init_weights():  # every weight but a fresh projector comes from the checkpoint
            model = cls(text_config)
            model.model.vision_tower = VisionTower(_vision_model(ckpt))
        torch.manual_seed(seed)  # nn.Linear's own initialisation, as build_vision_projector
        model.model.mm_projector = image_path.projector(ckpt, text_config.hidden_size)
        if ckpt.is_next:
            model.model.image_newline = nn.Parameter(torch.zeros(text_config.hidden_size))
    model.llava = ckpt
    model.train_vision = train_vision
    state = _weights(ckpt, model, init_projector)
    load(model, state, partitioned=zero3 is not None)
    return model.to(dtype)


def _weights(ckpt: OriginalCheckpoint, model: nn.Module, init_projector: Path | None) -> dict[str, Reader]:
    """name -> a reader of its tensor (LoRA merged in as the original builder does), for every parameter.

    Every name and shape is checked from the headers before any weight is read; ``load`` then reads
    one tensor at a time, so the weights are in memory once (in the model), not twice.
    """
    source = ckpt.source
    names = set(source.keys())
    wanted = dict(model.named_parameters())
    readers: dict[str, Reader] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    merge = lora_merge(ckpt.lora.scale) if ckpt.lora else None  # the converter's op: W + scale * B @ A
    for name in wanted:
        if name in names:
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            if module and f"{module}.lora_A.weight" in names:
                readers[name] = functools.partial(_merged, source, merge, name, module)
            else:
                readers[name] = functools.partial(source.read, name)
            shapes[name] = tuple(source.info(name).shape)
    if init_projector is not None:
        projector = read_projector(init_projector, {n: gathered_shape(p) for n, p in wanted.items()
                                                    if n.startswith(PROJECTOR_PREFIX)})
        readers.update({n: functools.partial(projector.__getitem__, n) for n in projector})
        shapes.update({n: tuple(t.shape) for n, t in projector.items()})
    missing = [n for n in wanted if n not in readers and not n.startswith(PROJECTOR_PREFIX)
               and n != "model.image_newline"]
    if missing:
        raise CheckpointError(f"{ckpt.path}: {len(missing)} weight(s) of the model are not in the checkpoint, e.g. "
                              f"'{missing[0]}'", hint="is --model-base / --vision-tower the model it was trained with?")
    fresh = [n for n in wanted if n not in readers]
    if fresh and ckpt.form != "plain_llm":
        raise CheckpointError(f"{ckpt.path}: the checkpoint has no '{fresh[0]}'",
                              hint="pass --init-projector mm_projector.bin (the stage-1 output)")
    for name, shape in shapes.items():
        if shape != gathered_shape(wanted[name]):
            raise CheckpointError(f"{ckpt.path}: '{name}' is {list(shape)}, the model expects "
                                  f"{list(gathered_shape(wanted[name]))}", hint="the config and the weights disagree")
    return readers


def _merged(source, merge, name: str, module: str) -> torch.Tensor:
    [tensor] = merge([source.read(name), source.read(f"{module}.lora_A.weight"), source.read(f"{module}.lora_B.weight")])
    return tensor


def read_projector(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """An ``mm_projector.bin`` as LLaVA's ``initialize_vision_modules`` reads it (keys containing ``mm_projector``).

    Read through vlmkit's restricted unpickler; every mismatch is named before training starts.

    Raises:
        CheckpointError: missing keys or shapes that differ from the model's projector.
    """
    source = open_source(path)
    found = {}
    for key in source.keys():
        if "mm_projector." in key:
            found[PROJECTOR_PREFIX + key.split("mm_projector.", 1)[1]] = key
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{path}: no projector tensor for '{missing[0]}' (it has {sorted(source.keys())[:4]})",
                              hint="pass the mm_projector.bin of a stage-1 run with the same --projector-type")
    problems = [f"'{found[n]}' is {list(source.info(found[n]).shape)}, the model's projector needs {list(s)}"
                for n, s in expected.items() if tuple(source.info(found[n]).shape) != s]
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems),
                              hint="the projector was trained for another language model or vision tower "
                                   "(mm_hidden_size / hidden_size differ)")
    return {n: source.read(found[n]) for n in expected}




# ------------------------------------------------------------------------------------------ the composition


class Composition:
    """What ``vlmkit train`` and ``vlmkit merge-lora`` get from LLaVA: the start, the model, the outputs.

    ``vlmkit.train`` runs the generic order (check, data, build, train, write) and asks this object
    at each LLaVA-specific step. Nothing is read until a method needs it (``merge_lora`` checks its
    pair before any tensor is opened).

    Args:
        found: the start (``families.require(path, "training")``).
        options: loading options (``--vision-tower``, ``--model-base``, ``--template`` ...).
        config: the run (``TrainConfig``); None for ``merge_lora``.
    """

    def __init__(self, found, options: LoadOptions, config=None):
        self.found, self.options, self.config = found, options, config

    @functools.cached_property
    def checkpoint(self) -> OriginalCheckpoint:
        """The start opened from its headers (any original form, or the plain LLM + CLIP)."""
        c = self.config
        return open_start(self.found, self.options,
                          NewModel(c.projector_type, c.vision_select_layer, image_aspect_ratio=c.image_aspect_ratio))

    def check(self) -> None:
        """Open the start and refuse what cannot be trained from it.

        Raises:
            ConfigError / CheckpointError: naming the file and the flag that fixes it.
        """
        start = self.found.path
        if self.checkpoint.form == "lora" and self.config.lora:
            raise ConfigError(f"{start} is a LoRA adapter: a new adapter would be trained on a merged model that is "
                              "on no disk, and could not be merged later",
                              hint=f"merge it first: vlmkit merge-lora {start} --base BASE merged/, then train from "
                                   "merged/")

    def data_model(self):
        """Tokenizer, template and length: ``vlmkit.data``'s model, for an original checkpoint or a new LLaVA."""
        from ...data import DataModel, OriginalEncoder, load_data_model
        from ...data.model import DEFAULT_MAX_LENGTH
        from ...runtime.templates import get_template

        ckpt, start, config = self.checkpoint, self.found.path, self.config
        if ckpt.form != "plain_llm":
            return load_data_model(start, self.options, max_length=config.max_length)
        template = self.options.template
        if template is None:
            raise ConfigError(f"{start} is a plain language model: its conversation template is not recorded "
                              "anywhere", hint="pass --template (llava_v1 for Vicuna, mistral_instruct for Mistral)")
        vision = ckpt.vision_config
        side = vision["image_size"] // vision["patch_size"]
        length = config.max_length or DEFAULT_MAX_LENGTH
        return DataModel(start, "original", get_template(template).name, OriginalEncoder.from_folder(start), length,
                         "--max-length" if config.max_length else "default (LLaVA's training scripts)", side * side)

    def notes(self, run_dir: Path) -> list[str]:
        """What the user should know about the run folder: the original builder's folder-name rule."""
        name = run_dir.name.lower()
        if self.config.lora and not ("lora" in name and "llava" in name):
            return [f"note: LLaVA's load_pretrained_model takes the LoRA path only when the folder name holds "
                    f"'llava' and 'lora' (e.g. llava-v1.5-7b-wukong-lora); {run_dir.name!r} does not (vlmkit does "
                    "not mind)"]
        return []

    def trained_base(self) -> str:
        """The folder whose language model the run starts from (what ``--model-base`` must be for the outputs)."""
        return train_outputs.trained_base(self.checkpoint, self.found.path, self.config.model_base)

    def fingerprint(self) -> str:
        """The base's fingerprint, recorded so that ``merge-lora`` refuses another base."""
        return train_outputs.base_fingerprint(self.checkpoint.source)

    def build(self, *, max_length: int, zero3: dict | None) -> nn.Module:
        """The trainable model with the start's weights (``build_model``); its ``image_config`` preprocesses."""
        ckpt, c = self.checkpoint, self.config
        ckpt.config = {**ckpt.config, "tokenizer_model_max_length": max_length, "tokenizer_padding_side": "right"}
        return build_model(ckpt, zero3=zero3, init_projector=Path(c.init_projector) if c.init_projector else None,
                           train_vision=c.train_vision, seed=c.seed)

    def write(self, model: nn.Module, run_dir: Path, *, max_length: int, base: str, fingerprint: str,
              summary: dict) -> list[str]:
        """The run's outputs as LLaVA's ``train.py`` writes them (``train_outputs``); returns the file names."""
        return train_outputs.write(model, self.checkpoint, self.config, run_dir, max_length=max_length, base=base,
                                   fingerprint=fingerprint, summary=summary)

    def merge_lora(self, base: Path, output: Path, **kwargs):
        """``vlmkit merge-lora`` of this LoRA run into ``base`` (``train_merge``: the pair is checked first)."""
        from .train_merge import merge_lora

        return merge_lora(self.found.path, base, output, options=self.options, **kwargs)
