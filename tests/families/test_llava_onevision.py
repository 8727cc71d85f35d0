"""LLaVA-OneVision's image side: the SigLIP tower as LLaVA-NeXT builds it and ``anyres_max_N``.

Every expected value is the original's algorithm applied by hand in the test (the steps of
``siglip_encoder.py``, ``mm_utils.py`` and ``llava_arch.py`` written out here), or an independent
implementation (transformers' SigLIP image processor with the published preprocessor config).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import ConfigError
from vlmkit.families.llava import anyres_max, image_path, siglip, towers

pytestmark = pytest.mark.usefixtures("offline")  # no test here may reach the hub (conftest.py)


# lmms-lab/llava-onevision-qwen2-*-ov config.json image_grid_pinpoints (as the release writes them): every
# (i, j) with 1 <= i, j <= 6, times 384, i varying slowest
OV_PINPOINTS = [[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)]


def _photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------- the tower
def test_tower_kind_follows_the_original_builder(tmp_path):
    assert siglip.tower_kind("google/siglip-so400m-patch14-384") == ("siglip", None)
    assert siglip.tower_kind("openai/clip-vit-large-patch14-336") == ("clip", None)
    local = tmp_path / "siglip-so400m-patch14-384"
    local.mkdir()
    kind, note = siglip.tower_kind(str(local))
    assert kind == "clip" and "local path" in note and "CLIP" in note  # builder.py tests the path first


def test_siglip_table_entry_is_the_published_tower():
    entry = towers.known_siglip("google/siglip-so400m-patch14-384")
    vision, pre = entry["vision_config"], entry["preprocessor"]
    # the original's SigLipVisionConfig class defaults describe the same tower
    assert {k: vision[k] for k in siglip.ORIGINAL_DEFAULTS} == siglip.ORIGINAL_DEFAULTS
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["size"] == {"height": 384, "width": 384} and pre["resample"] == 3
    assert towers.known_tower("google/siglip-so400m-patch14-384") is None  # no CLIP path reads it
    trimmed = siglip.trimmed_config(vision)
    assert trimmed["num_hidden_layers"] == 26 and trimmed["vision_use_head"] is False


def test_select_layer_is_ignored_and_said_so():
    assert siglip.select_layer_note({"mm_vision_select_layer": -2}) is None
    note = siglip.select_layer_note({"mm_vision_select_layer": -1})
    assert "mm_vision_select_layer=-1 is ignored" in note


def _tiny_published():
    return {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2,
            "patch_size": 14, "image_size": 42, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6}


def test_trimmed_tower_reads_what_the_original_reads():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    full = SiglipVisionModel(SiglipVisionConfig(**_tiny_published())).eval()  # as from_pretrained gives it
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        expected_full = full(pixels, output_hidden_states=True).hidden_states[-2]
        # siglip_encoder.py load_model: delete the last layer, head -> identity; forward: hidden_states[-1]
        # (its SigLipVisionModel wraps a .vision_model; transformers 5's is flat)
        del full.encoder.layers[-1:]
        full.head = torch.nn.Identity()
        expected = full(pixels, output_hidden_states=True).hidden_states[-1]
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("head.")}
    tower = siglip.build(siglip.trimmed_config(_tiny_published()), state)
    with torch.no_grad():
        got = siglip.encode(tower, pixels)
    assert got.shape == (2, 9, 16)  # every patch token: (42/14)^2, no CLS dropped
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected_full, rtol=0, atol=1e-6)


def test_a_tower_with_the_last_layer_still_in_is_refused():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    full = SiglipVisionModel(SiglipVisionConfig(**_tiny_published(), vision_use_head=False))
    with pytest.raises(RuntimeError, match="layers.2"):
        siglip.build(siglip.trimmed_config(_tiny_published()), full.state_dict())


# ------------------------------------------------------------------------------------------- pixels
def test_range_form_pinpoints_expand_as_the_original():
    assert [list(p) for p in anyres_max.pinpoints("(1x1),...,(6x6)", 384)] == OV_PINPOINTS
    # asymmetric: i (first number, width) varies slowest
    assert anyres_max.pinpoints("(1x1),(2x3)", 336) == ((336, 336), (336, 672), (336, 1008),
                                                       (672, 336), (672, 672), (672, 1008))
    assert anyres_max.pinpoints(OV_PINPOINTS, 384) == tuple(map(tuple, OV_PINPOINTS))
    with pytest.raises(ConfigError, match="range form"):
        anyres_max.pinpoints("(1x1),...,(2x2)", 42)


def test_siglip_pixels_equal_transformers_siglip_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    pre = towers.known_siglip("google/siglip-so400m-patch14-384")["preprocessor"]
    img = _photo(500, 300)
    fields = {k: pre[k] for k in ("image_mean", "image_std", "resample", "rescale_factor", "size", "do_resize",
                                  "do_rescale", "do_normalize")}
    expected = SiglipImageProcessorPil(**fields)(img, return_tensors="np")["pixel_values"][0]
    got = anyres_max.siglip_preprocess(img, size=384, mean=pre["image_mean"], std=pre["image_std"])
    assert got.shape == (3, 384, 384)  # squashed to the square: no shortest-edge resize, no crop
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_anyres_max_tiles_of_a_non_square_photo():
    img = _photo(900, 500, seed=1)  # (width, height)
    tiles = anyres_max.process(img, anyres_max.pinpoints(OV_PINPOINTS, 384), size=384, mean=[0.5] * 3,
                               std=[0.5] * 3)
    # by hand: full resolution needs width >= 900 and height >= 500; the least waste is (1152, 768) = 3 x 2 crops;
    # scale 1152/900 = 1.28 < 768/500 -> resized to 1152 x ceil(640.0) = 640, pasted at y = 64 on black
    assert tiles.shape == (1 + 6, 3, 384, 384)
    canvas = Image.new("RGB", (1152, 768), (0, 0, 0))
    canvas.paste(img.resize((1152, 640), Image.Resampling.BICUBIC), (0, 64))
    by_hand = [img.resize((384, 384), Image.Resampling.BICUBIC)]
    by_hand += [canvas.crop((x, y, x + 384, y + 384)) for y in (0, 384) for x in (0, 384, 768)]  # row-major
    for got, tile in zip(tiles, by_hand):
        want = (np.asarray(tile, np.float32) / 255 - 0.5) / 0.5
        np.testing.assert_allclose(got, want.transpose(2, 0, 1), rtol=0, atol=1e-6)
    assert np.all(tiles[1, :, :64] == -1.0)  # the black band became -1 after SigLIP's 0.5/0.5


# ------------------------------------------------------------------------------------------- features
def _original_unpad(tensor, original_size):
    # llava_arch.py unpad_image, as written there (original_size is (width, height))
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        return tensor[:, padding: current_height - padding, :]
    scale_factor = current_height / original_height
    new_width = int(original_width * scale_factor)
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding: current_width - padding]


def _original_arrangement(image_feature, image_size, num_patch_width, num_patch_height, newline, max_num_patches):
    # llava_arch.py prepare_inputs_labels_for_multimodal, spatial_unpad + anyres_max branch
    base_image_feature = image_feature[0]
    image_feature = image_feature[1:]
    height = width = math.isqrt(base_image_feature.shape[0])
    image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
    unit = image_feature.shape[2]
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(1, 2).flatten(2, 3)
    image_feature = _original_unpad(image_feature, image_size)
    c, h, w = image_feature.shape
    times = math.sqrt(h * w / (max_num_patches * unit**2))
    if times > 1.1:
        image_feature = image_feature[None]
        image_feature = torch.nn.functional.interpolate(image_feature, [int(h // times), int(w // times)],
                                                        mode="bilinear")[0]
    image_feature = torch.cat((image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    return torch.cat((base_image_feature, image_feature), dim=0)


def _features(f, size_wh, pinpoints, *, tower=42, patch=14, max_num=9, merge="spatial_unpad", newline=None):
    """``image_path.image_features`` of one image whose projected features are ``f`` (the tower is skipped)."""
    ckpt = SimpleNamespace(is_next=False, config={"image_aspect_ratio": f"anyres_max_{max_num}",
                                                  "image_grid_pinpoints": pinpoints, "mm_patch_merge_type": merge},
                           vision_config={"image_size": tower, "patch_size": patch})
    return image_path.image_features(ckpt, lambda crops: crops, [f], [size_wh], image_config=None,
                                     image_newline=newline)[0]


@pytest.mark.parametrize(("size_wh", "canvas", "max_num"), [
    ((900, 500), (3, 2), 1),   # 18 x 27 unpadded to 16 x 27: times 2.31 > 1.1 -> shrunk to 6 x 11
    ((900, 500), (3, 2), 2),   # times 1.63: shrunk to 9 x 16
    ((900, 500), (3, 2), 9),   # times 0.77: kept
    ((200, 619), (1, 2), 1),   # portrait: columns cut to 5; times 1.05 <= 1.1: kept
    ((66, 55), (2, 2), 1),     # 55 * 18/66 = 14.999...: int() keeps 14 rows (transformers' round keeps 16)
])
def test_anyres_max_features_follow_the_original(size_wh, canvas, max_num):
    torch.manual_seed(0)
    side, channels, tower = 9, 5, 126  # a 126-pixel tower with 14-pixel patches: 9 x 9 features per tile
    cols, rows = canvas
    features = torch.randn(1 + cols * rows, side * side, channels)
    newline = torch.randn(channels)
    # two pinpoints, the transposed canvas first: the grid must be read as (width, height)
    pinpoints = [[rows * tower, cols * tower], [cols * tower, rows * tower]] if cols != rows else [[cols * tower] * 2]
    got = _features(features, size_wh, pinpoints, tower=tower, max_num=max_num, newline=newline)
    want = _original_arrangement(features, size_wh, cols, rows, newline, max_num)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_anyres_max_shrinks_a_large_grid():
    features = torch.zeros(1 + 36, 27 * 27, 3)
    got = _features(features, (2304, 2304), "(1x1),...,(6x6)", tower=384, newline=torch.ones(3))
    # by hand: 162 x 162 grid, times = sqrt(162^2 / (9 * 27^2)) = 2 -> 81 x 81, plus a newline per row
    assert got.shape == (729 + 81 * 82, 3)


def test_one_tile_gets_one_newline():
    features = torch.randn(1, 9, 4)
    newline = torch.randn(4)
    got = _features(features, (30, 40), [[42, 42]], newline=newline)
    torch.testing.assert_close(got, torch.cat([features[0], newline[None]]))


def test_siglip_tower_through_the_image_path():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    full = SiglipVisionModel(SiglipVisionConfig(**_tiny_published())).eval()
    pixels = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        want = full(pixels, output_hidden_states=True).hidden_states[-2]  # = the trimmed tower's last
    state = {k: v for k, v in full.state_dict().items()
             if not k.startswith(("head.", "encoder.layers.2."))}
    tower = siglip.build(siglip.trimmed_config(_tiny_published()), state)
    # OneVision configs say mm_vision_select_layer -2 and mm_vision_select_feature "patch": neither applies
    config = {"mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
    got = image_path.encode_images(tower, torch.nn.Identity(), pixels, config, torch.float32)
    assert got.shape == (1, 9, 16)  # no CLS dropped
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_max_patches_parse():
    assert anyres_max.max_patches("anyres_max_9") == 9
    assert anyres_max.max_patches("anyres") is None


# ------------------------------------------------------------------------------------------- the release config
RELEASE = Path(__file__).parent.parent / "fixtures" / "configs" / "llava-onevision-qwen2-7b-ov.json"


def test_release_config_reads_as_the_original_reads_it():
    config = json.loads(RELEASE.read_text())
    assert anyres_max.max_patches(config["image_aspect_ratio"]) == 9
    assert [list(p) for p in anyres_max.pinpoints(config["image_grid_pinpoints"], 384)] == OV_PINPOINTS
    assert siglip.tower_kind(config["mm_vision_tower"]) == ("siglip", None)
    assert siglip.select_layer_note(config) is None  # -2 of the full tower is what the trimmed tower's -1 reads
    assert towers.known_siglip(config["mm_vision_tower"])["vision_config"]["hidden_size"] == config["mm_hidden_size"]


def test_gguf_refuses_the_mmproj_of_an_anyres_max_checkpoint(tmp_path):
    from ..conftest import run_cli

    release = tmp_path / "llava-onevision-qwen2-7b-ov"
    release.mkdir()
    shutil.copy(RELEASE, release / "config.json")
    before = sorted(p.name for p in release.iterdir())
    r = run_cli("convert", release, tmp_path / "gguf", "--to", "gguf")
    assert r.code != 0
    assert "anyres_max_9" in r.err and "llama.cpp" in r.err and "--to hf" in r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "gguf").exists() and sorted(p.name for p in release.iterdir()) == before


# ------------------------------------------------------------------------------------------- opening a checkpoint
class _Shapes:
    """A tensor source that has only names and shapes (what the tower config is checked against)."""

    def __init__(self, shapes):
        self.shapes = shapes

    def keys(self):
        return list(self.shapes)

    def info(self, name):
        return SimpleNamespace(shape=self.shapes[name])


def test_released_tower_config_is_checked_against_the_weights():
    prefix = "model.vision_tower.vision_tower.vision_model."
    shapes = {prefix + "embeddings.patch_embedding.weight": (1152, 3, 14, 14),
              prefix + "embeddings.position_embedding.weight": (729, 1152),  # no CLS position
              prefix + "encoder.layers.0.mlp.fc1.weight": (4304, 1152),
              prefix + "encoder.layers.25.mlp.fc1.weight": (4304, 1152)}  # 26 layers: the release's trimmed tower
    config, pre, assumptions = siglip.tower_config("google/siglip-so400m-patch14-384", _Shapes(shapes), prefix, {})
    assert config["num_hidden_layers"] == 26 and config["image_size"] == 384 and not assumptions
    assert pre["image_mean"] == [0.5] * 3
    shapes[prefix + "encoder.layers.26.mlp.fc1.weight"] = (4304, 1152)  # the last layer kept: not the original's
    with pytest.raises(ConfigError, match="num_hidden_layers 26 vs 27"):
        siglip.tower_config("google/siglip-so400m-patch14-384", _Shapes(shapes), prefix, {})


def _tiny_onevision(folder, tower_name):
    """An OneVision-layout checkpoint: the release's config.json with toy sizes, the trimmed tower inside."""
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(**_tiny_published()))
    del tower.encoder.layers[-1:]  # saved after the original's load_model trimmed it
    state = {f"model.vision_tower.vision_tower.vision_model.{k}": v.contiguous()
             for k, v in tower.state_dict().items() if not k.startswith("head.")}
    # the projector at Linear's own init scale (a trained one is not unit-variance either)
    state |= {"model.mm_projector.0.weight": torch.randn(32, 16) / 4, "model.mm_projector.0.bias": torch.randn(32) / 4,
              "model.mm_projector.2.weight": torch.randn(32, 32) / 6, "model.mm_projector.2.bias": torch.randn(32) / 6,
              "model.image_newline": torch.randn(32), "model.embed_tokens.weight": torch.randn(64, 32),
              "lm_head.weight": torch.randn(64, 32)}
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads(RELEASE.read_text())
    config |= {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 64, "mm_hidden_size": 16, "mm_vision_tower": tower_name,
               "mm_vision_select_layer": -1}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_open_a_onevision_checkpoint(tmp_path):
    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.options import LoadOptions

    path = _tiny_onevision(tmp_path / "ov-tiny", "my-org/siglip-tiny-patch14-42")
    with pytest.raises(ConfigError, match="head count"):
        open_original(path, LoadOptions())
    ckpt = open_original(path, LoadOptions(config={"vision_config": {"num_attention_heads": 2}}))
    assert ckpt.backbone == "qwen2"
    assert ckpt.vision_config["model_type"] == "siglip_vision_model"
    assert ckpt.vision_config["num_hidden_layers"] == 2 and ckpt.vision_config["image_size"] == 42
    assert ckpt.preprocessor["image_mean"] == [0.5] * 3
    assert any("num_attention_heads = 2 (from --config)" in a for a in ckpt.assumptions)
    assert any("mm_vision_select_layer=-1 is ignored" in n for n in ckpt.notes)
    with pytest.raises(ConfigError, match="hidden_size 1152 vs 16"):  # the released name with other weights
        open_original(_tiny_onevision(tmp_path / "ov-renamed", "google/siglip-so400m-patch14-384"), LoadOptions())


