"""The same files llama.cpp's own converters write, on the same tiny models; every difference intended.

vlmkit converts the ORIGINAL checkpoint in one command. llama.cpp's route: its current converter
(``convert_hf_to_gguf.py``) on the transformers folder (for NeXT, on the language model exported
on its own, as llama.cpp's docs say), and the legacy pair (``llava_surgery_v2.py`` +
``convert_image_encoder_to_gguf.py``) for the projector. Keys must hold equal values; tensors
equal names, shapes and types, and values bit-identical (within F16 rounding where a type differs
on purpose).
"""

from __future__ import annotations

import pytest

from ..conftest import run_cli
from . import llama_tools

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gguf")]

# ------------------------------------------------------------------ intended differences, with reasons
LM_KEYS = {
    "tokenizer.ggml.add_eos_token": ("ours only", "written from the original tokenizer_config.json (add_eos_token: "
                                     "false); llama.cpp read the transformers tokenizer.json, which has no such flag"),
    "tokenizer.ggml.add_sep_token": ("theirs only", "llama.cpp derives it from tokenizer.json's post-processor (a "
                                     "BERT notion); a SentencePiece LLaMA tokenizer has no separator"),
}
# where llama.cpp's converter reads a folder vlmkit converted, it also copies its model card's tags
CARD_KEYS = {
    "general.tags": ("theirs only", "llama.cpp copies the tags of the model card (README.md) of the folder it reads: "
                     "here the card vlmkit wrote into its transformers output; the original checkpoint has none"),
}
MMPROJ_KEYS = {
    "clip.vision.feature_layer": ("ours only", "always written: without it llama.cpp runs one vision block too few "
                                  "(ggml-org/llama.cpp#25817); the legacy converter writes it only when the CLIP "
                                  "folder's config names mm_vision_select_layer"),
}
NEXT_MMPROJ_KEYS = {
    "clip.vision.image_aspect_ratio": ("theirs only", "copied from the vit config by the legacy converter; clip.cpp "
                                       "never reads it"),
    "clip.vision.mm_projector_type": ("theirs only", "copied from the vit config; clip.cpp reads clip.projector_type"),
}
MMPROJ_TENSORS = {
    "v.position_embd.weight": ("type F32 vs F16", "position embeddings stay F32, as llama.cpp's current converter "
                               "keeps V_ENC_EMBD_POS; the legacy converter rounds every 2-D .weight to F16"),
}
NEXT_TENSORS = {
    "v.image_newline": ("ours only", "the name clip.cpp reads (TN_IMAGE_NEWLINE); nothing in llama.cpp reads the "
                        "legacy converter's model.image_newline"),
    "model.image_newline": ("theirs only", "see v.image_newline"),
}
F32_TENSORS = {  # --dtype f32 vs the legacy --use-f32
    name: ("type F32 vs F16", "f32 was asked: the legacy converter writes the projector matrices and the patch "
           "convolution in F16 regardless (clip.cpp runs them in F32: the mtmd tests load these files)")
    for name in ("mm.0.weight", "mm.2.weight", "v.patch_embd.weight")
}


def _assert_only_intended(d: llama_tools.Differences, keys: dict, tensors: dict) -> None:
    assert {k: v for k, v in d.keys.items()} == {k: v[0] for k, v in keys.items()}, d.keys
    assert {k: v for k, v in d.tensors.items()} == {k: v[0] for k, v in tensors.items()}, d.tensors
    assert not d.values, f"values beyond the types' rounding: {d.values}"
    assert all(reason for _, reason in [*keys.values(), *tensors.values()])


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llava15_language_model(gguf_of, llama_cpp_files, outtype):
    ours = gguf_of("v15", "--dtype", outtype)
    d = llama_tools.compare(ours / f"llava-v1.5-tiny-{outtype}.gguf", llama_cpp_files.lm("v15", outtype))
    # every tensor bit-identical: q/k permutation, new rows, Q8_0 blocks
    _assert_only_intended(d, {**LM_KEYS, **CARD_KEYS}, {})


