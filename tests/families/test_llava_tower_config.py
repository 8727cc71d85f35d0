"""LLaVA's vision tower config: never guessed silently, found where a training run left it, and proved
by a verify whose reference reads nothing the converter derived."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from vlmkit.families.llava import tiny

from ..conftest import run_cli

PROBE_ARGS = ("--max-new-tokens", "2")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test here may reach the hub: any snapshot download is recorded and refused."""
    import huggingface_hub

    calls: list[str] = []

    def refuse(repo_id, *args, **kwargs):
        calls.append(repo_id)
        raise OSError(f"offline test: no download of {repo_id}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    return calls


def _renamed_tower(src, dst, name):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["mm_vision_tower"] = name
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------ no silent guesses


def test_next_without_tower_config_is_refused_naming_the_ways_out(llava_parts, tmp_path):
    src = _renamed_tower(llava_parts["next"], tmp_path / "llava-v1.6-mistral-x", "someone/clip-vit-custom")
    r = run_cli("convert", src, tmp_path / "out", "--quiet")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and not (tmp_path / "out").exists()
    assert "'someone/clip-vit-custom' (from mm_vision_tower)" in r.err
    assert "num_attention_heads" in r.err and "layer_norm_eps" in r.err and "hidden_act" in r.err
    assert "--vision-tower" in r.err and "--config" in r.err and "--assume-clip-defaults" in r.err


def test_a_table_name_that_does_not_fit_the_weights_is_refused(llava_parts, tmp_path):
    """The tiny tower is 32 wide; calling it ViT-L/14-336 is a lie the shapes expose."""
    src = _renamed_tower(llava_parts["next"], tmp_path / "llava-v1.6-mistral-x", "openai/clip-vit-large-patch14-336")
    r = run_cli("convert", src, tmp_path / "out", "--quiet")
    assert r.code == 1, r.err
    assert "does not describe the checkpoint's tower" in r.err and "hidden_size 1024 vs 32" in r.err
    assert "--vision-tower" in r.err


def _sparse_safetensors(path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid safetensors file whose data is a hole: the shapes of a real release without its bytes."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def test_a_released_tower_name_converts_offline_from_the_table(llava_parts, tmp_path, _offline):
    """LLaVA-NeXT names openai/clip-vit-large-patch14-336; its config comes from the table, no download.

    The checkpoint has ViT-L/14-336's real tensor shapes (24 layers, 1024 wide, 577 positions;
    written as a sparse file) beside the tiny Mistral; the dry run reads headers only.
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.options import LoadOptions
    from vlmkit.tensors import open_source

    with torch.device("meta"):  # the published ViT-L/14-336 architecture, typed here from its model card
        tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, patch_size=14, image_size=336))

    tiny_next = open_source(llava_parts["next"])
    shapes = {n: tiny_next.info(n).shape for n in tiny_next.keys() if ".vision_tower." not in n}
    shapes["model.mm_projector.0.weight"] = (64, 1024)
    shapes.update({"model.vision_tower.vision_tower." + (n if n.startswith("vision_model.") else "vision_model." + n):
                   tuple(t.shape) for n, t in tower.state_dict().items() if not n.endswith("position_ids")})
    src = tmp_path / "llava-v1.6-mistral-7b"
    src.mkdir()
    _sparse_safetensors(src / "model.safetensors", shapes)
    sizes = tiny.TinySizes(vision_hidden=1024, image_size=336, patch=14)
    config = tiny.llava_config("mistral", sizes, tmp_path / "unused", next_=True)
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (src / "config.json").write_text(json.dumps(config))
    tiny.copy_tokenizer(src, "mistral")

    r = run_cli("convert", src, tmp_path / "out", "--dry-run")
    assert r.code == 0, r.err
    assert _offline == [], "a tower named in the table must not be downloaded"
    assert "table of released towers (openai/clip-vit-large-patch14-336)" in r.err
    assert "vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight [4096, 1024]" in r.out
    assert "assumed:" not in r.out

    ckpt = open_original(src, LoadOptions())
    assert (ckpt.vision_config["num_attention_heads"], ckpt.vision_config["projection_dim"]) == (16, 768)
    assert ckpt.preprocessor["crop_size"] == 336 and ckpt.assumptions == []


def test_assumed_values_are_listed_by_plan_manifest_and_verdict(llava_parts, tmp_path):
    """--assume-clip-defaults allows today's derivation, and everything built on it says so."""
    src = _renamed_tower(llava_parts["next"], tmp_path / "llava-v1.6-mistral-x", "someone/clip-vit-custom")
    dst = tmp_path / "out"
    plan = run_cli("convert", src, dst, "--dry-run", "--assume-clip-defaults")
    assert plan.code == 0, plan.err
    assert "assumed: vision_config.num_attention_heads = 1 (OpenAI CLIP's 64-wide heads" in plan.out

    r = run_cli("convert", src, dst, "--quiet", "--assume-clip-defaults")
    assert r.code == 0, r.err
    assert "warning: assumed vision_config.layer_norm_eps = 1e-05" in r.err
    manifest = json.loads((dst / "vlmkit-manifest.json").read_text())
    listed = " | ".join(manifest["assumptions"])
    for field in ("num_attention_heads = 1", "hidden_act = 'quick_gelu'", "layer_norm_eps = 1e-05", "image_mean"):
        assert field in listed
    assert manifest["plan"]["assumptions"] == manifest["assumptions"]

    refused = run_cli("verify", src, dst, *PROBE_ARGS)  # the reference does not assume unless told
    assert refused.code == 1 and "--assume-clip-defaults" in refused.err
    report = tmp_path / "report.json"
    v = run_cli("verify", src, dst, "--assume-clip-defaults", "--json", report, *PROBE_ARGS)
    data = json.loads(report.read_text())
    assert data["passed"] and data["verdict"] != "PASS" and data["verdict"].startswith("CONDITIONAL PASS")
    assert len(data["assumptions"]) == 4 and "assumed: vision_config.num_attention_heads = 1" in v.out
    assert "verdict: PASS" not in v.out


def test_config_fills_what_no_file_states_and_the_verdict_rests_on_it(llava_parts, tmp_path):
    src = _renamed_tower(llava_parts["next"], tmp_path / "llava-v1.6-mistral-x", "someone/clip-vit-custom")
    override = tmp_path / "target.json"
    override.write_text(json.dumps({"vision_config": {"num_attention_heads": 2, "hidden_act": "quick_gelu",
                                                      "layer_norm_eps": 1e-5}}))
    # the image normalisation is in no --config: still refused without the opt-in, naming it
    r = run_cli("convert", src, tmp_path / "refused", "--quiet", "--config", override)
    assert r.code == 1 and "image_mean" in r.err and "num_attention_heads" not in r.err.split("hint")[0]
    dst = tmp_path / "out"
    r = run_cli("convert", src, dst, "--quiet", "--config", override, "--assume-clip-defaults")
    assert r.code == 0, r.err
    assert json.loads((dst / "config.json").read_text())["vision_config"]["num_attention_heads"] == 2
    listed = json.loads((dst / "vlmkit-manifest.json").read_text())["assumptions"]
    assert "vision_config.num_attention_heads = 2 (from --config; no file of the original states it)" in listed


# ------------------------------------------------------------------ relative tower paths


def _trained_elsewhere(parts, tmp_path, name: str, form: str):
    """A checkpoint whose mm_vision_tower is relative to the directory training ran in, copied with its tower."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copytree(parts["clip"], folder / "clip-vit-tiny-patch14")
    return _renamed_tower(parts[form], folder / parts[form].name, name)


@pytest.mark.parametrize("form", ["v15", "next"])
def test_relative_tower_path_found_beside_the_checkpoint(llava_parts, tmp_path, monkeypatch, form):
    src = _trained_elsewhere(llava_parts, tmp_path, "./checkpoints/clip-vit-tiny-patch14", form)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = run_cli("convert", src, tmp_path / "out", "--quiet")
    assert r.code == 0, r.err
    assert f"used {tmp_path / 'checkpoints' / 'clip-vit-tiny-patch14'} beside the checkpoint" in r.err
    vision = json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]
    assert vision["num_attention_heads"] == 2  # the tower folder's own config, not a derivation
    # as the original reads it, a tower at the path from the working directory comes first (no note)
    shutil.copytree(llava_parts["clip"], elsewhere / "checkpoints" / "clip-vit-tiny-patch14")
    r = run_cli("convert", src, tmp_path / "again", "--quiet")
    assert r.code == 0 and "beside the checkpoint" not in r.err, r.err


def test_chat_finds_a_relative_tower_beside_the_checkpoint(llava_parts, tmp_path, monkeypatch):
    src = _trained_elsewhere(llava_parts, tmp_path, "./checkpoints/clip-vit-tiny-patch14", "v15")
    monkeypatch.chdir(tmp_path / "checkpoints")
    r = run_cli("chat", src, "--image", tiny.ASSETS / "images" / "chelsea.png", "--prompt", "What?",
                "--temperature", "0", "--max-new-tokens", "2")
    assert r.code == 0, r.err


def test_demo_checkpoint_commands_work_from_any_directory(tmp_path, monkeypatch):
    from vlmkit import demo

    monkeypatch.chdir(tmp_path)
    original = demo.build_original(demo.Path("demo-output"))
    assert not json.loads((original / "config.json").read_text())["mm_vision_tower"].startswith("/")
    for cwd, path in ((tmp_path / "demo-output", "llava-v1.5-llama-tiny"), (tmp_path.parent, tmp_path / original)):
        monkeypatch.chdir(cwd)
        r = run_cli("convert", path, tmp_path / f"out-{cwd.name}", "--dry-run")
        assert r.code == 0, (cwd, r.err)


# ------------------------------------------------------------------ verify is independent of the converter


def test_verify_fails_a_conversion_made_with_a_wrong_tower_config(llava_parts, tmp_path):
    """--config gives the target 1 head where the tower has 2: convert obeys, verify (same flags) must FAIL."""
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"vision_config": {"num_attention_heads": 1}}))
    r = run_cli("convert", llava_parts["next"], tmp_path / "out", "--quiet", "--config", wrong, "--verify", *PROBE_ARGS)
    assert r.code == 3, r.out + r.err
    assert "[FAIL] logits" in r.out and "[pass] pixel values" in r.out


@pytest.fixture(scope="module")
def next_converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-next-edits")
    clip = tiny.make_clip(root / "clip-vit-tiny-patch14")
    src = tiny.make_llava_next(root / "llava-v1.6-mistral-tiny", clip)
    dst = root / "converted"
    r = run_cli("convert", src, dst, "--quiet", "--verify", *PROBE_ARGS)
    assert r.code == 0 and "verdict: PASS" in r.out, r.out + r.err
    return src, dst


def _set_everywhere(data, key, value):
    """Set ``key`` wherever it occurs in a JSON document (transformers 5 nests the image processor)."""
    if isinstance(data, dict):
        return {k: value if k == key else _set_everywhere(v, key, value) for k, v in data.items()}
    return data


def _edit_json(folder, key, value):
    for path in (folder / "config.json", folder / "preprocessor_config.json", folder / "processor_config.json"):
        if path.exists():
            path.write_text(json.dumps(_set_everywhere(json.loads(path.read_text()), key, value)))


def _without_square_grids(pinpoints):
    return [[h, w] for h, w in pinpoints if h != w]  # the probes' grid (2x2) is no longer on the list


EDITS = {  # a value the converter derives, changed in the output only -> the stage that must fail
    "heads": (lambda d: _edit_vision(d, num_attention_heads=1), "logits"),
    "layer_norm_eps": (lambda d: _edit_vision(d, layer_norm_eps=1.0), "logits"),
    "rope_theta": (lambda d: _edit_config(d, lambda c: c["text_config"]["rope_parameters"].update(rope_theta=1e4)),
                   "logits"),  # transformers 5 keeps it in rope_parameters
    "pinpoints": (lambda d: _edit_json(d, "image_grid_pinpoints",
                                       _without_square_grids(
                                           json.loads((d / "config.json").read_text())["image_grid_pinpoints"])),
                  "pixel values"),
    "select_layer": (lambda d: _edit_top(d, vision_feature_layer=-1), "logits"),
    "image_size": (lambda d: (_edit_json(d, "size", {"shortest_edge": 70}),
                              _edit_json(d, "crop_size", {"height": 70, "width": 70})), "pixel values"),
    "template": (lambda d: (d / "chat_template.jinja").write_text(
        (d / "chat_template.jinja").read_text().replace("[INST]", "[INST] USER:")), "input ids"),
}


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _edit_vision(folder, **fields):
    _edit_config(folder, lambda c: c["vision_config"].update(fields))


def _edit_top(folder, **fields):
    _edit_config(folder, lambda c: c.update(fields))


@pytest.mark.parametrize("value", list(EDITS))
def test_verify_fails_when_a_derived_value_is_changed_in_the_output_only(next_converted, tmp_path, value):
    src, converted = next_converted
    dst = tmp_path / "edited"
    shutil.copytree(converted, dst)
    edit, stage = EDITS[value]
    edit(dst)
    v = run_cli("verify", src, dst, *PROBE_ARGS)
    assert v.code == 3, v.out + v.err
    assert f"[FAIL] {stage}" in v.out and "verdict: FAIL" in v.out
