"""The original FLAVA checkpoint and its DALL-E image codebook, presented as one namespace.

The released FLAVA (facebookresearch/multimodal) is a ``.pt`` state dict with the encoders
under ``image_encoder.module.*``, ``text_encoder.module.*``, ``mm_encoder.module.*``, the
pre-training heads under ``heads.*``, the projections and ``heads.cmd.clip_head.logit_scale``.
The image codebook is not in it: FLAVA labels masked patches with OpenAI's DALL-E dVAE
encoder, shipped as ``encoder.pkl`` (a pickled ``dall_e.encoder.Encoder``) or as its state dict.

A FLAVA folder holds the checkpoint, the codebook and the text tokenizer (``bert-base-uncased``'s
``vocab.txt`` / ``tokenizer.json``: FLAVA's text encoder uses it; no checkpoint carries it). The
codebook's tensors appear under ``dalle.`` with DALL-E's names (``dalle.blocks.input.w``), read
through the allow-list unpickler when pickled: nothing from the file runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import CheckpointError, ConfigError, UnsafeCheckpointError
from ...tensors import TensorSource
from ...tensors.safe_pickle import DALLE_CLASSES, PickledModuleSource, peek_state_dict
from ...tensors.torch_io import TorchSource
from ...tensors.views import CombinedSource, RenamedSource

PICKLES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
CODEBOOK = "dalle."
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass
class OriginalFlava:
    """An original FLAVA checkpoint with its codebook and tokenizer, ready to convert or to run."""

    path: Path  # the FLAVA .pt
    folder: Path
    codebook_path: Path
    codebook_form: str  # "pickled module" | "state dict"
    source: TensorSource  # FLAVA's names + dalle.* (see module docstring)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.info(name).shape


def is_flava(names) -> bool:
    names = list(names)
    return any(n.startswith("image_encoder.module.") for n in names) and \
        any(n.startswith("mm_encoder.module.") for n in names)


def is_dalle(names) -> bool:
    return "blocks.input.w" in set(names)


def _candidates(path: Path) -> list[Path]:
    folder = path if path.is_dir() else path.parent
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in PICKLES] if folder.is_dir() else []


def _state_dict_keys(path: Path) -> list[str] | None:
    """The tensor names of a plain state-dict pickle (no data read), or None (a pickled module, not a checkpoint)."""
    tensors = peek_state_dict(path)
    return list(tensors) if tensors is not None else None


def find_checkpoint(path: Path) -> Path | None:
    """The FLAVA ``.pt`` a path names: the file itself, or the one in a folder. Reads no tensor data."""
    if path.is_file():
        return path if path.suffix in PICKLES and is_flava(_state_dict_keys(path) or []) else None
    found = [p for p in _candidates(path) if p.suffix != ".pkl" and is_flava(_state_dict_keys(p) or [])]
    return found[0] if len(found) == 1 else None


def open_codebook(path: Path) -> tuple[TensorSource, str]:
    """A DALL-E encoder file as a source: a state dict, or a pickled module read into inert records.

    Raises:
        UnsafeCheckpointError: the pickle names a class outside the dVAE's allow-list (nothing ran).
        CheckpointError: the file holds neither.
    """
    keys = _state_dict_keys(path)
    if keys is not None:
        if not is_dalle(keys):
            raise CheckpointError(f"{path}: a state dict, but not of the DALL-E encoder (no blocks.input.w)")
        return TorchSource(path, [path]), "state dict"
    source = PickledModuleSource(path, DALLE_CLASSES)  # raises UnsafeCheckpointError naming the class
    if source.root_class != "dall_e.encoder.Encoder" or not is_dalle(source.keys()):
        raise CheckpointError(f"{path}: a pickled {source.root_class}, not DALL-E's dall_e.encoder.Encoder")
    return source, "pickled module"


def open_original(path: Path) -> OriginalFlava:
    """Open a FLAVA folder (or its ``.pt``): checkpoint, codebook and tokenizer, without reading tensor data.

    Raises:
        CheckpointError / ConfigError: naming the missing piece and where to put it.
    """
    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        raise CheckpointError(f"{path}: not an original FLAVA checkpoint (a .pt state dict with image_encoder.module.* "
                              "and mm_encoder.module.*)", hint="`vlmkit inspect` lists what it holds")
    folder = checkpoint.parent
    codebook, form = None, ""
    refused: UnsafeCheckpointError | None = None
    for candidate in _candidates(folder):
        if candidate == checkpoint:
            continue
        try:
            codebook, form = open_codebook(candidate)
            break
        except UnsafeCheckpointError as e:
            refused = e
        except CheckpointError:
            continue
    if codebook is None:
        if refused is not None:
            raise refused
        raise ConfigError(f"{folder}: no image codebook beside {checkpoint.name}: FLAVA's masked-image labels come "
                          "from the DALL-E dVAE encoder", hint=f"put OpenAI's encoder.pkl (or a state dict of it) in {folder}")
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(f"{folder}: no text tokenizer (tokenizer.json or vocab.txt); FLAVA's text encoder uses "
                          "bert-base-uncased's, and the converted processor needs it",
                          hint=f"copy bert-base-uncased's vocab.txt / tokenizer.json / tokenizer_config.json into {folder}")
    main = TorchSource(checkpoint, [checkpoint])
    renamed = RenamedSource(codebook, {n: CODEBOOK + n for n in codebook.keys()})
    source = CombinedSource([("", main), ("", renamed)], path=checkpoint)
    return OriginalFlava(checkpoint, folder, codebook.path, form, source)
