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
ADDED = {"<image>": 32000, "<pad>": 32001}

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


def _ours(parts, name, tmp_path, *extra):
    out = tmp_path / f"{name}-gguf"
    r = run_cli("convert", parts[name], out, "--to", "gguf", "--quiet", *extra)
    assert r.code == 0, r.err
    return out


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llava15_language_model(parts, hf, llama_cpp_tree, tmp_path, outtype):
    ours = _ours(parts, "v15", tmp_path, "--dtype", outtype)
    folder = llama_tools.with_tokenizer(hf["v15"], parts["v15"], tmp_path / "llava-hf", ADDED)
    theirs = llama_tools.language_model(llama_cpp_tree, folder, tmp_path / "theirs.gguf", outtype)
    d = llama_tools.compare(ours / f"llava-v1.5-tiny-{outtype}.gguf", theirs)
    # every tensor bit-identical: q/k permutation, new rows, Q8_0 blocks
    _assert_only_intended(d, {**LM_KEYS, **CARD_KEYS}, {})


def test_llava15_mmproj(parts, llama_cpp_tree, tmp_path):
    ours = _ours(parts, "v15", tmp_path, "--mmproj-only")
    assert [p.name for p in ours.glob("*.gguf")] == ["mmproj-llava-v1.5-tiny-f16.gguf"]
    theirs = llama_tools.projector(llama_cpp_tree, parts["v15"], parts["clip"], tmp_path / "legacy")
    d = llama_tools.compare(ours / "mmproj-llava-v1.5-tiny-f16.gguf", theirs)
    _assert_only_intended(d, MMPROJ_KEYS, MMPROJ_TENSORS)


def test_llava_next_both_files_f32(parts, hf, llama_cpp_tree, tmp_path):
    ours = _ours(parts, "next", tmp_path, "--dtype", "f32", "--vision-tower", parts["clip"])
    theirs = llama_tools.projector(llama_cpp_tree, parts["next"], parts["clip"], tmp_path / "legacy", f32=True)
    d = llama_tools.compare(ours / "mmproj-llava-v1.6-mistral-tiny-f32.gguf", theirs)
    _assert_only_intended(d, NEXT_MMPROJ_KEYS, {**NEXT_TENSORS, **F32_TENSORS})
    lm = llama_tools.export_language_model(hf["next"], parts["next"], tmp_path / "mistral-lm", ADDED)
    theirs = llama_tools.language_model(llama_cpp_tree, lm, tmp_path / "theirs.gguf", "f32")
    named = {"general.name": ("theirs only", "llama.cpp guessed it from the name of the folder this test exported "
                                             "the language model to ('mistral-lm' -> 'Mistral Lm'); vlmkit writes none")}
    _assert_only_intended(llama_tools.compare(ours / "llava-v1.6-mistral-tiny-f32.gguf", theirs), {**LM_KEYS, **named}, {})


def test_lora_checkpoint_merged_as_llama_cpp_reads_the_merged_model(parts, hf, llama_cpp_tree, tmp_path):
    """The LoRA form straight to GGUF = llama.cpp's converter on the merged transformers folder
    (whose merge tests/families proves against peft)."""
    ours = _ours(parts, "lora", tmp_path, "--model-base", parts["base"])
    folder = llama_tools.with_tokenizer(hf["lora"], parts["base"], tmp_path / "merged-hf", ADDED)
    theirs = llama_tools.language_model(llama_cpp_tree, folder, tmp_path / "theirs.gguf", "f16")
    d = llama_tools.compare(ours / "llava-v1.5-tiny-lora-f16.gguf", theirs)
    _assert_only_intended(d, {**LM_KEYS, **CARD_KEYS}, {})


def test_llava_projector_file_from_the_old_path(parts, llama_cpp_tree, tmp_path):
    """``llava_surgery.py``'s llava.projector + --vision-tower gives the mmproj of the full checkpoint."""
    theirs = llama_tools.projector(llama_cpp_tree, parts["v15"], parts["clip"], tmp_path / "legacy")
    projector = tmp_path / "legacy" / "surgery" / "llava.projector"
    out = tmp_path / "from-projector"
    r = run_cli("convert", projector, out, "--to", "gguf", "--quiet", "--vision-tower", parts["clip"])
    assert r.code == 0, r.err
    assert [p.name for p in out.glob("*.gguf")] == ["mmproj-llava-f16.gguf"]
    _assert_only_intended(llama_tools.compare(out / "mmproj-llava-f16.gguf", theirs), MMPROJ_KEYS, MMPROJ_TENSORS)
    full = _ours(parts, "v15", tmp_path, "--mmproj-only")
    assert llama_tools.compare(out / "mmproj-llava-f16.gguf", full / "mmproj-llava-v1.5-tiny-f16.gguf") \
        == llama_tools.Differences()


@pytest.mark.parametrize("flag", [None, "--vision-only", "--text-only"])
def test_clip_as_the_legacy_converter_writes_it(parts, llama_cpp_tree, tmp_path, flag):
    from vlmkit.families.clip.gguf_parity import read_clip

    out = tmp_path / "ours"
    r = run_cli("convert", parts["clip"], out, "--to", "gguf", "--quiet", *([flag] if flag else []))
    assert r.code == 0, r.err
    theirs = llama_tools.clip_model(llama_cpp_tree, parts["clip"], tmp_path / "legacy", flag=flag)
    d = llama_tools.compare(next(out.glob("*.gguf")), theirs)
    towers = {None: ("v", "t"), "--vision-only": ("v",), "--text-only": ("t",)}[flag]
    positions = {f"{t}.position_embd.weight": MMPROJ_TENSORS["v.position_embd.weight"] for t in towers}
    # the legacy converter names the file after the CLIP config's _name_or_path (none here); neither writes one
    _assert_only_intended(d, {}, positions)
    read_clip(theirs)  # the read-back used by `vlmkit verify` reads llama.cpp's own files too
