"""Tiny LLaVA checkpoints with random weights, in the exact on-disk layouts of the real releases.

No machine here reaches a model hub, so tests, the demo and the benchmarks build what
``liuhaotian/llava-v1.5-7b``, ``liuhaotian/llava-v1.6-mistral-7b``, a LoRA fine-tune and a
projector pre-training run would have written, at toy sizes, with a fixed seed:

* a CLIP folder as ``openai/clip-vit-large-patch14-336`` ships it (full ``CLIPModel``
  ``pytorch_model.bin`` with the old persistent ``position_ids`` buffers, CLIP config,
  ``preprocessor_config.json``);
* LLaVA-1.5: ``config.json`` with the ``mm_*`` fields, ``pytorch_model-0000i-of-0000N.bin``
  shards + index, the slow-tokenizer files; no vision tower inside;
* LLaVA-NeXT: safetensors shards with the tower under ``model.vision_tower.vision_tower.*``
  and ``model.image_newline``, ``image_aspect_ratio: anyres``;
* LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``) + ``non_lora_trainables.bin``
  + the LLaVA ``config.json``, in the training run's dtypes, beside a plain LLM base folder in its own;
* projector-only: ``mm_projector.bin`` + ``config.json``, beside a base LLM folder.

The tokenizer is the real LLaMA (or Mistral) SentencePiece model, so the vocabulary is
the real 32,000 tokens.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import dtypes
from .backbones import ROWS
from ...tensors.safetensors_io import SafetensorsWriter, TensorSpec, layout_shards
from ...tensors.base import TORCH_TO_CODE

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinySizes:
    """Toy sizes; head_dim stays 32 (engines such as vLLM's CPU backend refuse smaller)."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 2
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    image_size: int = 56
    patch: int = 14


def _save_bin_shards(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n].contiguous() for n in names[i * per:(i + 1) * per]}
        torch.save(part, folder / file)
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def _save_safetensors_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    specs = [TensorSpec(n, tuple(t.shape), TORCH_TO_CODE[t.dtype]) for n, t in state.items()]
    with SafetensorsWriter(folder, layout_shards(specs, max_shard_size)) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def tokenizer_folder(backbone: str) -> Path:
    """The real tokenizer files of a backbone row (``Backbone.tiny["tokenizer"]``) that tiny models ship."""
    return ASSETS / "tokenizers" / ROWS[backbone].tiny["tokenizer"]


def copy_tokenizer(folder: Path, backbone: str) -> None:
    for f in tokenizer_folder(backbone).iterdir():
        if f.name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(f, folder / f.name)
        elif f.name == "tokenizer.json.gz":  # byte-level BPE: stored gzipped (tests/fixtures/make_bpe_tokenizer_assets.py)
            with gzip.open(f) as src, open(folder / "tokenizer.json", "wb") as dst:
                shutil.copyfileobj(src, dst)


def _tokenizer_length(folder: Path) -> int:
    """``len(tokenizer)`` of the tokenizer files in ``folder``."""
    from ...runtime.vocab import length, open_vocab

    return length(open_vocab(folder))


