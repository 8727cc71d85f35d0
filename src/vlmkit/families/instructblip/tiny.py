"""Tiny InstructBLIP checkpoints with random weights, in the on-disk layouts of the real releases.

What a user has for InstructBLIP (LAVIS ``blip2_vicuna_instruct`` / ``blip2_t5_instruct``), at toy
sizes and with fixed seeds:

* ``eva_vit_g.pth``: the EVA ViT-g LAVIS downloads for every BLIP-2 (``blip2.tiny.make_eva_vit``);
* the release ``.pth`` (``instruct_blip_vicuna7b_trimmed.pth`` / ``instruct_blip_flanxl_trimmed.pth``):
  ``{"model": state_dict}`` as LAVIS's runner saves it (``save_checkpoint`` deletes the *parameters*
  that do not require grad, and keeps every buffer): ``query_tokens``, ``ln_vision.*``, the whole
  Q-Former with its text side (``Qformer.bert.embeddings.word_embeddings`` resized to the BERT
  tokenizer's length + ``[DEC]``, position embeddings, each layer's text feed-forward
  ``intermediate`` / ``output``; no ``Qformer.cls``: LAVIS sets it to None), ``llm_proj.*`` /
  ``t5_proj.*``, and the buffers: ``Qformer.bert.embeddings.position_ids`` and, for Vicuna,
  ``llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq`` (LAVIS's ``modeling_llama.py``
  registers it as a persistent buffer);
* a Vicuna folder: the LLaMA layout with the real LLaMA / Vicuna SentencePiece tokenizer
  (32,000 tokens; ``llava.tiny.make_base_llm``), or a Flan-T5 folder (``blip2.tiny``);
* a ``bert-base-uncased``-style tokenizer folder for the Q-Former: the ``flava`` family's tiny
  uncased WordPiece vocabulary (BERT's special-token layout, not its 30,522-token vocabulary, which
  is not available offline), placed beside the release ``.pth`` as ``bert-base-uncased/``;
* variants ``vicuna-full`` / ``t5-full``: a user's ``torch.save(model.state_dict(), ...)`` of the whole
  ``Blip2VicunaInstruct`` / ``Blip2T5Instruct`` (a bare state dict): the release's keys plus
  ``visual_encoder.*`` (eva_vit_g.pth's tensors, as ``init_vision_encoder`` loads them) and the language
  model as the module holds it: ``llm_model.*`` with the embedding and ``lm_head`` resized to 32,001
  rows (``resize_token_embeddings(len(llm_tokenizer))``: the ``[PAD]`` row drawn as transformers
  initialises new rows, normal with std 0.02) and the rotary buffers, or ``t5_model.*`` with T5's tied
  copies (``encoder.`` / ``decoder.embed_tokens``). All float32, as LAVIS leaves the model on the CPU
  (``load_model_and_preprocess`` calls ``model.float()``); the language model's folder is built as
  for the release (its tokenizer and config are what ``--language-model`` gives).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..blip2 import tiny as blip2_tiny
from ..blip2.tiny import TinySizes
from .checkpoint import QFORMER_TOKENIZER_DIR

VARIANTS = ("vicuna", "t5", "vicuna-full", "t5-full")
SIZES = TinySizes()  # Vicuna: llava.tiny's LLaMA is 64 wide, as blip2.tiny's language models


def make_qformer_tokenizer(folder: Path) -> int:
    """A ``bert-base-uncased``-style folder; returns the length LAVIS's tokenizer has with ``[DEC]`` added."""
    from transformers import BertTokenizer

    from ..flava.tiny import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    tokenizer = BertTokenizer.from_pretrained(folder)  # as LAVIS: Qformer.resize_token_embeddings(len(tokenizer))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return len(tokenizer)


def _rotary_buffers(config: dict) -> dict[str, torch.Tensor]:
    """``LlamaRotaryEmbedding.inv_freq`` of each layer, as LAVIS's modeling_llama.py registers it."""
    dim = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    return {f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone()
            for i in range(config["num_hidden_layers"])}


