"""LLaVA to GGUF without llama.cpp: one command, every input form, the plan, and bad input refused before writing.

(That llama.cpp loads and runs the files, and that they are the files llama.cpp's own tools write,
is in the slow ``test_in_llama_cpp.py`` / ``test_same_as_llama_cpp.py``.)
"""

from __future__ import annotations

import json
import shutil

import gguf
import pytest

from ..conftest import TRANSFORMERS_LAYOUTS, run_cli, save_with_transformers
from .llama_tools import compare, Differences


def _convert(src, dst, *extra):
    r = run_cli("convert", src, dst, "--to", "gguf", "--quiet", *extra)
    assert r.code == 0, r.err
    return r


def test_one_command_two_files_a_card_and_a_manifest(parts, tmp_path):
    out = tmp_path / "gguf"
    r = _convert(parts["v15"], out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "llava-v1.5-tiny-f16.gguf",
                                                     "mmproj-llava-v1.5-tiny-f16.gguf", "vlmkit-manifest.json"]
    assert f"llama-mtmd-cli -m {out / 'llava-v1.5-tiny-f16.gguf'} --mmproj {out / 'mmproj-llava-v1.5-tiny-f16.gguf'}" \
        in r.out
    assert run_cli("verify-files", out).code == 0
    lm = gguf.GGUFReader(out / "llava-v1.5-tiny-f16.gguf")
    fields = {k: f.contents() for k, f in lm.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.vocab_size"] == 32064
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    assert len(tokens) == 32064 and tokens[32000:32002] == ["<image>", "<pad>"] and tokens[-1] == "[PAD32063]"
    assert len(set(scores[3:32000])) > 1000  # real SentencePiece scores, not -1000 placeholders
    assert fields["tokenizer.ggml.padding_token_id"] == 32001 and fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.chat_template"].startswith("{# vlmkit template: llava_v1 #}")
    mmproj = {k: f.contents() for k, f in gguf.GGUFReader(out / "mmproj-llava-v1.5-tiny-f16.gguf").fields.items()}
    assert mmproj["clip.projector_type"] == "mlp" and mmproj["clip.has_llava_projector"]
    assert mmproj["clip.vision.feature_layer"] == [2] and mmproj["clip.vision.block_count"] == 2  # -2 of 3 layers


def test_next_writes_pinpoints_in_llama_cpps_order_and_the_newline(parts, tmp_path):
    out = tmp_path / "gguf"
    _convert(parts["next"], out, "--vision-tower", parts["clip"], "--mmproj-only")
    reader = gguf.GGUFReader(out / "mmproj-llava-v1.6-mistral-tiny-f16.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    original = json.loads((parts["next"] / "config.json").read_text())["image_grid_pinpoints"]
    assert fields["clip.vision.image_grid_pinpoints"] == [v for pair in original for v in pair]  # (width, height)
    assert fields["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    assert "v.image_newline" in {t.name for t in reader.tensors}


def test_transformers_folder_gives_the_same_files_as_the_original(parts, hf, gguf_of):
    """The two-stage plan (original -> published names -> GGUF) and a transformers folder agree exactly
    (the folder carries the original tokenizer.model, as the published llava-hf repositories do)."""
    from_original, from_hf = gguf_of("v15", "--dtype", "f32"), gguf_of("hf:v15", "--dtype", "f32")
    assert (hf["v15"] / "tokenizer.model").read_bytes() == (parts["v15"] / "tokenizer.model").read_bytes()
    for ours, theirs in (("llava-v1.5-tiny-f32.gguf", "v15-hf-f32.gguf"),
                         ("mmproj-llava-v1.5-tiny-f32.gguf", "mmproj-v15-hf-f32.gguf")):
        assert compare(from_original / ours, from_hf / theirs) == Differences()


@pytest.mark.parametrize("name", ["v15", "next"])
@pytest.mark.parametrize("how", TRANSFORMERS_LAYOUTS)
def test_every_transformers_layout_gives_the_same_files(hf, gguf_of, tmp_path, name, how):
    """A folder transformers 5 saved (its tensor names, tokenizer.json without tokenizer.model) converts to
    the files of the folder vlmkit wrote; the one difference is the token scores (``sentencepiece_json``)."""
    saved = save_with_transformers(hf[name], tmp_path / f"{name}-{how}", how)
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    published, ours = gguf_of(f"hf:{name}", "--dtype", "f32"), tmp_path / "ours"
    _convert(saved, ours, "--dtype", "f32")
    lm = compare(published / f"{name}-hf-f32.gguf", ours / f"{name}-{how}-f32.gguf")
    assert lm == Differences(keys={"tokenizer.ggml.scores": "value"})
    assert compare(published / f"mmproj-{name}-hf-f32.gguf", ours / f"mmproj-{name}-{how}-f32.gguf") == Differences()
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before  # the user's folder is untouched


@pytest.mark.parametrize("name", ["v15", "next"])
def test_vocabulary_from_tokenizer_json_is_the_sentencepiece_models(parts, hf, tmp_path, name):
    """The tokenizer transformers 5 saves (tokenizer.json only) against the SentencePiece library on the
    original tokenizer.model: the same pieces, types and special ids, and scores in the same order wherever
    llama.cpp reads them (the pieces a merge makes)."""
    import sentencepiece
    from transformers import AutoTokenizer

    from vlmkit.conversion.gguf_vocab import sentencepiece_json

    AutoTokenizer.from_pretrained(hf[name]).save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(parts[name] / "tokenizer.model"))
    n = sp.vocab_size()
    vocab = sentencepiece_json(tmp_path, {"<image>": n, "<pad>": n + 1}, rows=n + 64)
    assert vocab.tokens[:n] == [sp.IdToPiece(i).encode() for i in range(n)]
    kinds = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1 for i in range(n)]
    assert vocab.types[:n] == kinds  # gguf.TokenType: NORMAL 1, UNKNOWN 2, CONTROL 3, BYTE 6
    assert vocab.tokens[n:n + 3] == [b"<image>", b"<pad>", f"[PAD{n + 2}]".encode()]
    assert vocab.types[n:n + 3] == [4, 4, 5]  # USER_DEFINED twice, UNUSED: as from tokenizer.model
    assert (vocab.bos, vocab.eos, vocab.unk) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    merged = [i for i in range(n) if kinds[i] == 1 and len(sp.IdToPiece(i)) > 1]
    assert len(merged) > 20000
    by_ours = sorted(merged, key=lambda i: -vocab.scores[i])
    assert all(sp.GetScore(a) >= sp.GetScore(b) for a, b in zip(by_ours, by_ours[1:]))


def test_dry_run_prints_each_tensor_type_and_why(parts, tmp_path):
    r = run_cli("convert", parts["v15"], tmp_path / "out", "--to", "gguf", "--dry-run", "--dtype", "q8_0")
    assert r.code == 0, r.err
    assert "blk.0.attn_q.weight [64, 64] Q8_0  <- language_model.model.layers.0.self_attn.q_proj.weight " \
           "[llama.cpp RoPE order (2 heads)]" in r.out
    assert "F32 instead of q8_0 for 1 tensor(s) (v.patch_embd.weight): the patch convolution" in r.out
    assert "dropped vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight: layer 2 comes after the feature layer" \
           in r.out
    assert "dry run: nothing was written" in r.out and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ bad input


def _fails(src, dst, *extra) -> str:
    r = run_cli("convert", src, dst, "--to", "gguf", "--quiet", *extra)
    assert r.code == 1, (r.out, r.err)
    assert "Traceback" not in r.err
    assert not dst.exists() and not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())
    return r.err


def _edited(src, dst, edit) -> object:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(mm_projector_type="linear"), "mm_projector_type 'linear'; llama.cpp's LLaVA graph"),
    (lambda c: c.update(mm_vision_select_feature="cls_patch"), "keeps the CLS position; clip.cpp always drops it"),
    # a Qwen checkpoint (now written as llama.cpp's qwen2) beside a SentencePiece tokenizer: the tokenizer it needs
    (lambda c: c.update(architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen"),
     "no tokenizer vlmkit can read: it needs a byte-level BPE tokenizer.json"),
])
def test_original_checkpoints_llama_cpp_cannot_run(parts, tmp_path, edit, message):
    src = _edited(parts["v15"], tmp_path / "llava-v1.5-edited", edit)
    assert message in _fails(src, tmp_path / "out")


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["text_config"].update(model_type="opt"), "llama.cpp has no architecture for the backbone 'opt'"),
    (lambda c: c["text_config"].update(vocab_size=32000), "the vocabulary does not match: embed_tokens has 32064 rows"),
    (lambda c: c.update(projector_hidden_act="relu"), "the projector is not Linear -> GELU -> Linear"),
])
def test_transformers_folders_llama_cpp_cannot_run(parts, hf, tmp_path, edit, message):
    src = _edited(hf["v15"], tmp_path / "edited-hf", edit)
    assert message in _fails(src, tmp_path / "out", "--model-base", parts["v15"])