def make_clip(folder: Path, sizes: TinySizes = TinySizes(), *, seed: int = 0) -> Path:
    """A CLIP folder in the layout of ``openai/clip-vit-large-patch14-336``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vision = dict(hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_intermediate,
                  num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                  image_size=sizes.image_size, patch_size=sizes.patch, projection_dim=16, hidden_act="quick_gelu")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = CLIPModel(config).eval()
    state = dict(model.state_dict())
    # Old transformers saved these buffers; the hub's pytorch_model.bin still has them.
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    n_pos = (sizes.image_size // sizes.patch) ** 2 + 1
    state["vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    torch.save(state, folder / "pytorch_model.bin")
    cfg = config.to_dict()
    cfg["architectures"] = ["CLIPModel"]
    _write_json(folder / "config.json", cfg)
    _write_json(folder / "preprocessor_config.json", {
        "crop_size": sizes.image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": sizes.image_size,
    })
    return folder


def _text_config(backbone: str, sizes: TinySizes) -> dict:
    """The language model's config: toy sizes, then the row's own fields (``Backbone.tiny["text"]``)."""
    common = dict(hidden_size=sizes.hidden, intermediate_size=sizes.intermediate, num_hidden_layers=sizes.layers,
                  num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads, vocab_size=32000,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.02,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_cache=True)
    return {**common, **ROWS[backbone].tiny["text"]}


def _language_model(backbone: str, sizes: TinySizes, seed: int) -> dict[str, torch.Tensor]:
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, ROWS[backbone].plain_architecture)
    model = cls(cls.config_class(**_text_config(backbone, sizes)))
    with torch.no_grad():  # random init draws tiny logits; spread them so greedy decoding is not degenerate
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return {k: v.contiguous() for k, v in model.state_dict().items() if "rotary_emb" not in k}


def _projector(sizes: TinySizes, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return {
        "model.mm_projector.0.weight": torch.randn(sizes.hidden, sizes.vision_hidden, generator=g) * 0.2,
        "model.mm_projector.0.bias": torch.randn(sizes.hidden, generator=g) * 0.1,
        "model.mm_projector.2.weight": torch.randn(sizes.hidden, sizes.hidden, generator=g) * 0.2,
        "model.mm_projector.2.bias": torch.randn(sizes.hidden, generator=g) * 0.1,
    }


def llava_config(backbone: str, sizes: TinySizes, clip: Path, *, next_: bool) -> dict:
    """``config.json`` as the original training code writes it."""
    row = ROWS[backbone]
    config = {
        "_name_or_path": row.tiny["name_or_path"],
        "architectures": [row.original_architectures[0]],
        "model_type": row.original_model_types[0],  # as released
        **_text_config(backbone, sizes),
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": sizes.vision_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip),
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": False,
        "use_mm_proj": True,
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
    }
    if next_:
        s = sizes.image_size
        config.update({
            "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]],
            "mm_patch_merge_type": "spatial_unpad",
            "unfreeze_mm_vision_tower": True,
            "tokenizer_model_max_length": 4096,
            "tokenizer_padding_side": "right",
        })
    if next_ and row.tiny.get("release"):
        # LLaVA-NeXT repository's train.py (ModelArguments / the release configs): the extra fields it records;
        # mm_use_im_patch_token False as its scripts pass it (the builder's default when absent would be True)
        config.update({"mm_spatial_pool_mode": "bilinear", "mm_tunable_parts":
                       "mm_vision_tower,mm_mlp_adapter,mm_language_model", "mm_projector_lr": None,
                       "mm_vision_tower_lr": 2e-06, "mm_resampler_type": None, "transformers_version": "4.40.0.dev0"})
    return config


def _generation_config(folder: Path, backbone: str) -> None:
    text = _text_config(backbone, TinySizes())
    _write_json(folder / "generation_config.json", {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                                    if k in text})


def make_llava15(folder: Path, clip: Path, sizes: TinySizes = TinySizes(), *, backbone: str = "llama",
                 shards: int = 2, seed: int = 0) -> Path:
    """An original LLaVA-1.5 checkpoint (``.bin`` shards, tower outside)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {**_language_model(backbone, sizes, seed), **_projector(sizes, seed)}
    state = {k: state[k] for k in sorted(state, key=lambda k: k.startswith("lm_head"))}  # lm_head last, as saved
    _save_bin_shards(state, folder, shards)
    _write_json(folder / "config.json", llava_config(backbone, sizes, clip, next_=False))
    _generation_config(folder, backbone)
    copy_tokenizer(folder, backbone)
    return folder


def make_llava_next(folder: Path, clip: Path, sizes: TinySizes = TinySizes(), *, backbone: str = "mistral",
                    seed: int = 0, max_shard_size: int = 400_000) -> Path:
    """An original LLaVA-NeXT (1.6) checkpoint: safetensors shards, tower and image_newline inside."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {**_language_model(backbone, sizes, seed), **_projector(sizes, seed)}
    g = torch.Generator().manual_seed(seed + 2)
    state["model.image_newline"] = torch.randn(sizes.hidden, generator=g) / sizes.hidden**0.5
    clip_state = torch.load(clip / "pytorch_model.bin", weights_only=True)
    for name, tensor in clip_state.items():
        if name.startswith("vision_model.") and not name.endswith("position_ids"):
            # fine-tuned tower: perturb it so that using the original CLIP weights would be caught
            state["model.vision_tower.vision_tower." + name] = tensor + 0.01 * torch.randn(tensor.shape, generator=g)
    copy_tokenizer(folder, backbone)
    _untrained_rows(state, _tokenizer_length(folder))
    _save_safetensors_shards(state, folder, max_shard_size)
    _write_json(folder / "config.json", llava_config(backbone, sizes, clip, next_=True))
    _generation_config(folder, backbone)
    return folder


def _untrained_rows(state: dict[str, torch.Tensor], tokens: int) -> None:
    """Qwen's vocabulary is padded past its tokenizer (151,936 rows, 151,646 tokens): the padding rows never see a
    token, so they keep their initialisation (std ``initializer_range`` 0.02) while trained rows grow."""
    g = torch.Generator().manual_seed(7)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = state[name].shape[0]
        if rows > tokens:
            state[name][tokens:] = torch.randn(rows - tokens, state[name].shape[1], generator=g) * 0.02


def make_base_llm(folder: Path, sizes: TinySizes = TinySizes(), *, backbone: str = "llama", seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Path:
    """A plain LLM folder (the Vicuna a LoRA or projector was trained on; ``lmsys/vicuna-7b-v1.5`` is float16)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(folder, backbone)
    state = _language_model(backbone, sizes, seed)
    _untrained_rows(state, _tokenizer_length(folder))
    state = {k: v.to(dtype) for k, v in state.items()}
    _save_safetensors_shards(state, folder, 1 << 30)
    row = ROWS[backbone]
    _write_json(folder / "config.json", {"architectures": [row.plain_architecture], "model_type": row.hf_model_type,
                                         **_text_config(backbone, sizes), "torch_dtype": dtypes.name(dtypes.code(dtype))})
    _generation_config(folder, backbone)
    return folder