def test_llava15_mmproj(gguf_of, llama_cpp_files):
    ours = gguf_of("v15", "--mmproj-only")
    assert [p.name for p in ours.glob("*.gguf")] == ["mmproj-llava-v1.5-tiny-f16.gguf"]
    d = llama_tools.compare(ours / "mmproj-llava-v1.5-tiny-f16.gguf", llama_cpp_files.mmproj("v15-f16"))
    _assert_only_intended(d, MMPROJ_KEYS, MMPROJ_TENSORS)


def test_llava_next_both_files_f32(parts, gguf_of, llama_cpp_files):
    ours = gguf_of("next", "--dtype", "f32", "--vision-tower", parts["clip"])
    d = llama_tools.compare(ours / "mmproj-llava-v1.6-mistral-tiny-f32.gguf", llama_cpp_files.mmproj("next-f32"))
    _assert_only_intended(d, NEXT_MMPROJ_KEYS, {**NEXT_TENSORS, **F32_TENSORS})
    theirs = llama_cpp_files.lm("next", "f32")
    named = {"general.name": ("theirs only", "llama.cpp guessed it from the name of the folder the fixture exported "
                                             "the language model to ('mistral-lm' -> 'Mistral Lm'); vlmkit writes none")}
    _assert_only_intended(llama_tools.compare(ours / "llava-v1.6-mistral-tiny-f32.gguf", theirs), {**LM_KEYS, **named}, {})


def test_lora_checkpoint_merged_as_llama_cpp_reads_the_merged_model(parts, gguf_of, llama_cpp_files):
    """The LoRA form straight to GGUF = llama.cpp's converter on the merged transformers folder
    (whose merge tests/families proves against peft)."""
    ours = gguf_of("lora", "--dtype", "f16", "--model-base", parts["base"])
    d = llama_tools.compare(ours / "llava-v1.5-tiny-lora-f16.gguf", llama_cpp_files.lm("lora", "f16"))
    _assert_only_intended(d, {**LM_KEYS, **CARD_KEYS}, {})


def test_llava_projector_file_from_the_old_path(parts, gguf_of, llama_cpp_files, tmp_path):
    """``llava_surgery.py``'s llava.projector + --vision-tower gives the mmproj of the full checkpoint."""
    theirs, projector = llama_cpp_files.mmproj("v15-f16"), llama_cpp_files.surgery_projector("v15-f16")
    out = tmp_path / "from-projector"
    r = run_cli("convert", projector, out, "--to", "gguf", "--quiet", "--vision-tower", parts["clip"])
    assert r.code == 0, r.err
    assert [p.name for p in out.glob("*.gguf")] == ["mmproj-llava-f16.gguf"]
    _assert_only_intended(llama_tools.compare(out / "mmproj-llava-f16.gguf", theirs), MMPROJ_KEYS, MMPROJ_TENSORS)
    full = gguf_of("v15", "--mmproj-only")
    assert llama_tools.compare(out / "mmproj-llava-f16.gguf", full / "mmproj-llava-v1.5-tiny-f16.gguf") \
        == llama_tools.Differences()


@pytest.mark.parametrize("flag", [None, "--vision-only", "--text-only"])
def test_clip_as_the_legacy_converter_writes_it(parts, llama_cpp_files, tmp_path, flag):
    from vlmkit.families.clip.gguf_parity import read_clip

    out = tmp_path / "ours"
    r = run_cli("convert", parts["clip"], out, "--to", "gguf", "--quiet", *([flag] if flag else []))
    assert r.code == 0, r.err
    theirs = llama_cpp_files.clip(flag)
    d = llama_tools.compare(next(out.glob("*.gguf")), theirs)
    towers = {None: ("v", "t"), "--vision-only": ("v",), "--text-only": ("t",)}[flag]
    positions = {f"{t}.position_embd.weight": MMPROJ_TENSORS["v.position_embd.weight"] for t in towers}
    # the legacy converter names the file after the CLIP config's _name_or_path (none here); neither writes one
    _assert_only_intended(d, {}, positions)
    read_clip(theirs)  # the read-back used by `vlmkit verify` reads llama.cpp's own files too