def test_vocabulary_that_does_not_fit_the_embedding(parts, hf, tmp_path):
    no_tokenizer = _edited(hf["v15"], tmp_path / "no-tokenizer-hf", lambda c: None)
    for name in ("tokenizer.model", "tokenizer.json"):
        (no_tokenizer / name).unlink()
    err = _fails(no_tokenizer, tmp_path / "out")
    assert "no tokenizer.model and no tokenizer.json" in err and "--model-base" in err
    src = _edited(hf["v15"], tmp_path / "extra-token-hf", lambda c: None)
    (src / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<extra>": 40000}))
    err = _fails(src, tmp_path / "out")
    assert "added_tokens.json: Expected new token IDs [32000, 32001] to be sequential; got [32000, 40000]" in err


@pytest.mark.parametrize("text,why", [
    ('{"version": "1.0", "model": {"type": "BPE", ', "Expecting"),  # cut short
    ('{"version": "1.0", "added_tokens": []}', "it has no 'model' field"),
])
def test_a_broken_tokenizer_json_is_one_error_line(hf, tmp_path, text, why):
    """A transformers folder with only tokenizer.json (as transformers 5 saves it), that file broken: one error
    line naming it and what to do, not gguf-py's traceback."""
    src = _edited(hf["v15"], tmp_path / "broken-tokenizer-hf", lambda c: None)
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.json").write_text(text)
    err = _fails(src, tmp_path / "out")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{src / 'tokenizer.json'}: " in errors[0] and why in errors[0], err


def test_added_tokens_beyond_the_embedding_rows():
    from vlmkit.conversion.gguf_vocab import sentencepiece
    from vlmkit.errors import ConfigError
    from vlmkit.families.llava.tiny import tokenizer_folder

    with pytest.raises(ConfigError) as e:
        sentencepiece(tokenizer_folder("llama"), {"<image>": 32000, "<pad>": 32001}, rows=32001)
    assert "added token '<pad>' has id 32001 but the model's embedding has 32001 rows" in e.value.message
    with pytest.raises(ConfigError) as e:
        sentencepiece(tokenizer_folder("llama"), {}, rows=31000)
    assert "32000 SentencePiece tokens but the model's embedding has only 31000 rows" in e.value.message


def test_projector_file_needs_its_tower(parts, tmp_path):
    import torch

    projector = tmp_path / "llava.projector"
    state = torch.load(parts["pretrain"] / "mm_projector.bin", weights_only=True)
    torch.save(state, projector)
    err = _fails(projector, tmp_path / "out")
    assert "holds only the projector" in err and "--vision-tower" in err
