"""LLaVA-1.5 and LLaVA-NeXT (1.6) as the original code (haotian-liu/LLaVA) writes them.

Recognised by ``config.json`` (``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``, the
``mm_*`` fields) or by the files of its training stages (``mm_projector.bin``;
``adapter_config.json`` + ``non_lora_trainables.bin``). The pieces:

* ``backbones``   — one row per language model (LLaMA/Vicuna, Mistral, ...): everything that differs by backbone;
* ``checkpoint``  — the input forms, presented as one namespace;
* ``convert``     — the conversion rules to transformers' Llava / LlavaNext;
* ``hf_output``   — config, tokenizer, image processor and chat template of the output;
* ``reference``   — the original forward pass, for ``vlmkit verify`` and for running originals;
* ``image_path``  — tower, projector, anyres and splice: the one image path of the reference and training;
* ``backend``     — chat and serve: the original through ``reference``, a transformers folder through transformers;
* ``data``        — what ``vlmkit data`` needs of an original checkpoint (tokenizer, template, image features);
* ``templates``   — the original cli's template choice by model name, else the backbone's default;
* ``train_model`` — the model ``vlmkit train`` trains and its start (+ ``train_outputs``, ``train_merge``);
* ``tiny``        — tiny random checkpoints in the real layouts (tests, demo, benchmarks).
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions
from .checkpoint import form_of, is_plain_llm, open_original

NAME = "llava"
ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaQwenForCausalLM")
# transformers' own LLaVA classes: what ``--to hf`` writes, read back by chat, serve and ``--to gguf``
TRANSFORMERS_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
# what ``--to hf`` writes of a LLaVA-OneVision checkpoint: run by chat and serve (vlmkit's runtime or vLLM)
ONEVISION_ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"

_ORIGINAL = ("describe", "conversion", "gguf", "verify", "chat_backend", "data_model", "training")
FORMS: dict[str, tuple[str, ...]] = {
    "full": _ORIGINAL,                    # a trained checkpoint: config.json with mm_* fields
    "lora": _ORIGINAL,                    # adapter_config.json + non_lora_trainables.bin (+ the base)
    "projector": _ORIGINAL,               # mm_projector.bin of a pre-training stage (+ the language model)
    "transformers": ("gguf", "chat_backend", "data_model", "vllm_view", "card_kind"),
    # a converted OneVision folder (its processor: onevision.py)
    "transformers_onevision": ("describe", "chat_backend", "vllm_view"),
    "projector_file": ("gguf",),          # llava_surgery.py's llava.projector (+ --vision-tower): the mmproj
    "gguf": ("card_kind",),               # what --to gguf writes: the model + its LLaVA mmproj (or the mmproj alone)
    "plain_llm": ("training",),           # a Vicuna / Mistral folder: `vlmkit train --vision-tower` makes a LLaVA of it
}

__all__ = ["NAME", "ARCHITECTURES", "FORMS", "recognise", "describe", "conversion", "open_original", "verify",
           "chat_backend", "data_model", "training"]


def recognise(path: Path, config: dict | None) -> str | None:
    if path.is_file() and path.suffix == ".projector":
        return "projector_file"
    form = form_of(path)
    if form is not None:
        return form
    architectures = (config or {}).get("architectures") or []
    if any(a in TRANSFORMERS_ARCHITECTURES for a in architectures):
        return "transformers"
    if ONEVISION_ARCHITECTURE in architectures:
        return "transformers_onevision"
    if _is_gguf(path):
        return "gguf"
    if path.is_dir() and is_plain_llm(config):
        return "plain_llm"
    return None


def conversion(found, options: LoadOptions):
    """``--to hf``: the rule table to transformers' Llava / LlavaNext (see ``convert.py``)."""
    from .convert import conversion as plan

    return plan(found.path, options)


