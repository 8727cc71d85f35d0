"""Tiny original FLAVA folders with random weights, in the on-disk layouts of the real release.

* ``flava.pt``: the original state dict (``image_encoder.module.*``, ``text_encoder.module.*``
  with the ``position_ids`` buffer, ``mm_encoder.module.*`` with ``encoder.cls_token``, the
  second copies ``image_encoder.embeddings.*`` / ``text_encoder.embeddings.*``, projections,
  ``heads.*`` whose ``predictions.bias`` is ``predictions.decoder.bias``), written from its own
  description of the original names, not from transformers' model;
* ``encoder.pkl``: the DALL-E dVAE encoder pickled as OpenAI ships it: ``torch.save`` of the
  module in torch's legacy (non-zip) format, classes ``dall_e.encoder.Encoder`` /
  ``EncoderBlock`` and ``dall_e.utils.Conv2d`` (parameters ``w``, ``b``) inside torch's
  ``Sequential`` / ``ReLU`` / ``MaxPool2d`` / ``Identity``. The classes are stand-ins defined
  here with DALL-E's names and attributes, registered under ``dall_e.*`` only while pickling;
  or ``encoder.pt``, its state dict;
* a tiny BERT-style WordPiece ``vocab.txt`` built deterministically here (bert-base-uncased's
  special-token ids: ``[PAD]``=0, ``[UNK]``=100, ``[CLS]``=101, ``[SEP]``=102, ``[MASK]``=103,
  then a fixed word list): the layout of FLAVA's tokenizer, not its vocabulary, which is not
  available offline.

The DALL-E code asks for ``n_hid >= 64`` and ``vocab_size >= 512``; the tiny codebook is
smaller (the stand-ins do not validate): only the layout is the real one.
"""

from __future__ import annotations

import contextlib
import json
import string
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class TinySizes:
    hidden: int = 32
    intermediate: int = 64
    heads: int = 2
    image_layers: int = 2
    text_layers: int = 2
    mm_layers: int = 1
    image_size: int = 64
    patch: int = 16
    max_positions: int = 64
    projection: int = 16
    codebook_hidden: int = 16
    codebook_vocab: int = 64
    codebook_blocks: int = 2

    def override(self) -> dict:
        """The ``--config`` a tiny FLAVA needs: its head counts (no shape tells them)."""
        return {f"{k}_config": {"num_attention_heads": self.heads} for k in ("image", "text", "multimodal")}


WORDS = ("a an the of in on at to is are was with and photo picture image cat dog man woman two cats sitting lying "
         "sofa couch red blue green yellow what shown this describe colours colors question answer rocket sky "
         "launch pad smoke tower night").split()


def write_tokenizer(folder: Path) -> int:
    """vocab.txt + tokenizer_config.json of a tiny uncased WordPiece vocabulary; returns its size."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    vocab += WORDS + ["##" + c for c in string.ascii_lowercase + string.digits]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # bert-base-uncased's tokenizer_config.json names no tokenizer class
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return len(vocab)


# ------------------------------------------------------------------------------ the FLAVA state dict


class _Init:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, scale=0.1):
        return torch.randn(*shape, generator=self.g) * scale


def _linear(state, init, name, d_out, d_in):
    state[f"{name}.weight"] = init(d_out, d_in, scale=d_in**-0.5)
    state[f"{name}.bias"] = init(d_out, scale=0.05)


def _norm(state, init, name, width):
    state[f"{name}.weight"] = 1 + init(width)
    state[f"{name}.bias"] = init(width, scale=0.05)


def _encoder(state, init, prefix, layers, s: TinySizes):
    h = s.hidden
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}."
        for n in ("query", "key", "value"):
            _linear(state, init, p + f"attention.attention.{n}", h, h)
        _linear(state, init, p + "attention.output.dense", h, h)
        _linear(state, init, p + "intermediate.dense", s.intermediate, h)
        _linear(state, init, p + "output.dense", h, s.intermediate)
        _norm(state, init, p + "layernorm_before", h)
        _norm(state, init, p + "layernorm_after", h)
    _norm(state, init, prefix + "layernorm", h)
    _linear(state, init, prefix + "pooler.dense", h, h)


def _head(state, init, prefix, vocab, h):
    _linear(state, init, prefix + ".transform.dense", h, h)
    _norm(state, init, prefix + ".transform.LayerNorm", h)
    state[prefix + ".decoder.weight"] = init(vocab, h, scale=h**-0.5)
    state[prefix + ".decoder.bias"] = init(vocab, scale=0.05)
    state[prefix + ".bias"] = state[prefix + ".decoder.bias"]  # one tensor under two names, as BERT's head


def flava_state(s: TinySizes, text_vocab: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    init, h = _Init(seed), s.hidden
    grid = (s.image_size // s.patch) ** 2
    state: dict[str, torch.Tensor] = {}
    ie = "image_encoder.module.embeddings."
    state[ie + "cls_token"] = init(1, 1, h, scale=0.5)
    state[ie + "mask_token"] = init(1, 1, h, scale=0.5)
    state[ie + "position_embeddings"] = init(1, grid + 1, h, scale=0.5)
    state[ie + "patch_embeddings.projection.weight"] = init(h, 3, s.patch, s.patch, scale=0.05)
    state[ie + "patch_embeddings.projection.bias"] = init(h, scale=0.05)
    _encoder(state, init, "image_encoder.module.", s.image_layers, s)
    te = "text_encoder.module.embeddings."
    state[te + "word_embeddings.weight"] = init(text_vocab, h, scale=0.5)
    state[te + "position_embeddings.weight"] = init(s.max_positions, h, scale=0.5)
    state[te + "token_type_embeddings.weight"] = init(2, h, scale=0.5)
    _norm(state, init, te + "LayerNorm", h)
    state[te + "position_ids"] = torch.arange(s.max_positions)[None]
    _encoder(state, init, "text_encoder.module.", s.text_layers, s)
    state["mm_encoder.module.encoder.cls_token"] = init(1, 1, h, scale=0.5)
    _encoder(state, init, "mm_encoder.module.", s.mm_layers, s)
    for kind in ("image", "text"):  # the wrappers' second reference to their module's embeddings
        prefix = f"{kind}_encoder.module.embeddings."
        for name in [n for n in state if n.startswith(prefix)]:
            state[f"{kind}_encoder.embeddings." + name[len(prefix):]] = state[name]
    _linear(state, init, "mm_image_projection", h, h)
    _linear(state, init, "mm_text_projection", h, h)
    _linear(state, init, "image_projection", s.projection, h)
    _linear(state, init, "text_projection", s.projection, h)
    state["heads.cmd.clip_head.logit_scale"] = torch.tensor(2.6592)
    _head(state, init, "heads.cmd.mim_head.cls.predictions", s.codebook_vocab, h)
    _head(state, init, "heads.cmd.mlm_head.cls.predictions", text_vocab, h)
    _head(state, init, "heads.fairseq_mlm.cls.predictions", text_vocab, h)
    _head(state, init, "heads.imagenet.mim_head.cls.predictions", s.codebook_vocab, h)
    _linear(state, init, "heads.cmd.itm_head.pooler.dense", h, h)
    _linear(state, init, "heads.cmd.itm_head.cls.seq_relationship", 2, h)
    return state


# ------------------------------------------------------------------------------ the DALL-E encoder


class Conv2d(nn.Module):
    """Stand-in for ``dall_e.utils.Conv2d`` (attributes and parameters ``w``, ``b`` as DALL-E's)."""

    def __init__(self, n_in, n_out, kw, g, use_float16=True):
        super().__init__()
        self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
        self.device, self.requires_grad = torch.device("cpu"), False
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw, generator=g) / (n_in * kw**2) ** 0.5,
                              requires_grad=False)
        self.b = nn.Parameter(torch.randn(n_out, generator=g) * 0.05, requires_grad=False)