def make_projector_only(folder: Path, clip: Path, sizes: TinySizes = TinySizes(), *, backbone: str = "llama",
                        seed: int = 0) -> Path:
    """A stage-1 (pre-training) output: ``mm_projector.bin`` + ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_projector(sizes, seed + 10), folder / "mm_projector.bin")
    config = llava_config(backbone, sizes, clip, next_=False)
    # a training run writes the model_type of the repository's current code
    config.update({"tune_mm_mlp_adapter": True, "model_type": ROWS[backbone].original_model_types[-1]})
    _write_json(folder / "config.json", config)
    return folder


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(folder: Path, base: Path, clip: Path, sizes: TinySizes = TinySizes(), *, backbone: str = "llama",
              rank: int = 4, alpha: int = 8, seed: int = 0, adapter_dtype: torch.dtype = torch.bfloat16,
              non_lora_dtype: torch.dtype = torch.bfloat16, adapter_file: str = "adapter_model.safetensors",
              next_: bool = False) -> Path:
    """A LoRA fine-tune as LLaVA's ``train.py --lora_enable`` saves it, for the LLM at ``base``.

    The dtypes are the training run's, not the base's: ``finetune_lora.sh`` (``--bf16 True``)
    casts the peft model to bfloat16 and saves adapter and ``non_lora_trainables.bin`` so,
    beside a float16 Vicuna; ``--bits 4/8`` or fp32 runs leave float32 adapters. Older peft
    wrote ``adapter_model.bin`` (``liuhaotian/llava-v1.5-7b-lora``), newer ``.safetensors``.
    ``next_``: a LLaVA-NeXT (anyres) run: its ``image_newline`` is trained too, so it is saved with the projector
    in ``non_lora_trainables.bin`` (LLaVA-NeXT's ``get_peft_state_non_lora_maybe_zero_3``: every trainable
    non-LoRA parameter); the tower stays the ``mm_vision_tower`` folder's.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed + 3)
    dims = {"q_proj": (sizes.hidden, sizes.hidden), "k_proj": (sizes.kv_heads * sizes.hidden // sizes.heads, sizes.hidden),
            "v_proj": (sizes.kv_heads * sizes.hidden // sizes.heads, sizes.hidden), "o_proj": (sizes.hidden, sizes.hidden),
            "gate_proj": (sizes.intermediate, sizes.hidden), "up_proj": (sizes.intermediate, sizes.hidden),
            "down_proj": (sizes.hidden, sizes.intermediate)}
    adapter = {}
    for layer in range(sizes.layers):
        for module, (out_f, in_f) in dims.items():
            group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.1  # trained: not zero
    adapter = {k: v.to(adapter_dtype) for k, v in adapter.items()}
    if adapter_file.endswith(".safetensors"):
        save_file(adapter, folder / adapter_file, metadata={"format": "pt"})
    else:
        torch.save(adapter, folder / adapter_file)
    _write_json(folder / "adapter_config.json", {  # as peft's save_pretrained writes it (sorted, nulls kept)
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": str(base), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": 0.05, "modules_to_save": None,
        "peft_type": "LORA", "r": rank, "rank_pattern": {}, "revision": None, "target_modules": sorted(LORA_TARGETS),
        "task_type": "CAUSAL_LM", "use_rslora": False,
    })
    projector = _projector(sizes, seed + 20)
    if next_:
        projector["model.image_newline"] = torch.randn(sizes.hidden, generator=g) / sizes.hidden**0.5
    torch.save({"base_model.model." + k: v.to(non_lora_dtype) for k, v in projector.items()},
               folder / "non_lora_trainables.bin")
    config = llava_config(backbone, sizes, clip, next_=next_)
    config.update({"_name_or_path": str(base), "model_type": ROWS[backbone].original_model_types[-1]})
    _write_json(folder / "config.json", config)
    return folder


ONEVISION_RELEASE = "llava-onevision-qwen2-7b-ov"


# the tiny OneVision tower's activation and epsilon (SigLIP so400m's): no file of the checkpoint states them
ONEVISION_TOWER = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


def make_onevision(folder: Path, sizes: TinySizes = TinySizes(), *, seed: int = 0) -> Path:
    """An original LLaVA-OneVision checkpoint as ``lmms-lab/llava-onevision-qwen2-7b-ov`` ships it, at toy sizes:
    Qwen2 on the real vocabulary (rows padded past the tokenizer), a SigLIP tower saved after the original's
    ``load_model`` deleted its last layer (no head), ``anyres_max_9`` + ``spatial_unpad`` + ``image_newline``, the
    release's 6 x 6 pinpoint list in multiples of the tower's size. The tower's name is not a released one, so its
    head count comes from ``--config`` (``tiny_options``)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    folder.mkdir(parents=True, exist_ok=True)
    state = {**_language_model("qwen2", sizes, seed), **_projector(sizes, seed)}
    g = torch.Generator().manual_seed(seed + 2)
    state["model.image_newline"] = torch.randn(sizes.hidden, generator=g) / sizes.hidden**0.5
    torch.manual_seed(seed + 3)
    tower = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_intermediate, patch_size=sizes.patch,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads, image_size=sizes.image_size,
        **ONEVISION_TOWER))
    del tower.encoder.layers[-1:]
    for name, tensor in tower.state_dict().items():
        if not name.startswith("head.") and not name.endswith("position_ids"):
            state["model.vision_tower.vision_tower.vision_model." + name] = tensor.contiguous()
    copy_tokenizer(folder, "qwen2")
    _untrained_rows(state, _tokenizer_length(folder))
    _save_safetensors_shards(state, folder, 4_000_000)
    s = sizes.image_size
    config = {**llava_config("qwen2", sizes, folder, next_=True),
              "_name_or_path": f"lmms-lab/{ONEVISION_RELEASE}", "image_aspect_ratio": "anyres_max_9",
              "image_grid_pinpoints": [[i * s, j * s] for i in range(1, 7) for j in range(1, 7)],
              "mm_vision_tower": f"my-org/siglip-tiny-patch{sizes.patch}-{s}", "mm_vision_select_layer": -2,
              "mm_newline_position": "one_token", "tokenizer_model_max_length": 32768}
    _write_json(folder / "config.json", config)
    _generation_config(folder, "qwen2")
    return folder


VIDEO_RELEASE = "LLaVA-Video-7B-Qwen2"
# What LLaVA-NeXT's video training leaves in config.json (scripts/video/train/SO400M_Qwen2_7B_ov_to_video_am9.sh:
# --mm_newline_position grid --mm_spatial_pool_stride 2 --add_time_instruction True --force_sample True; train.py
# writes them with its ModelArguments defaults: mm_spatial_pool_mode "bilinear", add_faster_video False,
# faster_token_stride 10), over the OneVision checkpoint it starts from. The release's own config.json was not
# available offline: these are the fields its training script writes.
VIDEO_FIELDS = {"mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": 2,
                "add_faster_video": False, "faster_token_stride": 10, "add_time_instruction": True,
                "force_sample": True}


VIDEO_SIZES = TinySizes(image_size=70)  # 5 x 5 patches: an odd side, as the release's 27 x 27


def make_llava_video(folder: Path, sizes: TinySizes = VIDEO_SIZES, *, seed: int = 0) -> Path:
    """An original LLaVA-Video checkpoint as ``lmms-lab/LLaVA-Video-7B-Qwen2`` ships it, at toy sizes: the OneVision
    layout (:func:`make_onevision`) with the video fields of ``VIDEO_FIELDS``. The default tower sees 5 x 5 patches,
    an odd side as the release's 27 x 27: bilinear pooling then gives 3 x 3 per frame, average and max 2 x 2."""
    make_onevision(folder, sizes, seed=seed)
    config = json.loads((folder / "config.json").read_text())
    config.update({"_name_or_path": f"lmms-lab/{VIDEO_RELEASE}", **VIDEO_FIELDS})
    _write_json(folder / "config.json", config)
    return folder
