"""The model card in every `vlmkit convert` output: front matter, provenance hashes, changes, and runnable commands."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ..conftest import FIXTURES, run_cli
from .conftest import NEXT_REPO, code_blocks, front_matter, hash_rows, sha256

CAT = FIXTURES / "images" / "chelsea.png"


def convert(src, dst, *extra) -> str:
    r = run_cli("convert", src, dst, "--quiet", *extra)
    assert r.code == 0, r.err
    return (dst / "README.md").read_text()


def check_hashes(folder: Path, card: str, sources: list[Path]) -> None:
    """Every output file (but the card and the manifest) and every source file is in the card with its true
    size and sha256, and the manifest vouches for the card itself."""
    rows = hash_rows(card)
    outputs = [p for p in folder.iterdir() if p.is_file() and p.name not in ("README.md", "vlmkit-manifest.json")]
    assert outputs
    for p in outputs:
        assert rows[p.name] == (p.stat().st_size, sha256(p)), p.name
    for p in sources:
        assert rows[p.name] == (p.stat().st_size, sha256(p)), p  # the card names no local path
    manifest = json.loads((folder / "vlmkit-manifest.json").read_text())
    assert manifest["files"]["README.md"]["sha256"] == sha256(folder / "README.md")
    assert run_cli("verify-files", folder).code == 0


def run_commands(folder: Path, card: str, monkeypatch) -> list[str]:
    """Run the card's Python snippets and `vlmkit chat` lines from the folder that holds ``folder``."""
    monkeypatch.chdir(folder.parent)
    Image.open(CAT).convert("RGB").save(folder.parent / "image.jpg")
    printed = []
    for code in code_blocks(card, "python"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "card", "exec"), {})  # noqa: S102 - the card's own snippet, as a user pastes it
        printed.append(out.getvalue())
    for line in [line for block in code_blocks(card, "sh") for line in block.splitlines()]:
        if line.startswith("vlmkit chat "):
            r = run_cli(*shlex.split(line)[1:])
            assert r.code == 0, r.err
            printed.append(r.out)
    return printed


def test_llava15_card(originals, tmp_path, monkeypatch):
    dst = tmp_path / "llava-v1.5-tiny-hf"
    card = convert(originals["v15"], dst, "--dtype", "float16")
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert "vlmkit" in meta["tags"] and "llava" in meta["tags"]
    assert "license" not in meta and "# license: the source states none" in card  # left for the user
    assert "base_model" not in meta  # a local folder: no hub id known
    check_hashes(dst, card, sorted((originals["v15"]).glob("*.bin")) + sorted(originals["clip"].glob("*.safetensors")))
    assert "- chat template: llava_v1" in card
    assert "vlmkit convert " in card and "--dtype float16" in card  # the exact command
    assert "- dtype: cast to F16" in card
    assert "rows 32000->32064: 2 tensor(s) (vocabulary growth; new rows drawn at random with `--seed 0`)" in card
    assert "image_mean=[0.48145466, 0.4578275, 0.40821073]" in card  # CLIP's preprocessing, from the folder
    assert "Not verified yet. `vlmkit verify" in card
    printed = run_commands(dst, card, monkeypatch)
    assert len(printed) == 2 and all(p.strip() for p in printed)  # transformers generated, vlmkit chat answered


def test_llava_next_card_carries_hub_id_license_and_known_difference(originals, tmp_path, monkeypatch):
    dst = tmp_path / "next-hf"
    card = convert(originals["next"], dst, "--vision-tower", originals["clip"])
    meta = front_matter(card)
    assert meta["base_model"] == NEXT_REPO and meta["license"] == "apache-2.0"
    assert "llava-next" in meta["tags"]
    assert "int(round(x, 7))" in card  # the unpad rounding verify notes
    assert f"- vision tower: `{originals['clip'].name}`" in card and str(originals["root"]) not in card
    check_hashes(dst, card, sorted(originals["next"].glob("*.safetensors")))
    printed = run_commands(dst, card, monkeypatch)
    assert len(printed) == 2 and all(p.strip() for p in printed)