def release_state(lm: str, qformer_rows: int, lm_config: dict, sizes: TinySizes = SIZES, *,
                  seed: int = 1) -> dict[str, torch.Tensor]:
    """The trimmed release's state dict (see the module docstring)."""
    state = blip2_tiny.qformer_state(sizes, seed=seed, unused=True, position_ids=True)
    g = torch.Generator().manual_seed(seed + 5)
    for name in [n for n in state if n.startswith("Qformer.cls.")]:
        del state[name]  # blip2_vicuna_instruct.py: self.Qformer.cls = None
    # Qformer.resize_token_embeddings(len(self.tokenizer)); spread so that the instruction matters
    state["Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(qformer_rows, sizes.qformer_hidden,
                                                                         generator=g) * 0.5
    state["Qformer.bert.embeddings.position_embeddings.weight"] = torch.randn(512, sizes.qformer_hidden,
                                                                             generator=g) * 0.5
    projection = "llm_proj" if lm == "vicuna" else "t5_proj"
    state[f"{projection}.weight"] = torch.randn(lm_config.get("hidden_size") or lm_config["d_model"],
                                                sizes.qformer_hidden, generator=g) * 0.5
    state[f"{projection}.bias"] = torch.randn(state[f"{projection}.weight"].shape[0], generator=g) * 0.05
    if lm == "vicuna":
        state.update(_rotary_buffers(lm_config))
    return state


def make_language_model(folder: Path, lm: str) -> Path:
    """The language model folder LAVIS's config names (``llm_model`` / ``t5_model``)."""
    if lm == "vicuna":
        from ..llava.tiny import make_base_llm

        return make_base_llm(folder)
    return blip2_tiny.make_language_model(folder, "t5", SIZES)


def make_release(folder: Path, lm: str, language_model: Path, *, seed: int = 1) -> Path:
    """``folder/instruct_blip_*_trimmed.pth`` + ``folder/bert-base-uncased/``; returns the ``.pth``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_qformer_tokenizer(folder / QFORMER_TOKENIZER_DIR)
    lm_config = json.loads((language_model / "config.json").read_text())
    name = "instruct_blip_vicuna7b_trimmed.pth" if lm == "vicuna" else "instruct_blip_flanxl_trimmed.pth"
    torch.save({"model": release_state(lm, rows, lm_config, seed=seed)}, folder / name)
    return folder / name


def full_state(lm: str, qformer_rows: int, language_model: Path, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` of the whole LAVIS model (see the module docstring)."""
    from ...tensors import open_source
    from .checkpoint import LANGUAGE_MODELS

    lm_config = json.loads((language_model / "config.json").read_text())
    state = {"visual_encoder." + k: v for k, v in blip2_tiny.eva_vit_state(SIZES).items()}  # eva_vit_g.pth's
    state.update(release_state(lm, qformer_rows, lm_config, seed=seed))
    source = open_source(language_model)
    try:
        weights = {name: source.read(name) for name in source.keys()}
    finally:
        source.close()
    if lm == "vicuna":  # resize_token_embeddings(len(llm_tokenizer)): [PAD] gets a new row in both
        g = torch.Generator().manual_seed(seed + 7)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            weights[name] = torch.cat([weights[name], torch.randn(1, weights[name].shape[1], generator=g) * 0.02])
    prefix = LANGUAGE_MODELS["vicuna" if lm == "vicuna" else "t5"].prefix
    state.update({prefix + name: tensor for name, tensor in weights.items()})
    return state


def make_full(folder: Path, lm: str, language_model: Path, *, seed: int = 1) -> Path:
    """``folder/blip2_*_instruct_state_dict.pth`` (a bare state dict) + ``folder/bert-base-uncased/``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_qformer_tokenizer(folder / QFORMER_TOKENIZER_DIR)
    path = folder / f"blip2_{lm}_instruct_state_dict.pth"
    torch.save(full_state(lm, rows, language_model, seed=seed), path)
    return path


def tiny(folder: Path, variant: str | None = None) -> dict[str, Path]:
    """Every part of a tiny InstructBLIP (``variant``: one of ``VARIANTS``, ``vicuna`` by default): release (the
    ``.pth``), eva (none for a full state dict), lm, config."""
    variant = variant or VARIANTS[0]
    if variant not in VARIANTS:
        raise ValueError(f"InstructBLIP has no tiny variant {variant!r} (known: {', '.join(VARIANTS)})")
    lm_name, _, full = variant.partition("-")
    folder.mkdir(parents=True, exist_ok=True)
    override = folder / "tiny-heads.json"
    override.write_text(json.dumps(SIZES.override()))
    lm = make_language_model(folder / language_model_folder(variant), lm_name)
    if full:
        return {"release": make_full(folder / "lavis", lm_name, lm), "language_model": lm, "config": override}
    return {"release": make_release(folder / "lavis", lm_name, lm), "eva": blip2_tiny.make_eva_vit(
        folder / "eva" / "eva_vit_g.pth", SIZES), "language_model": lm, "config": override}


def language_model_folder(variant: str) -> str:
    """The name of the language model's folder ``tiny(folder, variant)`` builds."""
    return "vicuna-tiny" if variant.startswith("vicuna") else "flan-t5-tiny"
