"""CLIP as GGUF (two-tower, vision-only, text-only): read back with gguf-py into a transformers CLIP, the
original model's embeddings come back; the vocabulary is CLIP's; bad input stops before anything is written."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import torch

from vlmkit.families.llava import tiny

from ..conftest import run_cli

# A public fact about CLIP's tokenizer: "a photo of a cat" -> these ids (with <|startoftext|>, <|endoftext|>).
A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
def clip(tmp_path_factory):
    return tiny.make_clip(tmp_path_factory.mktemp("clip") / "clip-vit-tiny-patch14")


def _convert(clip, dst, *extra):
    r = run_cli("convert", clip, dst, "--to", "gguf", "--quiet", *extra)
    assert r.code == 0, r.err
    return next(dst.glob("*.gguf"))


@pytest.mark.parametrize("flag,checks", [
    (None, ["files", "image mean/std", "image embeddings", "text embeddings"]),
    ("--vision-only", ["files", "image mean/std", "image embeddings"]),
    ("--text-only", ["files", "text embeddings"]),
])
def test_clip_read_back_reproduces_the_original_embeddings(clip, tmp_path, flag, checks):
    out = tmp_path / "gguf"
    file = _convert(clip, out, "--dtype", "f32", *([flag] if flag else []))
    assert file.name == {None: "clip-vit-tiny-patch14-f32.gguf", "--vision-only": "clip-vit-tiny-patch14-vision-f32.gguf",
                         "--text-only": "clip-vit-tiny-patch14-text-f32.gguf"}[flag]
    report = tmp_path / "report.json"
    v = run_cli("verify", clip, out, "--json", report)
    data = json.loads(report.read_text())
    assert v.code == 0 and data["verdict"] == "PASS", v.out
    assert [c["name"] for c in data["checks"]] == checks
    for c in data["checks"]:
        if c["name"].endswith("embeddings"):
            assert c["measured"]["cosine"] >= 0.9999


def test_layout_and_keys(clip, tmp_path):
    reader = gguf.GGUFReader(_convert(clip, tmp_path / "out"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "clip" and fields["general.description"] == "two-tower CLIP model"
    assert fields["clip.has_text_encoder"] and fields["clip.has_vision_encoder"]
    assert not fields["clip.has_llava_projector"] and fields["clip.use_gelu"] is False  # quick_gelu
    assert fields["clip.vision.block_count"] == 3 and fields["clip.text.context_length"] == 77
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["v.blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["t.position_embd.weight"] == types["v.position_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert {"visual_projection.weight", "text_projection.weight", "t.token_embd.weight", "t.post_ln.weight",
            "v.pre_ln.weight", "v.post_ln.weight", "v.class_embd"} <= set(types)
    state = torch.load(clip / "pytorch_model.bin", weights_only=True)
    fc1 = next(t for t in reader.tensors if t.name == "v.blk.0.ffn_down.weight")  # legacy layout: fc1 as ffn_down
    assert list(reversed(fc1.shape.tolist())) == list(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape)


def test_the_vocabulary_is_clips(clip, tmp_path):
    """The token list tokenizes as CLIP does: a transformers CLIPTokenizer built from it gives CLIP's ids."""
    from transformers import CLIPTokenizer

    reader = gguf.GGUFReader(_convert(clip, tmp_path / "out", "--text-only"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 49408 and tokens[49406:] == ["<|startoftext|>", "<|endoftext|>"]
    assert [tokens[i] for i in A_PHOTO_OF_A_CAT[1:-1]] == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges = tmp_path / "merges.txt"  # merge i made token 512 + i
    merges.write_text("#version: 0.2\n" + "\n".join(_split(t) for t in tokens[512:49406]) + "\n")
    tokenizer = CLIPTokenizer(str(vocab), str(merges))
    assert tokenizer("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT


def _split(token: str) -> str:
    """A merged token back into its merge pair, from the merges file (independent of vlmkit)."""
    return _MERGES[token]


def _load_merges() -> dict[str, str]:
    import gzip

    from vlmkit.conversion.gguf_vocab import CLIP_MERGES

    lines = gzip.open(CLIP_MERGES, "rt", encoding="utf-8").read().split("\n")[1:48895]
    return {"".join(m.split()): m for m in lines}


_MERGES = _load_merges()


def test_image_mean_and_std_can_be_overridden(clip, tmp_path):
    reader = gguf.GGUFReader(_convert(clip, tmp_path / "out", "--vision-only", "--image-mean", "0.5", "0.5", "0.5",
                                      "--image-std", "0.25", "0.25", "0.25"))
    assert reader.fields["clip.vision.image_mean"].contents() == [0.5, 0.5, 0.5]
    assert reader.fields["clip.vision.image_std"].contents() == [0.25, 0.25, 0.25]
    v = run_cli("verify", clip, tmp_path / "out")
    assert v.code == 3 and "[FAIL] image mean/std" in v.out  # the original's preprocessing differs: verify says so


def _fails(*args) -> str:
    r = run_cli(*map(str, args))
    assert r.code == 1, (r.out, r.err)
    assert "Traceback" not in r.err
    return r.err


def test_bad_input_is_refused_before_anything_is_written(clip, tmp_path):
    dst = tmp_path / "out"
    err = _fails("convert", clip, dst, "--to", "gguf", "--text-only", "--vision-only")
    assert "--text-only and --vision-only exclude each other" in err
    err = _fails("convert", clip, dst, "--to", "hf", "--vision-only")
    assert "--vision-only applies to --to gguf only" in err
    err = _fails("convert", clip, dst, "--to", "gguf", "--dtype", "q4_k")
    assert "'q4_k' is not a GGUF type" in err
    err = _fails("convert", clip, dst, "--to", "gguf", "--image-std", "0.5", "0", "0.5")
    assert "image std [0.5, 0.0, 0.5] has a value <= 0" in err

    other = tmp_path / "clip-other-vocab"
    shutil.copytree(clip, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["vocab_size"] = 32000
    (other / "config.json").write_text(json.dumps(config))
    err = _fails("convert", other, dst, "--to", "gguf")
    assert "CLIP's BPE vocabulary has 49408 tokens" in err and "--vision-only" in err
    config["text_config"]["vocab_size"] = 49408
    config["vision_config"]["hidden_act"] = "gelu_new"
    (other / "config.json").write_text(json.dumps(config))
    err = _fails("convert", other, dst, "--to", "gguf", "--vision-only")
    assert "hidden_act 'gelu_new'; clip.cpp runs gelu or quick_gelu" in err
    assert not dst.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("flag,name", [("f16", "float16"), ("bf16", "bfloat16")])
def test_clip_to_hf_config_states_the_dtype_the_weights_have(clip, tmp_path, flag, name):
    from safetensors import safe_open

    out = tmp_path / "hf"
    assert run_cli("convert", clip, out, "--to", "hf", "--dtype", flag, "--quiet").code == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # floats cast; position_ids stay I64
    assert stored - {"I64"} == {flag.upper()} and json.loads((out / "config.json").read_text())["torch_dtype"] == name
