"""The ORIGINAL LLaVA forward pass, assembled from transformers parts as ``llava_arch.py`` does.

This is the reference ``vlmkit verify`` measures conversions against, and the model that
runs original checkpoints directly. It follows the original code step by step (the image
steps are ``image_path``'s functions, the ones training runs too):

* the CLIP tower's hidden state at ``mm_vision_select_layer`` (no post-layernorm),
  ``patch`` dropping the CLS position;
* the ``mm_projector`` (Linear, or Linear-GELU-Linear... for ``mlpNx_gelu``);
* NeXT: the base image's features first, then the crops' grid, unpadded to the image's
  aspect ratio, an ``image_newline`` at the end of every row (``spatial_unpad``);
* a video (LLaVA-OneVision, LLaVA-Video): its frames pooled and newline'd as ``mm_spatial_pool_mode`` /
  ``mm_newline_position`` say (``image_path.video_features``), one placeholder for the whole video;
* image features spliced where the prompt has ``IMAGE_TOKEN_INDEX`` (-200) in the
  input embeddings, truncated at ``tokenizer_model_max_length``;
* greedy decoding with a KV cache from those embeddings, until one of the template's stop ids;
* the builder's ``resize_token_embeddings(len(tokenizer))``: a checkpoint whose rows outnumber its
  tokenizer (Qwen's padded 151,936 rows, 151,646 tokens) runs with the first ``len(tokenizer)`` rows.

LoRA checkpoints are merged with peft, as the original builder does (an independent
path from the converter's own merge op).
"""

from __future__ import annotations

import torch
from torch import nn

from ...runtime.generation import with_cache
from ...runtime.vocab import length, open_vocab
from . import image_path, siglip
from .checkpoint import MULTIMODAL_FIELDS, TOWER, OriginalCheckpoint