class EncoderBlock(nn.Module):
    """Stand-in for ``dall_e.encoder.EncoderBlock``."""

    def __init__(self, n_in, n_out, n_layers, g):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = None, False
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv2d(n_in, n_out, 1, g) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, self.n_hid, 3, g)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(self.n_hid, self.n_hid, 3, g)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(self.n_hid, self.n_hid, 3, g)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(self.n_hid, n_out, 1, g))]))


class Encoder(nn.Module):
    """Stand-in for ``dall_e.encoder.Encoder`` (four groups, ``n_blk_per_group`` blocks each)."""

    def __init__(self, n_hid: int, vocab_size: int, n_blk_per_group: int, *, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.group_count, self.n_hid, self.n_blk_per_group = 4, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = 3, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
        n_layers = self.group_count * n_blk_per_group
        widths = [(n_hid, n_hid), (n_hid, 2 * n_hid), (2 * n_hid, 4 * n_hid), (4 * n_hid, 8 * n_hid)]
        groups = [("input", Conv2d(3, n_hid, 7, g))]
        for number, (w_in, w_out) in enumerate(widths, start=1):
            blocks = [(f"block_{i + 1}", EncoderBlock(w_in if i == 0 else w_out, w_out, n_layers, g))
                      for i in range(n_blk_per_group)]
            if number < 4:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{number}", nn.Sequential(OrderedDict(blocks))))
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1, g, use_float16=False))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))


@contextlib.contextmanager
def dall_e_names():
    """Let pickle find the stand-ins as ``dall_e.encoder.*`` / ``dall_e.utils.*``, for the block only."""
    names = {"dall_e.encoder": {"Encoder": Encoder, "EncoderBlock": EncoderBlock}, "dall_e.utils": {"Conv2d": Conv2d}}
    saved = {cls: (cls.__module__, cls.__qualname__) for classes in names.values() for cls in classes.values()}
    added = []
    try:
        for module, classes in {"dall_e": {}, **names}.items():
            if module not in sys.modules:
                sys.modules[module] = types.ModuleType(module)
                added.append(module)
            for name, cls in classes.items():
                setattr(sys.modules[module], name, cls)
                cls.__module__, cls.__qualname__ = module, name
        yield
    finally:
        for cls, (module, qualname) in saved.items():
            cls.__module__, cls.__qualname__ = module, qualname
        for module in added:
            del sys.modules[module]


def make_codebook(path: Path, s: TinySizes = TinySizes(), *, pickled: bool = True, seed: int = 1) -> Path:
    """``encoder.pkl`` (the pickled module, legacy format) or, with ``pickled=False``, its state dict."""
    encoder = Encoder(s.codebook_hidden, s.codebook_vocab, s.codebook_blocks, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not pickled:
        torch.save(encoder.state_dict(), path)
        return path
    import warnings

    with dall_e_names(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Couldn't retrieve source code for container": the stand-ins have none
        torch.save(encoder, path, _use_new_zipfile_serialization=False)
    return path


def make_flava(folder: Path, s: TinySizes = TinySizes(), *, pickled_codebook: bool = True, seed: int = 0) -> Path:
    """A FLAVA folder: ``flava.pt``, the codebook (``encoder.pkl`` or ``encoder.pt``) and the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    torch.save(flava_state(s, vocab, seed=seed), folder / "flava.pt")
    make_codebook(folder / ("encoder.pkl" if pickled_codebook else "encoder.pt"), s, pickled=pickled_codebook,
                  seed=seed + 1)
    return folder