def verify(found, converted: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of the original against its conversion ``converted``: a transformers folder (``parity.py``)
    or a GGUF folder, run in llama.cpp (``gguf_parity.py``)."""
    from ...conversion.gguf_folder import is_gguf_folder

    if is_gguf_folder(converted):
        from .gguf_parity import verify as run_gguf

        return run_gguf(found.path, Path(converted), options, probes, max_new_tokens=max_new_tokens)
    from .parity import Probe, verify as run

    return run(found.path, converted, options, [Probe(Path(i), p) for i, p in probes], max_new_tokens=max_new_tokens)


def chat_backend(found, options: LoadOptions):
    """Chat and serve: an original checkpoint through vlmkit's reference of the original forward, a
    transformers folder through transformers (``backend.py``)."""
    from .backend import OnevisionBackend, OriginalBackend, TransformersBackend

    if found.form in ("transformers", "transformers_onevision"):
        from ...tensors import open_source

        open_source(found.path).close()  # vlmkit's readers check the weights (headers, sizes) as inspect does
        if found.form == "transformers_onevision":  # its processor without torchvision, and videos
            return OnevisionBackend(found.path, options)
        return TransformersBackend(found.path, options)
    return OriginalBackend(found.path, options)


def data_model(found, options: LoadOptions, *, max_length: int | None):
    """``vlmkit data tokenize/check --model``: tokenizer, template, length, image features (``data.py``)."""
    from .data import data_model as original

    return original(found, options, max_length=max_length)


def training(found, options: LoadOptions, config=None):
    """``vlmkit train`` / ``merge-lora``: the composition of a LLaVA to train from ``found`` (see ``train_model.py``).

    Args:
        config: the run (``vlmkit.train.TrainConfig``); None for ``merge-lora``.
    """
    # not a module named training.py: importing it would replace this function on the package
    from .train_model import Composition

    return Composition(found, options, config)


def describe(found) -> dict:
    from .backbones import backbone_of
    from .templates import template_of

    path, config = found.path, found.config
    info = {"llava form": found.form}
    if found.form == "transformers_onevision":  # transformers' fields; `vlmkit inspect` adds the chat template
        vision = config.get("vision_config") or {}
        return info | {"llava version": f"OneVision ({config.get('vision_aspect_ratio')})",
                       "vision tower": f"{vision.get('model_type')}, {vision.get('num_hidden_layers')} layers, "
                                       f"{vision.get('image_size')} pixels"}
    if config:
        ratio = str(config.get("image_aspect_ratio"))
        info["llava version"] = ("NeXT (anyres)" if ratio == "anyres" else
                                 f"OneVision ({ratio})" if ratio.startswith("anyres_max") else "1.5")
        info["vision tower"] = config.get("mm_vision_tower")
        info["template"] = template_of(path, backbone_of(config, path)) or "none known (pass --template)"
    return info


# ------------------------------------------------------------------ GGUF (--to gguf: the model + the mmproj)
# (the writer is ``gguf_export.py``: a submodule named ``gguf`` would replace this function on its first import)


def gguf(found, options: LoadOptions, gguf_options):
    """``--to gguf`` of any LLaVA form: original (full, LoRA, projector), transformers folder, ``llava.projector``
    file (see ``gguf_export.py``)."""
    from .gguf_export import conversion as plan

    return plan(found.path, options, gguf_options)


# ------------------------------------------------------------------ serving (vLLM) and the model card


def vllm_view(found):
    """What vLLM reads of a transformers LLaVA, LLaVA-NeXT or LLaVA-OneVision folder: the published llava-hf names
    (vLLM's loaders of the three read the same ones), every other layout transformers writes mapped onto them
    (``layout.py``: transformers saves OneVision with LLaVA-NeXT's rules)."""
    from ...serve.engines.vllm import View
    from . import layout

    name = "LlavaOnevision" if found.form == "transformers_onevision" else "Llava"
    return View(name, layout.PUBLISHED, layout.published_name, layout.published_names, layout.published)


def _is_gguf(path: Path) -> bool:
    """A GGUF folder whose mmproj carries a LLaVA projector (``clip.has_llava_projector``, as ``--to gguf`` writes)."""
    from ...conversion import gguf_folder

    key = "clip.has_llava_projector"
    return gguf_folder.is_gguf_folder(path) and any(
        gguf_folder.header(f, key).get(key) for f in gguf_folder.files(path, gguf_folder.MMPROJ))


UNPAD = ("transformers' LLaVA-NeXT unpads the image features with `int(round(x, 7))` where the original code "
         "truncates with `int(x)`: for rare image sizes one feature row or column more (`vlmkit verify` notes it)")


def card_kind(found):
    """What the model card says of a transformers LLaVA / LLaVA-NeXT folder, or of the GGUF files --to gguf wrote."""
    from ...conversion import gguf_folder
    from ...parity.llamacpp import DEFECT
    from ...publish.card import Kind

    if found.form == "gguf":
        defect = (f"llama.cpp builds with {DEFECT}: until it is fixed upstream, its image embeddings differ from the "
                  "original's",)
        if gguf_folder.files(found.path, gguf_folder.MODEL):
            return Kind("LLaVA as GGUF for llama.cpp: the language model and its vision projector (mmproj)",
                        "image-text-to-text", "gguf", ("llava", "gguf", "llama.cpp"),
                        ("llama-mtmd-cli", "llama-server", "vlmkit-serve-llama"), defect)
        return Kind("a LLaVA vision projector (mmproj) as GGUF for llama.cpp", "image-text-to-text", "gguf",
                    ("llava", "gguf", "llama.cpp"), (), defect)
    run = ("transformers-chat", "vlmkit-chat", "vllm", "to-gguf")
    if "LlavaNextForConditionalGeneration" in (found.config or {}).get("architectures", []):
        return Kind("LLaVA-NeXT (transformers `LlavaNextForConditionalGeneration`)", "image-text-to-text",
                    "transformers", ("llava", "llava-next", "image-text-to-text"), run, (UNPAD,))
    return Kind("LLaVA-1.5 (transformers `LlavaForConditionalGeneration`)", "image-text-to-text", "transformers",
                ("llava", "image-text-to-text"), run)


# ---------------------------------------------------------------- registry walk (issue 19): tiny models and traits
# REVERSIBLE: no. --to hf drops the CLIP folder's text tower and the tower's position_ids buffer (1.5 layout), and
# merges a LoRA adapter into the base weights (W + s.B@A has no inverse).
REVERSIBLE = False
GENERATES = True
FORMS_BUILT = ("next", "lora", "projector", "onevision")  # tiny layouts besides one LLaVA-1.5 folder per backbone
# variants whose image path llama.cpp cannot run: --to gguf refuses the mmproj and says why, --to gguf --text-only
# writes the language model (the registry walk checks both)
GGUF_TEXT_ONLY = ("onevision",)
# built by make_tiny but not walked (tests/test_registry_walk.py): LLaVA-Video's verify FAILs its video probe by
# design (transformers pools and places newlines otherwise than its config says; convert warns so)
UNWALKED = ("video",)


def variants() -> tuple[str, ...]:
    """The tiny models ``make_tiny`` builds: a LLaVA-1.5 folder per backbone row that has a tiny config
    (``backbones.ROWS``; a LLaVA-NeXT folder in its release's layout for the NeXT-repository rows), then LLaVA-NeXT
    (1.6-mistral), a LoRA fine-tune, a projector pre-training run and a LLaVA-OneVision release (SigLIP inside: its
    verify is a CONDITIONAL PASS on the tower values ``tiny_options``' --config states)."""
    from .backbones import ROWS

    return tuple(name for name, row in ROWS.items() if row.tiny) + FORMS_BUILT


def make_tiny(folder: Path, variant: str | None = None) -> Path:
    """Build the tiny random model ``variant`` (default: the first) in ``folder``, beside its CLIP tower and base
    LLM, in the layouts the real releases and training runs leave; returns the path to give to vlmkit."""
    import torch

    from . import tiny

    variant = variant or variants()[0]
    if variant == "onevision":  # SigLIP inside, no CLIP folder beside it
        return tiny.make_onevision(folder / f"{tiny.ONEVISION_RELEASE}-tiny")
    if variant == "video":  # LLaVA-Video: the OneVision layout with its video fields
        return tiny.make_llava_video(folder / f"{tiny.VIDEO_RELEASE}-tiny")
    clip = tiny.make_clip(folder / "clip-vit-tiny-patch14")
    if variant == "next":
        return tiny.make_llava_next(folder / "llava-v1.6-mistral-tiny", clip)
    if variant == "lora":  # finetune_lora.sh: bfloat16 adapter beside the float16 Vicuna it was trained on
        base = tiny.make_base_llm(folder / "vicuna-tiny", dtype=torch.float16)
        return tiny.make_lora(folder / "llava-v1.5-tiny-lora", base, clip)
    if variant == "projector":
        tiny.make_base_llm(folder / "vicuna-tiny")
        return tiny.make_projector_only(folder / "llava-v1.5-tiny-pretrain", clip)
    rows = tiny.ROWS
    if variant in rows and rows[variant].tiny.get("release"):  # a LLaVA-NeXT-repository release: a NeXT checkpoint
        return tiny.make_llava_next(folder / f"{rows[variant].tiny['release']}-tiny", clip, backbone=variant)
    if variant in variants():  # a backbone row
        return tiny.make_llava15(folder / f"llava-v1.5-{variant}-tiny", clip, backbone=variant)
    raise ValueError(f"LLaVA has no tiny variant {variant!r}; variants: {', '.join(variants())}")


def tiny_options(folder: Path, variant: str | None = None) -> dict:
    """The loading options (``LoadOptions`` keywords) the model ``make_tiny(folder, variant)`` built needs: the base
    LLM of a LoRA or projector run (vlmkit takes it from ``--model-base`` only, never from the training-time path
    the run's config names)."""
    if variant in ("onevision", "video"):  # the tiny SigLIP is no released tower: what no file states, as its maker knows it
        from .tiny import ONEVISION_TOWER, VIDEO_SIZES, TinySizes

        sizes = VIDEO_SIZES if variant == "video" else TinySizes()
        return {"config": {"vision_config": {"num_attention_heads": sizes.vision_heads,
                                             "image_size": sizes.image_size, **ONEVISION_TOWER}}}
    return {"model_base": str(folder / "vicuna-tiny")} if variant in ("lora", "projector") else {}