def test_blip2_card(originals, tmp_path, monkeypatch):
    dst = tmp_path / "blip2-opt-hf"
    card = convert(originals["blip2"], dst, "--vision", originals["eva"], "--language-model", originals["opt"],
                   "--config", originals["blip2-heads"])
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "image-text-to-text" and "blip-2" in meta["tags"]
    check_hashes(dst, card, [originals["blip2"], originals["eva"]])
    assert "- `--config` overrode: " in card
    # the plan's drops with their reasons (LAVIS builds the Q-Former's text parts but never runs them)
    assert "dropped" in card and "LAVIS sets it to None in Blip2OPT/Blip2T5" in card
    printed = run_commands(dst, card, monkeypatch)
    assert len(printed) == 2


def test_blip2_flan_t5_card_has_no_vllm_and_the_t5_prompt(originals, tmp_path, monkeypatch):
    """vLLM runs BLIP-2 with OPT only; LAVIS's Blip2T5 asks "Question: ... Short answer:"."""
    dst = tmp_path / "blip2-t5-hf"
    card = convert(originals["blip2-t5"], dst, "--vision", originals["eva"], "--language-model", originals["t5"],
                   "--config", originals["blip2-heads"])
    assert "vllm serve" not in card and "Flan-T5" in card
    (python,) = code_blocks(card, "python")
    assert '"Question: What is shown in this image? Short answer:"' in python and "Answer:\"" not in python
    printed = run_commands(dst, card, monkeypatch)
    assert len(printed) == 2


def test_the_card_names_no_local_path(originals, tmp_path):
    """The card is published: source, source files, tower and command show names only; the manifest keeps paths."""
    dst = tmp_path / "next-hf"
    tower = originals["clip"].absolute()
    card = convert(originals["next"], dst, f"--vision-tower={tower}")
    assert str(originals["root"]) not in card and str(tmp_path) not in card
    assert f"- source: `{originals['next'].name}`" in card
    assert f"--vision-tower={tower.name}" in card and f"verify {originals['next'].name} next-hf" in card
    manifest = json.loads((dst / "vlmkit-manifest.json").read_text())
    assert manifest["source"]["path"] == str(originals["next"].absolute())
    assert str(tower) in manifest["provenance"]["command"]


def test_verify_write_card_checks_the_manifest_before_the_parity_run(originals, tmp_path, monkeypatch):
    """A changed folder is refused before the (long) parity run; `convert --verify` does not re-hash what it wrote."""
    from vlmkit.conversion import output

    dst = tmp_path / "v15-hf"
    convert(originals["v15"], dst)
    with open(dst / "generation_config.json", "a") as f:
        f.write("\n")
    from vlmkit import api

    parity_runs = []
    monkeypatch.setattr(api, "verify", lambda *a, **k: parity_runs.append(a))
    r = run_cli("verify", originals["v15"], dst, "--write-card", "--max-new-tokens", "2")
    assert r.code == 1 and "generation_config.json: " in r.err and parity_runs == []
    monkeypatch.undo()

    checks = []
    monkeypatch.setattr(output, "verify_files", lambda folder: checks.append(folder))
    r = run_cli("convert", originals["v15"], tmp_path / "again", "--quiet", "--verify", "--max-new-tokens", "2")
    assert r.code == 0, r.err
    assert checks == []


def test_flava_card(originals, tmp_path, monkeypatch):
    dst = tmp_path / "flava-hf"
    card = convert(originals["flava"], dst, "--config", originals["flava-heads"])
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "flava" in meta["tags"]
    check_hashes(dst, card, sorted(p for p in originals["flava"].iterdir() if p.suffix in (".pt", ".pth", ".pkl")))
    assert "a second copy of image_encoder.module.embeddings" in card
    printed = run_commands(dst, card, monkeypatch)
    assert len(printed) == 1 and "torch.Size" in printed[0]


