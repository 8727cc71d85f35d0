"""Tiny BLIP-2 checkpoints with random weights, in the on-disk layouts of the real releases.

No machine here reaches a hub, so tests and benchmarks build, at toy sizes and with fixed
seeds, what LAVIS and the hub would provide:

* ``eva_vit_g.pth``: a bare state dict of LAVIS's EVA ViT (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.{i}.*`` with ``attn.q_bias`` / ``attn.v_bias``);
* a release ``.pth``: ``{"model": ...}`` with ``query_tokens``, ``ln_vision.*``, ``Qformer.*``,
  ``opt_proj.*`` / ``t5_proj.*``. It also carries the Q-Former parts a Stage-1-initialised
  model holds and ``Blip2OPT`` sets to None (word/position embeddings, the ``cls`` head, each
  layer's text feed-forward), so that the rules that drop them are exercised;
* a full state dict: ``{"model": original_model.state_dict()}`` (``visual_encoder.*``,
  ``opt_model.*`` / ``t5_model.*`` with their tied copies, ``Qformer.bert.embeddings.position_ids``);
* an OPT folder: config, ``model.safetensors`` (``model.decoder.*``, head tied), and a tokenizer
  with OPT's special-token layout (``<s>``=0, ``<pad>``=1, ``</s>``=2 as BOS and EOS, ``<unk>``=3)
  over the real GPT-2 byte-level BPE (``assets/tokenizers/gpt2-bpe``). OPT's own vocabulary
  orders the same BPE tokens by fairseq's dictionary, which is not available offline: here
  every GPT-2 token keeps its order, moved up by the four specials. Segmentation is GPT-2's
  (= OPT's); the ids other than the specials are not OPT's real ids;
* a Flan-T5 folder: config (gated-gelu, untied head), ``model.safetensors`` with ``shared``,
  both ``embed_tokens`` copies and ``lm_head``, and a *tiny T5-style tokenizer* built here
  deterministically (a Unigram model over a fixed word list, T5's ``<pad>``=0, ``</s>``=1,
  ``<unk>``=2 and 100 ``<extra_id_N>`` sentinels). There is no real SentencePiece model of
  Flan-T5 on this machine: this tokenizer only has T5's layout, not its vocabulary.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .language_models import row

ASSETS = Path(__file__).resolve().parents[2] / "assets"
GPT2_BPE = ASSETS / "tokenizers" / "gpt2-bpe"
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


@dataclass(frozen=True)
class TinySizes:
    """Toy sizes. Head counts are not in any shape: pass them with ``--config`` (see ``override``)."""

    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 2
    image_size: int = 56
    patch: int = 14
    qformer_hidden: int = 32
    qformer_layers: int = 4
    qformer_heads: int = 2
    qformer_intermediate: int = 64
    cross_attention_freq: int = 2
    queries: int = 4
    lm_hidden: int = 64
    lm_layers: int = 2
    lm_heads: int = 2
    lm_ffn: int = 128
    t5_vocab: int = 512

    @property
    def vision_intermediate(self) -> int:
        return int(self.vision_hidden * 4.3637)  # eva_vit.py: mlp_ratio=4.3637

    def override(self) -> dict:
        """The ``--config`` JSON a tiny model needs: the head counts LAVIS hard-codes for the real sizes."""
        return {"vision_config": {"num_attention_heads": self.vision_heads},
                "qformer_config": {"num_attention_heads": self.qformer_heads}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(state: dict, name: str, d_out: int, d_in: int, g: torch.Generator, scale: float = 0.2) -> None:
    state[f"{name}.weight"] = torch.randn(d_out, d_in, generator=g) * scale / d_in**0.5 * 4
    state[f"{name}.bias"] = torch.randn(d_out, generator=g) * 0.05


def _norm(state: dict, name: str, width: int, g: torch.Generator) -> None:
    state[f"{name}.weight"] = 1 + 0.1 * torch.randn(width, generator=g)
    state[f"{name}.bias"] = 0.05 * torch.randn(width, generator=g)


def eva_vit_state(sizes: TinySizes = TinySizes(), *, seed: int = 0) -> dict[str, torch.Tensor]:
    """eva_vit_g.pth at toy size: LAVIS's ``VisionTransformer`` names, no ``visual_encoder.`` prefix."""
    g, w = _gen(seed), sizes.vision_hidden
    grid = (sizes.image_size // sizes.patch) ** 2
    state = {"cls_token": torch.randn(1, 1, w, generator=g) * 0.5,
             "pos_embed": torch.randn(1, grid + 1, w, generator=g) * 0.5,
             "patch_embed.proj.weight": torch.randn(w, 3, sizes.patch, sizes.patch, generator=g) * 0.05,
             "patch_embed.proj.bias": torch.randn(w, generator=g) * 0.05}
    for i in range(sizes.vision_layers):
        p = f"blocks.{i}."
        _norm(state, p + "norm1", w, g)
        state[p + "attn.q_bias"] = torch.randn(w, generator=g) * 0.1
        state[p + "attn.v_bias"] = torch.randn(w, generator=g) * 0.1
        state[p + "attn.qkv.weight"] = torch.randn(3 * w, w, generator=g) * w**-0.5
        _linear(state, p + "attn.proj", w, w, g)
        _norm(state, p + "norm2", w, g)
        _linear(state, p + "mlp.fc1", sizes.vision_intermediate, w, g)
        _linear(state, p + "mlp.fc2", w, sizes.vision_intermediate, g)
    return state


def qformer_state(sizes: TinySizes = TinySizes(), *, seed: int = 1, unused: bool = False,
                  position_ids: bool = False) -> dict[str, torch.Tensor]:
    """``query_tokens``, ``ln_vision.*`` and ``Qformer.*`` under LAVIS's names.

    Args:
        unused: add what ``Blip2OPT`` sets to None (word/position embeddings, cls head, text FFN).
        position_ids: add the ``position_ids`` buffer ``original_model.state_dict()`` has.
    """
    g, h, vw = _gen(seed), sizes.qformer_hidden, sizes.vision_hidden
    state = {"query_tokens": torch.randn(1, sizes.queries, h, generator=g) * 0.5}
    _norm(state, "ln_vision", vw, g)
    _norm(state, "Qformer.bert.embeddings.LayerNorm", h, g)
    if position_ids:
        state["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    if unused:
        state["Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(100, h, generator=g) * 0.02
        state["Qformer.bert.embeddings.position_embeddings.weight"] = torch.randn(512, h, generator=g) * 0.02
    for i in range(sizes.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        for kind, kv in (("attention", h), ("crossattention", vw)):
            if kind == "crossattention" and i % sizes.cross_attention_freq:
                continue
            _linear(state, p + f"{kind}.self.query", h, h, g)
            _linear(state, p + f"{kind}.self.key", h, kv, g)
            _linear(state, p + f"{kind}.self.value", h, kv, g)
            _linear(state, p + f"{kind}.output.dense", h, h, g)
            _norm(state, p + f"{kind}.output.LayerNorm", h, g)
        for suffix in ("_query",) + (("",) if unused else ()):
            _linear(state, p + f"intermediate{suffix}.dense", sizes.qformer_intermediate, h, g)
            _linear(state, p + f"output{suffix}.dense", h, sizes.qformer_intermediate, g)
            _norm(state, p + f"output{suffix}.LayerNorm", h, g)
    if unused:
        _linear(state, "Qformer.cls.predictions.transform.dense", h, h, g)
        _norm(state, "Qformer.cls.predictions.transform.LayerNorm", h, g)
        state["Qformer.cls.predictions.decoder.weight"] = torch.randn(100, h, generator=g) * 0.02
        state["Qformer.cls.predictions.bias"] = torch.zeros(100)
        state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    return state


# ------------------------------------------------------------------------------ tokenizers


def write_opt_tokenizer(folder: Path) -> None:
    """GPT-2's BPE with OPT's special tokens in front (see the module docstring)."""
    data = json.loads((GPT2_BPE / "tokenizer.json").read_text())
    vocab = {t: i for i, t in enumerate(OPT_SPECIALS)}
    vocab.update({t: i + len(OPT_SPECIALS) for t, i in data["model"]["vocab"].items()})
    data["model"]["vocab"] = vocab
    special = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    data["added_tokens"] = [{"id": i, "content": t, **special} for i, t in enumerate(OPT_SPECIALS)] + \
        [{**a, "id": a["id"] + len(OPT_SPECIALS)} for a in data["added_tokens"]]
    bos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    data["post_processor"] = {  # OPT's tokenizer puts </s> (its BOS) in front of every text
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
        "unk_token": "</s>", "pad_token": "<pad>", "add_prefix_space": False, "errors": "replace",
        "model_max_length": 1000000000000000019884624838656})


T5_WORDS = ("a an the of in on at to is are was with and photo picture image cat dog man woman two cats sitting "
            "lying sofa couch red blue green yellow what shown this describe colours colors question answer rocket "
            "sky launch pad smoke tower night").split()


def write_t5_tokenizer(folder: Path) -> None:
    """A tiny, deterministic T5-style Unigram tokenizer (layout of T5's, not its vocabulary)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -4.0 - 0.01 * i) for i, w in enumerate(T5_WORDS)]
    chars = string.ascii_letters + string.digits + string.punctuation
    seen = {p for p, _ in pieces}
    pieces += [(p, s) for c in chars for p, s in (("▁" + c, -8.0), (c, -9.0)) if p not in seen]
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(100))]
    tok = Tokenizer(models.Unigram(pieces + [(s, 0.0) for s in sentinels], unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<pad>", "</s>", "<unk>", *sentinels]])
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_ids": 100, "additional_special_tokens": sentinels, "model_max_length": 512})


# ------------------------------------------------------------------------------ language models


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _spread(model: torch.nn.Module) -> None:
    with torch.no_grad():  # random init draws tiny logits; spread them so greedy decoding is not degenerate
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)


def opt_config(sizes: TinySizes) -> dict:
    """``facebook/opt-*``'s config.json fields at toy size."""
    return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_dropout": 0.0,
            "activation_function": "relu", "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 2,
            "pad_token_id": 1, "do_layer_norm_before": True, "dropout": 0.1, "enable_bias": True,
            "ffn_dim": sizes.lm_ffn, "hidden_size": sizes.lm_hidden, "init_std": 0.02, "layerdrop": 0.0,
            "max_position_embeddings": 256, "num_attention_heads": sizes.lm_heads,
            "num_hidden_layers": sizes.lm_layers, "prefix": "</s>", "torch_dtype": "float32", "use_cache": True,
            "vocab_size": 50272, "word_embed_proj_dim": sizes.lm_hidden}


def t5_config(sizes: TinySizes) -> dict:
    """``google/flan-t5-*``'s config.json fields at toy size."""
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_ff": sizes.lm_ffn,
            "d_kv": sizes.lm_hidden // sizes.lm_heads, "d_model": sizes.lm_hidden, "decoder_start_token_id": 0,
            "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
            "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-6,
            "n_positions": 512, "num_decoder_layers": sizes.lm_layers, "num_heads": sizes.lm_heads,
            "num_layers": sizes.lm_layers, "pad_token_id": 0, "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "torch_dtype": "float32",
            "use_cache": True, "vocab_size": sizes.t5_vocab}


@dataclass(frozen=True)
class TinyLanguageModel:
    """How to build one row's tiny language model folder (``language_models.ROWS``)."""

    config: Callable[[TinySizes], dict]  # config.json
    write_tokenizer: Callable[[Path], None]
    generation_config: dict


# one per row of language_models.ROWS
BUILDERS = {
    "opt": TinyLanguageModel(opt_config, write_opt_tokenizer, {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}),
    "t5": TinyLanguageModel(t5_config, write_t5_tokenizer, {"decoder_start_token_id": 0, "eos_token_id": 1,
                                                            "pad_token_id": 0}),
}


def _tied(cfg: dict) -> bool:
    return cfg.get("tie_word_embeddings", True)  # transformers' default


def language_model_state(lm: str, sizes: TinySizes = TinySizes(), *, seed: int = 2) -> dict[str, torch.Tensor]:
    """The LM's full state dict as transformers names it (tied copies included)."""
    import transformers
    from transformers import AutoConfig

    torch.manual_seed(seed)
    cfg = BUILDERS[lm].config(sizes)
    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    model = getattr(transformers, row(lm).transformers_class)(config)
    _spread(model)
    if not _tied(cfg):  # flan-t5: an untied output layer
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(torch.randn(sizes.t5_vocab, sizes.lm_hidden) * 0.1)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def make_language_model(folder: Path, lm: str, sizes: TinySizes = TinySizes(), *, seed: int = 2,
                        weights: bool = True) -> Path:
    """An OPT or Flan-T5 transformers folder (config, tokenizer, and unless ``weights=False`` the weights)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tiny = BUILDERS[lm]
    cfg = tiny.config(sizes)
    _write_json(folder / "config.json", cfg)
    tiny.write_tokenizer(folder)
    _write_json(folder / "generation_config.json", tiny.generation_config)
    if weights:
        state = language_model_state(lm, sizes, seed=seed)
        if _tied(cfg):
            state.pop("lm_head.weight")  # tied: save_pretrained leaves it out
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _projection(lm: str, sizes: TinySizes, seed: int) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    _linear(state, row(lm).original_projection, sizes.lm_hidden, sizes.qformer_hidden, _gen(seed))
    return state


# ------------------------------------------------------------------------------ LAVIS checkpoints


def make_eva_vit(path: Path, sizes: TinySizes = TinySizes(), *, seed: int = 0) -> Path:
    """eva_vit_g.pth: a bare state dict, as LAVIS downloads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(eva_vit_state(sizes, seed=seed), path)
    return path


def make_release(path: Path, lm: str, sizes: TinySizes = TinySizes(), *, seed: int = 1) -> Path:
    """A LAVIS release ``.pth`` (``blip2_pretrained_opt2.7b.pth`` / ``..._flant5xl.pth``): ``{"model": ...}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**qformer_state(sizes, seed=seed, unused=True), **_projection(lm, sizes, seed + 10)}
    torch.save({"model": state}, path)
    return path


def make_full(path: Path, lm: str, sizes: TinySizes = TinySizes(), *, seed: int = 1) -> Path:
    """``{"model": original_model.state_dict()}``: ViT, Q-Former, projection and LM in one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"visual_encoder." + k: v for k, v in eva_vit_state(sizes, seed=seed + 20).items()}
    state.update(qformer_state(sizes, seed=seed, position_ids=True))
    state.update(_projection(lm, sizes, seed + 10))
    state.update({row(lm).original_prefix + k: v for k, v in language_model_state(lm, sizes, seed=seed + 30).items()})
    torch.save({"model": state}, path)
    return path