def test_the_tower_values_no_file_states_come_from_config_and_are_listed_so(tmp_path):
    """Activation and epsilon of an unreleased SigLIP: --config's where given (else the original's class defaults),
    each assumption saying where its value came from."""
    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.options import LoadOptions

    path = _tiny_onevision(tmp_path / "ov-tiny", "my-org/siglip-tiny-patch14-42")
    ckpt = open_original(path, LoadOptions(config={"vision_config": {"num_attention_heads": 2}}))
    assert (ckpt.vision_config["hidden_act"], ckpt.vision_config["layer_norm_eps"]) == ("gelu_pytorch_tanh", 1e-6)
    assert "vision_config.layer_norm_eps = 1e-06 (LLaVA-NeXT's SigLipVisionConfig default)" in ckpt.assumptions
    stated = {"num_attention_heads": 2, "image_size": 42, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    ckpt = open_original(path, LoadOptions(config={"vision_config": stated}))
    assert (ckpt.vision_config["hidden_act"], ckpt.vision_config["layer_norm_eps"]) == ("gelu", 1e-5)
    assert len(ckpt.assumptions) == 4 and all("(from --config)" in a for a in ckpt.assumptions), ckpt.assumptions


# ------------------------------------------------------------------------------------------- the reference
TINY_TOWER = 42  # tiny SigLIP: 42-pixel images, 14-pixel patches, 3 x 3 features per tile


def _tiny_onevision_full(folder, qwen2: Path):
    """A OneVision-layout checkpoint with a whole tiny Qwen2 and the real Qwen2 tokenizer (the files of ``qwen2``,
    ``bpe_vocabs``' folder); pinpoints as the release writes them (every (i, j) up to 6 x 6, i slowest), in multiples
    of the tiny tower's size."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _tiny_onevision(folder, "my-org/siglip-tiny-patch14-42")
    torch.manual_seed(1)
    lm = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False))
    # word embeddings on the scale of the projected image features, as in a trained model (at init scale 0.02
    # the text positions' RMSNorm would magnify float32 rounding of the image tokens ~50 times)
    torch.nn.init.normal_(lm.model.embed_tokens.weight, std=0.5)
    state = load_file(folder / "model.safetensors") | {k: v.contiguous() for k, v in lm.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["image_grid_pinpoints"] = [[i * TINY_TOWER, j * TINY_TOWER] for i in range(1, 7) for j in range(1, 7)]
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen2 / name, folder / name)
    return folder


def _transformers_onevision(ckpt_folder, pinpoints_hw):
    """transformers' LlavaOnevisionModel over the checkpoint's weights, the keys mapped as its conversion script does."""
    from safetensors.torch import load_file
    from transformers import LlavaOnevisionConfig, LlavaOnevisionModel, Qwen2Config, SiglipVisionConfig

    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64).to_dict(),
        vision_config=SiglipVisionConfig(**{**_tiny_published(), "num_hidden_layers": 2},
                                         vision_use_head=False).to_dict(),
        image_grid_pinpoints=pinpoints_hw, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionModel(config).eval()
    mapped = {}
    for name, value in load_file(ckpt_folder / "model.safetensors").items():
        if name.startswith("model.vision_tower.vision_tower.vision_model."):
            mapped["vision_tower." + name[len("model.vision_tower.vision_tower.vision_model."):]] = value
        elif name.startswith("model.mm_projector."):
            index = name[len("model.mm_projector."):].split(".")[0]
            mapped[f"multi_modal_projector.linear_{1 if index == '0' else 2}." + name.split(".")[-1]] = value
        elif name == "model.image_newline":
            mapped["image_newline"] = value
        elif name.startswith("model."):
            mapped["language_model." + name[len("model."):]] = value
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("position_ids")]
    return model


def test_reference_image_path_equals_transformers_onevision_on_a_non_square_photo(bpe_vocabs, tmp_path):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.families.llava.reference import OriginalLlava
    from vlmkit.options import LoadOptions
    from vlmkit.runtime import images

    path = _tiny_onevision_full(tmp_path / "ov-tiny", bpe_vocabs[0]["qwen2"])
    ckpt = open_original(path, LoadOptions(config={"vision_config": {"num_attention_heads": 2}}))
    reference = OriginalLlava.load(ckpt)
    photo = Image.open(Path(__file__).parent.parent / "fixtures" / "images" / "chelsea.png").convert("RGB")
    assert photo.size == (451, 300)
    pixels, sizes = images.preprocess([photo], reference.image_config)
    got = reference.image_features(pixels, sizes)[0]

    # transformers reads pinpoints and image sizes as (height, width): the release's list, each pair swapped
    pinpoints_hw = [[h, w] for w, h in json.loads((path / "config.json").read_text())["image_grid_pinpoints"]]
    processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3,
                                                size={"height": TINY_TOWER, "width": TINY_TOWER},
                                                image_grid_pinpoints=pinpoints_hw, do_pad=True)
    theirs = processor(photo, return_tensors="pt")
    assert theirs["image_sizes"].tolist() == [[300, 451]]
    torch.testing.assert_close(pixels[0], theirs["pixel_values"][0], rtol=0, atol=0)
    model = _transformers_onevision(path, pinpoints_hw)
    with torch.no_grad():
        out = model.get_image_features(theirs["pixel_values"], theirs["image_sizes"], vision_feature_layer=-1,
                                       vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                       output_hidden_states=True)
    want = out.pooler_output[0]
    # by hand: the largest canvases (252 wide) tie on effective pixels; (252, 168) wastes least: 6 x 4 tiles, a
    # 12 x 18 grid; unpad keeps int(300 * 18/451) = 11 -> (12 - 11) // 2 = 0 rows cut; times = sqrt(216 / 81) = 1.63,
    # shrunk to int(12 // 1.63) x int(18 // 1.63) = 7 x 11, a newline per row, after the base image's 9
    assert got.shape == want.shape == (9 + 7 * 12, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_siglip_tower_without_anyres_max_is_refused_by_name(tmp_path):
    from vlmkit.families.llava import image_path
    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.options import LoadOptions

    path = _tiny_onevision(tmp_path / "ov-pad", "my-org/siglip-tiny-patch14-42")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "pad"}))
    ckpt = open_original(path, LoadOptions(config={"vision_config": {"num_attention_heads": 2}}))
    with pytest.raises(ConfigError, match="SigLIP tower with image_aspect_ratio 'pad'"):
        image_path.image_config(ckpt)


def test_converted_tensors_and_config_give_the_reference_logits(bpe_vocabs, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlmkit.conversion import engine
    from vlmkit.families.llava import onevision
    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.families.llava.reference import OriginalLlava
    from vlmkit.options import LoadOptions
    from vlmkit.runtime import images

    path = _tiny_onevision_full(tmp_path / "ov-tiny", bpe_vocabs[0]["qwen2"])
    ckpt = open_original(path, LoadOptions(config={"vision_config": {"num_attention_heads": 2}}))
    config = onevision.hf_config(ckpt, image_token_index=62, video_token_index=63)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert config.vision_config.num_hidden_layers == 2 and not config.vision_config.vision_use_head
    out = tmp_path / "ov-hf"
    engine.run(onevision.tensors(ckpt, config), out)
    written = json.loads((out / "preprocessor_config.json").read_text())
    assert written["image_mean"] == written["image_std"] == [0.5, 0.5, 0.5]  # not the class defaults (CLIP's)

    photo = Image.open(Path(__file__).parent.parent / "fixtures" / "images" / "chelsea.png").convert("RGB")
    reference = OriginalLlava.load(ckpt)
    pixels, sizes = images.preprocess([photo], reference.image_config)
    features = reference.image_features(pixels, sizes)
    ids = [5, 6, -200, 7, 8]  # tokenizer_image_token's form: -200 where the image goes
    want = reference.logits(ids, features)

    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    theirs = processor(photo, return_tensors="pt")
    torch.testing.assert_close(theirs["pixel_values"][0], pixels[0], rtol=0, atol=0)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    hf_ids = [5, 6] + [62] * features[0].shape[0] + [7, 8]
    with torch.no_grad():
        got = model(input_ids=torch.tensor([hf_ids]), pixel_values=theirs["pixel_values"],
                    image_sizes=theirs["image_sizes"]).logits[0]
    assert got.shape[0] == want.shape[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_ov(tiny_llava):
    """The registry's tiny OneVision release (Qwen2 on its real vocabulary, SigLIP inside) and its --config file,
    built once per run (read-only)."""
    ov = tiny_llava("onevision")
    return ov["path"], ov["heads"]


def test_convert_and_verify_a_onevision_checkpoint_end_to_end(tiny_ov, converted_ov):
    from ..conftest import run_cli

    path, heads = tiny_ov
    out = converted_ov  # vlmkit convert PATH OUT --to hf --config HEADS: the fixture checks it exits 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    # transformers' OneVision script: <image>, <video> appended to Qwen2's 151,646 tokens; rows + 2 padded to 64
    assert (config["image_token_index"], config["video_token_index"]) == (151646, 151647)
    assert config["text_config"]["vocab_size"] == math.ceil((151936 + 2) / 64) * 64
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 1000000.0  # the checkpoint's, not Qwen2's default
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaOnevisionProcessor" and processor["vision_aspect_ratio"] == "anyres_max_9"

    photo = Path(__file__).parent.parent / "fixtures" / "images" / "chelsea.png"  # 451 x 300: not square
    r = run_cli("verify", path, out, "--config", heads, "--image", photo, "--prompt", "What is in the picture?",
                "--image", photo, "--prompt", "Describe it.", "--max-new-tokens", "6")
    assert "[FAIL]" not in r.out, r.out
    for check in ("pixel values", "input ids", "logits", "greedy tokens", "batched generation"):
        assert f"[pass] {check}" in r.out, r.out
    assert "rows 151646..151999 masked" in r.out  # §4.5: the original's logits have 151,646 columns
    assert "CONDITIONAL PASS" in r.out  # the tiny tower's head count comes from --config, and says so
    greedy = next(line for line in r.out.splitlines() if "original greedy text:" in line).split(": ", 2)[-1]

    # vlmkit chat on the original: the reference's greedy answer
    r = run_cli("chat", path, "--config", heads, "--image", photo, "--prompt", "What is in the picture?",
                "--temperature", "0", "--max-new-tokens", "6")
    assert r.code == 0, r.err
    assert repr(r.out.strip("\n")) == greedy or repr(r.out.rstrip("\n")) == greedy, (r.out, greedy)


def test_gguf_text_only_writes_the_qwen2_language_model(tiny_ov, tmp_path):
    from ..bpe_tokenizers import gguf_fields
    from ..conftest import run_cli

    path, heads = tiny_ov
    out = tmp_path / "gguf"
    r = run_cli("convert", path, out, "--to", "gguf", "--text-only", "--config", heads, "--quiet")
    assert r.code == 0, r.err
    written = sorted(p.name for p in out.glob("*.gguf"))
    assert written == ["llava-onevision-qwen2-7b-ov-tiny-f16.gguf"]  # no mmproj (§8)
    fields = gguf_fields(out / written[0])  # the GGUF spec read directly: gguf-py's reader takes ~30 s on 152k tokens
    assert fields["general.architecture"] == "qwen2"
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert fields["tokenizer.ggml.tokens"][151646] == "<image>"


def test_verify_notes_the_video_differences_a_release_config_asks_for():
    from vlmkit.families.llava import onevision

    config = json.loads(RELEASE.read_text())
    ckpt = SimpleNamespace(config=config, path="ckpt")
    assert not [n for n in onevision.differences(ckpt) if n.startswith("video")]  # bilinear, one_token: as transformers
    notes = onevision.differences(SimpleNamespace(config={**config, "mm_spatial_pool_mode": "average",
                                                          "mm_newline_position": "grid"}, path="ckpt"))
    assert any("'average'" in n for n in notes) and any("'grid'" in n for n in notes)


# ------------------------------------------------------------------------------------------- the converted folder runs
PHOTO = Path(__file__).parent.parent / "fixtures" / "images" / "chelsea.png"  # 451 x 300: not square
QUESTIONS = ("What is in the picture?", "And its colours?")
FRAMES = [PHOTO, PHOTO.parent / "coffee.png"]  # a two-frame video of two real photos, two sizes
VIDEO_QUESTION = "What happens in this video?"


@pytest.fixture(scope="module")
def converted_ov(tiny_llava):
    """``vlmkit convert --to hf`` of the tiny release (the tower's head count from its --config file): ``vlmkit
    convert PATH DST --quiet --config HEADS`` (``--to hf`` is the default), made once per run (read-only)."""
    return tiny_llava("onevision").converted()


def _typed_conversation(monkeypatch, model, *flags) -> list[str]:
    """``vlmkit chat MODEL --image PHOTO --temperature 0`` with the two QUESTIONS typed in: the two answers."""
    import io

    from ..conftest import run_cli

    monkeypatch.setattr("sys.stdin", io.StringIO("".join(q + "\n" for q in QUESTIONS)))
    r = run_cli("chat", model, "--image", PHOTO, "--temperature", "0", "--max-new-tokens", "6", *flags)
    assert r.code == 0, r.err
    # stdout: "USER: ASSISTANT: answer\n" per question, then the last "USER: " that read the end of input
    answers = [part.rsplit("\nUSER: ", 1)[0] for part in r.out.split("ASSISTANT: ")[1:]]
    assert len(answers) == 2, r.out
    return answers


def test_chat_on_the_converted_folder_answers_as_the_original(tiny_ov, converted_ov, monkeypatch):
    """Two greedy turns about the non-square photo, and a question about a two-frame video: the converted folder, run
    by transformers with its own processor files and chat template, gives the tokens the original (run by the
    reference) gives, on the CLI and vlmkit.load."""
    import vlmkit
    from vlmkit import families
    from vlmkit.runtime.messages import MessageError

    from ..conftest import run_cli

    path, heads = tiny_ov
    found = families.find(converted_ov)
    assert (found.name, found.form) == ("llava", "transformers_onevision")
    original = _typed_conversation(monkeypatch, path, "--config", heads)
    assert original[0]
    assert _typed_conversation(monkeypatch, converted_ov) == original

    replies = {}
    for name, model in (("original", vlmkit.load(path, config=json.loads(heads.read_text()))),
                        ("converted", vlmkit.load(converted_ov))):
        messages = [{"role": "user", "content": QUESTIONS[0], "images": [PHOTO]}]
        first = model.chat(messages, temperature=0, max_new_tokens=6)
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": QUESTIONS[1]}]
        second = model.chat(messages, temperature=0, max_new_tokens=6)
        video = model.chat(VIDEO_QUESTION, videos=[FRAMES], temperature=0, max_new_tokens=6)
        replies[name] = [(r.tokens, r.prompt_tokens, r.image_tokens) for r in (first, second, video)]
        if name == "converted":  # its chat template puts a message's images before its videos: refused, not misplaced
            with pytest.raises(MessageError, match="a video before an image"):
                model.chat([{"role": "user", "content": [{"type": "video", "video": FRAMES},
                                                         {"type": "image", "image": PHOTO}]}], max_new_tokens=1)
    assert replies["converted"] == replies["original"]
    assert [r[0] for r in replies["original"]] and replies["original"][1][1] > replies["original"][0][1]
    # transformers' OneVision and the original's one_token + bilinear: each frame's 4 x 4 patches (56 / 14) pooled
    # to ceil(4 / 2) squared = 4 features, 2 frames, one newline after them
    assert replies["original"][2][2] == 2 * 4 + 1

    answers = []
    for model, flags in ((path, ["--config", heads]), (converted_ov, [])):
        r = run_cli("chat", model, *flags, "--video", *FRAMES, "--prompt", VIDEO_QUESTION, "--temperature", "0",
                    "--max-new-tokens", "6")
        assert r.code == 0, r.err
        answers.append(r.out)
    assert answers[1] == answers[0] and answers[0].strip()


def test_inspect_describes_the_original_and_the_converted_folder(tiny_ov, converted_ov):
    from ..conftest import run_cli

    for model, form in ((tiny_ov[0], "full"), (converted_ov, "transformers_onevision")):
        r = run_cli("inspect", model)
        assert r.code == 0, r.err
        assert "family:  llava" in r.out and f"llava form: {form}" in r.out, r.out
        assert "llava version: OneVision (anyres_max_9)" in r.out, r.out
    # the converted folder: the trimmed tiny tower, and the template named in its chat template
    assert "vision tower: siglip_vision_model, 2 layers, 56 pixels" in r.out and "template: qwen_1_5" in r.out, r.out


def test_serve_engine_vllm_starts_vllm_on_the_converted_folder_as_it_is(converted_ov, monkeypatch):
    """``vlmkit serve FOLDER --engine vllm``'s pre-start check passes and vLLM is handed the folder itself: it is in
    the published llava-hf layout, as vLLM's OneVision loader reads it (tests/engines/test_vllm_rows.py runs vLLM
    on such a folder with this command line)."""
    from vlmkit.options import LoadOptions
    from vlmkit.serve.app import ServeSettings
    from vlmkit.serve.engines import vllm

    monkeypatch.setattr(vllm, "python", lambda: shutil.which("true"))  # a "vLLM" that exits at once
    process, _ = vllm.start(str(converted_ov), ServeSettings(model_name="tiny"), LoadOptions())
    process.stop()
    argv = process.argv
    assert argv[1:3] == ["-m", vllm.SERVER_MODULE] and argv[argv.index("--model") + 1] == str(converted_ov)


def test_gguf_text_only_runs_in_llama_cpp_as_the_original_language_model(tiny_ov, bpe_vocabs, tmp_path):
    """``--to gguf --text-only``: llama.cpp loads the Qwen2 model, tokenises the qwen_1_5 prompt as the Qwen2
    tokenizer rebuilt from llama.cpp's vocabulary does, and its greedy tokens are the original's (text only)."""
    import llama_cpp
    from tokenizers import Tokenizer

    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.families.llava.reference import OriginalLlava
    from vlmkit.options import LoadOptions

    from ..conftest import run_cli
    from .test_llava_next_rows import QWEN_PROMPT

    path, heads = tiny_ov
    out = tmp_path / "gguf"
    r = run_cli("convert", path, out, "--to", "gguf", "--text-only", "--dtype", "f32", "--config", heads, "--quiet")
    assert r.code == 0, r.err
    (model,) = out.glob("*.gguf")
    prompt = QWEN_PROMPT.replace("<image>\n", "")  # conversation.py conv_qwen, a question without an image
    qwen2 = Tokenizer.from_file(str(bpe_vocabs[0]["qwen2"] / "tokenizer.json"))
    ids, im_end = qwen2.encode(prompt).ids, qwen2.token_to_id("<|im_end|>")  # qwen_1_5 stops at <|im_end|>

    reference = OriginalLlava.load(open_original(path, LoadOptions(config=json.loads(heads.read_text()))))
    want = reference.greedy(ids, [], 8, frozenset({im_end}))
    del reference

    llm = llama_cpp.Llama(str(model), n_ctx=256, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        got = []
        while len(got) < 8 and (not got or got[-1] != im_end):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
    finally:
        llm.close()
    assert got == want and len(want) > 1