def test_clip_card(originals, tmp_path, monkeypatch):
    dst = tmp_path / "clip-hf"
    card = convert(originals["clip"], dst)
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "zero-shot-image-classification" and "clip" in meta["tags"]
    check_hashes(dst, card, sorted(originals["clip"].glob("*.safetensors")))
    printed = run_commands(dst, card, monkeypatch)
    assert len(printed) == 1 and "tensor" in printed[0]


def test_gguf_pair_card(originals, tmp_path):
    dst = tmp_path / "llava-gguf"
    card = convert(originals["v15"], dst, "--to", "gguf", "--dtype", "f32")
    meta = front_matter(card)
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"]
    assert "ggml-org/llama.cpp#25814" in card
    check_hashes(dst, card, sorted(originals["v15"].glob("*.bin")))
    (line,) = [x for b in code_blocks(card, "sh") for x in b.splitlines() if x.startswith("llama-mtmd-cli ")]
    words = shlex.split(line)
    model, mmproj = words[words.index("-m") + 1], words[words.index("--mmproj") + 1]
    assert (tmp_path / model).is_file() and (tmp_path / mmproj).is_file() and mmproj.split("/")[1].startswith("mmproj-")
    assert "- GGUF type: f32" in card


def test_verify_write_card_puts_the_report_in_and_keeps_the_manifest_true(originals, tmp_path):
    dst = tmp_path / "v15-hf"
    r = run_cli("convert", originals["v15"], dst, "--quiet", "--verify", "--max-new-tokens", "2")
    assert r.code == 0, r.err
    card = (dst / "README.md").read_text()
    assert "**Verdict: PASS**" in card and "| logits | pass |" in card and "Not verified yet" not in card
    assert json.loads((dst / "vlmkit-manifest.json").read_text())["parity"]["verdict"] == "PASS"
    assert run_cli("verify-files", dst).code == 0

    tampered = tmp_path / "tampered"
    shutil.copytree(dst, tampered)
    with open(tampered / "generation_config.json", "a") as f:
        f.write("\n")  # the same JSON, other bytes: verify passes, the manifest no longer does
    before = (tampered / "README.md").read_bytes()
    r = run_cli("verify", originals["v15"], tampered, "--write-card", "--max-new-tokens", "2")
    assert r.code == 1 and "generation_config.json: " in r.err
    assert (tampered / "README.md").read_bytes() == before  # the card never vouches for changed bytes


def test_verify_files_ignores_huggingface_hub_bookkeeping(originals, tmp_path):
    """`hf download --local-dir` leaves .cache/huggingface/ in the folder; the folder still matches."""
    dst = tmp_path / "v15-hf"
    convert(originals["v15"], dst)
    (dst / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (dst / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("0\n")
    assert run_cli("verify-files", dst).code == 0


def test_card_lists_the_assumptions_the_plan_and_the_report_record(originals, tmp_path):
    """Values no source file states (recorded as ``assumptions`` by the plan or the report) are named in the card."""
    from vlmkit.publish import card

    dst = tmp_path / "v15-hf"
    convert(originals["v15"], dst)
    manifest = json.loads((dst / "vlmkit-manifest.json").read_text())
    manifest["plan"]["assumptions"] = ["vision_config.num_attention_heads = 2 (no shape states it)"]
    manifest["parity"] = {"title": "parity", "original": "a", "converted": "b", "checks": [],
                          "assumptions": ["vision_config.num_attention_heads = 2 (no shape states it)",
                                          "layer_norm_eps = 1e-5 (LLaVA's default)"]}
    text = card.render(manifest, dst)
    assert text.count("- vision_config.num_attention_heads = 2 (no shape states it)") == 1
    assert "- layer_norm_eps = 1e-5 (LLaVA's default)" in text
