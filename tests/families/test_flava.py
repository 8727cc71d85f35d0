"""FLAVA + DALL-E codebook: both codebook forms converted and verified through the CLI, and the failure cases."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from vlmkit.conversion import compile_plan, reverse
from vlmkit.conversion.engine import apply_step
from vlmkit.families.flava import convert as flava_convert
from vlmkit.families.flava import tiny
from vlmkit.tensors import open_source

from ..conftest import run_cli

SIZES = tiny.TinySizes()


@pytest.fixture(scope="session")
def flava(tmp_path_factory):
    root = tmp_path_factory.mktemp("flava")
    config = root / "tiny-heads.json"
    config.write_text(json.dumps(SIZES.override()))
    return {"root": root, "config": config,
            "pickled": tiny.make_flava(root / "flava-pickled-codebook", SIZES),
            "state-dict": tiny.make_flava(root / "flava-state-dict-codebook", SIZES, pickled_codebook=False)}


def convert_and_verify(src, dst, *extra):
    r = run_cli("convert", src, dst, "--quiet", *extra)
    assert r.code == 0, r.err
    report = dst.parent / f"{dst.name}-report.json"
    v = run_cli("verify", src, dst, "--json", report, *extra)
    data = json.loads(report.read_text())
    assert v.code == 0 and data["verdict"] == "PASS", v.out + v.err
    assert [c["name"] for c in data["checks"]] == ["weights", "codebook ids", "image encoder", "text encoder",
                                                   "multimodal encoder"]
    return r, data


def test_pickled_codebook(flava, tmp_path):
    dst = tmp_path / "flava-tiny-hf"
    r, data = convert_and_verify(flava["pickled"], dst, "--config", flava["config"])
    assert "encoder.pkl, pickled module" in r.err
    weights = data["checks"][0]["measured"]
    assert weights["tensors"] == weights["identical"] and weights["duplicates_dropped"] == 11
    assert data["checks"][1]["measured"] == {"positions": 32, "identical": 32}  # 2 probes x 4 x 4 codes

    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["FlavaForPreTraining"]
    assert config["image_config"]["image_size"] == 64 and config["image_config"]["num_attention_heads"] == 2
    assert config["image_codebook_config"]["hidden_size"] == 16 and config["image_codebook_config"]["vocab_size"] == 64
    out = open_source(dst)
    names = out.keys()
    assert "flava.multimodal_model.cls_token" in names and "flava.logit_scale" in names
    assert not any(n.startswith(("dalle.", "heads.")) or n.endswith("head.bias") for n in names)
    encoder = tiny.Encoder(SIZES.codebook_hidden, SIZES.codebook_vocab, SIZES.codebook_blocks, seed=1)
    assert torch.equal(out.read("image_codebook.blocks.group_2.group.block_1.res_path.path.conv_3.weight"),
                       encoder.blocks.group_2.block_1.res_path.conv_3.w)
    preprocessor = json.loads((dst / "preprocessor_config.json").read_text())
    assert preprocessor["codebook_size"] == {"height": 32, "width": 32}  # 8 x the 4 x 4 patch grid

    from transformers import FlavaForPreTraining

    _, info = FlavaForPreTraining.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_state_dict_codebook(flava, tmp_path):
    convert_and_verify(flava["state-dict"], tmp_path / "out", "--config", flava["config"])


def test_duplicates_and_tied_biases_are_dropped_with_reasons(flava, tmp_path):
    r = run_cli("convert", flava["pickled"] / "flava.pt", tmp_path / "out", "--dry-run", "--config", flava["config"])
    assert r.code == 0, r.err
    assert "text_encoder.embeddings.word_embeddings.weight" in r.out and "stores them twice" in r.out
    assert "heads.fairseq_mlm.cls.predictions.bias" in r.out and "the same tensor as decoder.bias" in r.out
    assert "dalle.blocks.input.w [16, 3, 7, 7] F32\n    -> rename -> image_codebook.blocks.input.weight" in r.out


def test_rules_run_backwards_to_the_original_tensors(flava, tmp_path):
    dst = tmp_path / "out"
    assert run_cli("convert", flava["state-dict"], dst, "--quiet", "--config", flava["config"]).code == 0
    out = open_source(dst)
    plan = compile_plan(reverse(flava_convert.RULES), [out.info(n) for n in out.keys()])
    originals = torch.load(flava["state-dict"] / "flava.pt", weights_only=True)
    originals |= {"dalle." + k: v for k, v in torch.load(flava["state-dict"] / "encoder.pt", weights_only=True).items()}
    dropped = {d["name"] for d in json.loads((dst / "vlmkit-manifest.json").read_text())["plan"]["drops"]}
    back = {}
    for step in plan.steps:
        back.update(zip((t.name for t in step.targets), apply_step(step, [out.read(i.name) for i in step.sources])))
    assert set(back) == set(originals) - dropped
    assert all(torch.equal(t, originals[n]) for n, t in back.items())


def test_inspect_recognises_the_original_folder_and_file(flava):
    for path in (flava["pickled"], flava["pickled"] / "flava.pt"):
        report = json.loads(run_cli("inspect", path, "--json").out)
        assert report["family"] == "flava"
        assert report["details"]["image codebook"] == "encoder.pkl (pickled module)"


def test_verify_catches_a_wrong_codebook(flava, tmp_path):
    """The codebook's output rows out of order (a vocabulary-order slip): the weights check names the tensors and
    the codes differ. (Swapping two residual convolutions would not show in the codes: DALL-E scales the residual
    path by 1 / n_layers**2.)"""
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "out"
    assert run_cli("convert", flava["pickled"], dst, "--quiet", "--config", flava["config"]).code == 0
    tensors = load_file(dst / "model.safetensors")
    for name in ("image_codebook.blocks.output.conv.weight", "image_codebook.blocks.output.conv.bias"):
        tensors[name] = tensors[name].roll(1, dims=0).contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    v = run_cli("verify", flava["pickled"], dst, "--config", flava["config"])
    assert v.code == 3 and "[FAIL] weights" in v.out and "output.conv.weight" in v.out
    assert "[FAIL] codebook ids" in v.out


# ------------------------------------------------------------------------- failures


def _fails(src, dst, *extra) -> str:
    r = run_cli("convert", src, dst, "--quiet", *extra)
    assert r.code == 1, (r.out, r.err)
    assert "Traceback" not in r.err
    assert not dst.exists() and not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())
    return r.err


class Payload:
    """What a malicious pickle carries: unpickling it would run a shell command."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_unknown_pickle_class_is_refused_and_nothing_runs(flava, tmp_path):
    src = tmp_path / "flava-evil"
    shutil.copytree(flava["pickled"], src)
    sentinel = tmp_path / "pwned"
    encoder = tiny.Encoder(SIZES.codebook_hidden, SIZES.codebook_vocab, SIZES.codebook_blocks)
    encoder.payload = Payload(sentinel)
    with tiny.dall_e_names(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch cannot find the stand-ins' source code
        torch.save(encoder, src / "encoder.pkl", _use_new_zipfile_serialization=False)
    err = _fails(src, tmp_path / "out", "--config", flava["config"])
    assert "refused to load" in err and "'posix.system'" in err and "nothing from the file was run" in err
    assert not sentinel.exists()


def test_missing_codebook(flava, tmp_path):
    src = tmp_path / "no-codebook"
    shutil.copytree(flava["pickled"], src)
    (src / "encoder.pkl").unlink()
    err = _fails(src, tmp_path / "out", "--config", flava["config"])
    assert "no image codebook" in err and "encoder.pkl" in err


def test_missing_tokenizer(flava, tmp_path):
    src = tmp_path / "no-tokenizer"
    shutil.copytree(flava["pickled"], src)
    (src / "vocab.txt").unlink()
    err = _fails(src, tmp_path / "out", "--config", flava["config"])
    assert "no text tokenizer" in err and "bert-base-uncased" in err


def test_config_that_does_not_fit_the_weights(flava, tmp_path):
    config = tmp_path / "deeper.json"
    config.write_text(json.dumps({"multimodal_config": {"num_hidden_layers": 6}}))
    err = _fails(flava["pickled"], tmp_path / "out", "--config", config)
    assert "multimodal_config.num_hidden_layers=6" in err and "has 1" in err