class OriginalLlava(nn.Module):
    """An original LLaVA checkpoint, runnable. Build with ``OriginalLlava.load(ckpt)``."""

    def __init__(self, ckpt: OriginalCheckpoint, language_model: nn.Module, vision_tower: nn.Module,
                 projector: nn.Module, image_newline: torch.Tensor | None):
        super().__init__()
        self.ckpt = ckpt
        self.config = ckpt.config
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.projector = projector
        self.image_newline = nn.Parameter(image_newline, requires_grad=False) if image_newline is not None else None
        self.compute_dtype = next(language_model.parameters()).dtype
        self.image_config = image_path.image_config(ckpt)
        self.vocab = open_vocab(ckpt.tokenizer_folder, ckpt.row.tokenizer)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, ckpt: OriginalCheckpoint, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "OriginalLlava":
        from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel
        from transformers.initialization import no_init_weights  # weights come from the checkpoint

        source = ckpt.source
        names = source.keys()
        text_fields = {k: v for k, v in ckpt.config.items() if k not in MULTIMODAL_FIELDS}
        rows = _rows_kept(ckpt, source.info("model.embed_tokens.weight").shape[0])
        text_fields["vocab_size"] = rows
        text_config = AutoConfig.for_model(ckpt.row.hf_model_type, **text_fields)
        with no_init_weights():
            lm = AutoModelForCausalLM.from_config(text_config)
        wanted = set(lm.state_dict())
        state = {n: source.read(n).to(dtype) for n in names if n in wanted}
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in state:
                state[name] = state[name][:rows]
        missing = wanted - set(state)
        if missing:
            from ...errors import CheckpointError

            raise CheckpointError(f"{ckpt.path}: the language model lacks {len(missing)} tensor(s), e.g. "
                                  f"'{sorted(missing)[0]}'")
        lm.load_state_dict(state, strict=True, assign=True)
        if ckpt.lora:
            lm = _merge_lora(lm, ckpt)
        lm.eval()

        tower_state = {n[len(TOWER):]: source.read(n).to(dtype) for n in names
                       if n.startswith(TOWER) and not n.endswith("position_ids")}
        if ckpt.vision_config.get("model_type") == "siglip_vision_model":  # LLaVA-NeXT's trimmed SigLIP tower
            tower = siglip.build(ckpt.vision_config, tower_state)
        else:
            vision_fields = {k: v for k, v in ckpt.vision_config.items() if k != "model_type"}
            with no_init_weights():
                tower = CLIPVisionModel(CLIPVisionConfig(**vision_fields))
            tower.load_state_dict(tower_state, strict=True, assign=True)
            tower.eval()

        hidden = text_config.hidden_size
        projector = image_path.projector(ckpt, hidden)
        prefix = "model.mm_projector."
        proj_state = {n[len(prefix):]: source.read(n).to(dtype) for n in names if n.startswith(prefix)}
        if isinstance(projector, nn.Linear) and "0.weight" in proj_state:  # mlp1x_gelu keeps the Sequential index
            proj_state = {k[2:]: v for k, v in proj_state.items()}
        projector.load_state_dict(proj_state, strict=True)
        newline = source.read("model.image_newline").to(dtype) if "model.image_newline" in names else None
        return cls(ckpt, lm, tower, projector.to(dtype), newline).to(device)

    # ------------------------------------------------------------------ images

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> projected features ``[N, T, hidden]`` (``image_path.encode_images``)."""
        return image_path.encode_images(self.vision_tower, self.projector, pixel_values, self.config, self.compute_dtype)

    @torch.no_grad()
    def image_features(self, pixel_values, image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """One ``[T_i, hidden]`` tensor per image (``image_path.image_features``).

        Args:
            pixel_values: from ``runtime.images.preprocess`` ([B,3,H,W], or [B,1+n,3,H,W] / a list for anyres).
            image_sizes: original (width, height) of each image.
        """
        return image_path.image_features(self.ckpt, self.encode_images, pixel_values, image_sizes,
                                         image_config=self.image_config, image_newline=self.image_newline)

    @torch.no_grad()
    def video_features(self, frames: list) -> torch.Tensor:
        """One video's ``[N, hidden]`` features from its frames (PIL images, in order), as the original computes
        them for ``modalities=["video"]`` (``image_path.video_features``).

        Raises:
            ConfigError: the checkpoint's video fields are ones the original refuses or vlmkit does not reproduce.
        """
        video = image_path.video_config(self.ckpt)
        pixels = torch.from_numpy(self.image_config.frames(frames)).to(next(self.language_model.parameters()).device)
        return image_path.video_features(self.ckpt, self.encode_images, pixels, video=video,
                                         image_newline=self.image_newline)

    # ------------------------------------------------------------------ text

    def prompt_ids(self, prompt: str) -> list[int]:
        """``tokenizer_image_token``: the rendered prompt's ids, -200 per ``<image>``."""
        from ...runtime.tokens import tokenizer_image_token

        return tokenizer_image_token(prompt, self.vocab)

    @torch.no_grad()
    def embed(self, ids: list[int], features: list[torch.Tensor]) -> torch.Tensor:
        """Input embeddings ``[L, hidden]`` with image features spliced at each -200 (``image_path.splice``)."""
        table = self.language_model.get_input_embeddings()
        embeds, _ = image_path.splice(table, torch.tensor(ids, device=table.weight.device), features,
                                      limit=self.config.get("tokenizer_model_max_length"))
        return embeds

    @torch.no_grad()
    def logits(self, ids: list[int], features: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[L, vocab]`` of one prompt."""
        embeds = self.embed(ids, features)[None]
        return self.language_model(inputs_embeds=embeds).logits[0]

    @torch.no_grad()
    def greedy(self, ids: list[int], features: list[torch.Tensor], max_new_tokens: int,
               stop: frozenset[int] | None = None) -> list[int]:
        """Greedy decoding from the spliced embeddings with a KV cache; stops at one of ``stop`` (the template's
        ``runtime.templates.stop_ids``; default the tokenizer's EOS ids)."""
        embeds = self.embed(ids, features)[None]
        out, cache = with_cache(self.language_model, None, inputs_embeds=embeds)
        stop = self.vocab.eos_ids if stop is None else stop
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            new.append(token)
            if token in stop:
                break
            out, cache = with_cache(self.language_model, cache, input_ids=torch.tensor([[token]]))
        return new


def _rows_kept(ckpt: OriginalCheckpoint, rows: int) -> int:
    """The embedding rows the original builder runs with: ``load_pretrained_model`` adds ``<im_patch>``
    (``mm_use_im_patch_token``, default True) and ``<im_start>``/``<im_end>`` (``mm_use_im_start_end``) to the
    tokenizer, then ``resize_token_embeddings(len(tokenizer))``. Only the shrinking is followed: rows past the
    checkpoint's would be freshly drawn, never the same twice."""
    tokens = length(open_vocab(ckpt.tokenizer_folder, ckpt.row.tokenizer))
    tokens += int(bool(ckpt.config.get("mm_use_im_patch_token", True))) + 2 * int(bool(ckpt.config.get("mm_use_im_start_end")))
    return min(rows, tokens)


def _merge_lora(lm: nn.Module, ckpt: OriginalCheckpoint) -> nn.Module:
    """Apply the adapter with peft and merge it, as ``load_pretrained_model`` does."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cfg = ckpt.lora.adapter_config
    fields = {k: cfg[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora",
                                  "fan_in_fan_out") if k in cfg}
    peft_model = get_peft_model(lm, LoraConfig(**fields))
    # the factors as stored, as PeftModel.from_pretrained loads them: peft keeps its LoRA layers in float32
    # (autocast_adapter_dtype) whatever the base's dtype, so a float32 adapter is not rounded to float16 first
    adapter = {"base_model.model." + n: ckpt.source.read(n) for n in ckpt.source.keys() if ".lora_" in n}
    result = set_peft_model_state_dict(peft_model, adapter)
    if result.unexpected_keys:
        from ...errors import CheckpointError

        raise CheckpointError(f"{ckpt.path}: adapter tensors peft did not place: {result.unexpected_keys[:3]}")
    return peft_model.merge_and_unload()
