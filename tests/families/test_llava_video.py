"""LLaVA-Video / LLaVA-OneVision video input: frames pooled and newline'd as the original, run, converted, verified.

Every expected value is written here from the original's formulas (LLaVA-NeXT ``llava_arch.py`` at df17966:
``get_2dPool``, ``add_token_per_grid``, ``add_token_per_frame``, the ``one_token`` / ``no_token`` branches of
``prepare_inputs_labels_for_multimodal``), element by element, never by calling the code under test. The video
fields of LLaVA-Video-7B-Qwen2 are the ones its training script writes
(``scripts/video/train/SO400M_Qwen2_7B_ov_to_video_am9.sh`` and ``llava/train/train.py``'s defaults).
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

IMAGES = Path(__file__).parent.parent / "fixtures" / "images"
FRAMES = [IMAGES / n for n in ("chelsea.png", "coffee.png", "astronaut.png")]  # three real photos, three sizes
RELEASE_OV = Path(__file__).parent.parent / "fixtures" / "configs" / "llava-onevision-qwen2-7b-ov.json"
# what SO400M_Qwen2_7B_ov_to_video_am9.sh + train.py write into LLaVA-Video-7B-Qwen2's config.json
LLAVA_VIDEO = {"mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": 2,
               "add_faster_video": False, "faster_token_stride": 10}


pytestmark = pytest.mark.usefixtures("offline")  # no test here may reach the hub (conftest.py)


# ----------------------------------------------------------------------------- the original's formulas, by hand
def _bilinear_axis(size_in: int, size_out: int):
    """PyTorch's bilinear source indices and weights for one axis (align_corners False)."""
    scale = size_in / size_out
    out = []
    for o in range(size_out):
        src = max(scale * (o + 0.5) - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + 1 if i0 < size_in - 1 else i0
        out.append((i0, i1, src - i0))
    return out


def _pool_by_hand(frames: np.ndarray, mode: str) -> np.ndarray:
    """get_2dPool with stride 2 on ``[F, side*side, C]``: one pooled value per output cell, computed cell by cell."""
    count, tokens, dim = frames.shape
    side = int(round(math.sqrt(tokens)))
    grid = frames.reshape(count, side, side, dim)
    if mode == "bilinear":  # interpolate(size=ceil(side / 2))
        n = math.ceil(side / 2)
        axis = _bilinear_axis(side, n)
        out = np.zeros((count, n, n, dim))
        for i, (r0, r1, wr) in enumerate(axis):
            for j, (c0, c1, wc) in enumerate(axis):
                top = grid[:, r0, c0] * (1 - wc) + grid[:, r0, c1] * wc
                bottom = grid[:, r1, c0] * (1 - wc) + grid[:, r1, c1] * wc
                out[:, i, j] = top * (1 - wr) + bottom * wr
    else:  # avg_pool2d / max_pool2d with kernel = stride = 2: floor(side / 2) cells
        n = side // 2
        out = np.zeros((count, n, n, dim))
        for i in range(n):
            for j in range(n):
                window = grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(count, 4, dim)
                out[:, i, j] = window.mean(1) if mode == "average" else window.max(1)
    return out.reshape(count, n * n, dim)


def _newlines_by_hand(pooled: np.ndarray, position: str, newline: np.ndarray) -> np.ndarray:
    """The original's token order for a spatial_unpad checkpoint, one row at a time."""
    count, tokens, dim = pooled.shape
    side = int(round(math.sqrt(tokens)))
    rows = []
    for f in range(count):
        for r in range(side):
            rows.extend(pooled[f, r * side:(r + 1) * side])
            if position == "grid":
                rows.append(newline)  # add_token_per_grid: after every row of every frame
        if position == "frame":
            rows.append(newline)  # add_token_per_frame
    if position == "one_token":
        rows.append(newline)  # once after all frames ('unpad' in mm_patch_merge_type)
    return np.stack(rows)


# ----------------------------------------------------------------------------- pooling and newlines
@pytest.mark.parametrize("side", [5, 4])
@pytest.mark.parametrize("mode", ["average", "max", "bilinear"])
@pytest.mark.parametrize("position", ["grid", "frame", "one_token", "no_token"])
def test_pooled_frames_and_newlines_follow_the_original(mode, position, side):
    from vlmkit.families.llava import image_path

    rng = np.random.default_rng(side)
    frames = rng.normal(size=(3, side * side, 6))
    newline = rng.normal(size=6)
    pooled = image_path.pool_frames(torch.tensor(frames), mode, side)
    expected_pooled = _pool_by_hand(frames, mode)
    np.testing.assert_allclose(pooled.numpy(), expected_pooled, rtol=0, atol=1e-12)
    got = image_path.place_video_newlines(pooled, position, "spatial_unpad", torch.tensor(newline))
    np.testing.assert_allclose(got.numpy(), _newlines_by_hand(expected_pooled, position, newline), rtol=0, atol=1e-12)


def test_release_side_pools_to_the_sizes_the_original_gives():
    from vlmkit.families.llava import image_path

    frames = torch.zeros(2, 27 * 27, 4)  # SigLIP so400m/384: 27 x 27 patches per frame
    assert image_path.pool_frames(frames, "bilinear", 27).shape == (2, 14 * 14, 4)  # ceil(27 / 2)
    assert image_path.pool_frames(frames, "average", 27).shape == (2, 13 * 13, 4)  # floor: avg_pool2d
    assert image_path.pool_frames(frames, "max", 27).shape == (2, 13 * 13, 4)


def test_flat_and_spatial_without_unpad_add_no_one_token_newline():
    from vlmkit.families.llava import image_path

    pooled = torch.ones(2, 4, 3)
    newline = torch.zeros(3)
    assert image_path.place_video_newlines(pooled, "one_token", "spatial", newline).shape == (8, 3)
    assert image_path.place_video_newlines(pooled, "grid", "flat", newline).shape == (8, 3)


# ----------------------------------------------------------------------------- reading the config
def _ckpt(config: dict, path="ckpt"):
    return SimpleNamespace(config=config, path=path)


def test_video_fields_as_the_original_reads_them():
    from vlmkit.families.llava import image_path

    ov = json.loads(RELEASE_OV.read_text())
    cfg = image_path.video_config(_ckpt(ov))
    assert (cfg.pool_mode, cfg.newline_position, cfg.merge, cfg.notes) == ("bilinear", "one_token", "spatial_unpad", ())
    cfg = image_path.video_config(_ckpt({**ov, **LLAVA_VIDEO}))
    assert (cfg.pool_mode, cfg.newline_position, cfg.notes) == ("bilinear", "grid", ())
    no_field = {k: v for k, v in ov.items() if k != "mm_newline_position"}
    assert image_path.video_config(_ckpt(no_field)).newline_position == "one_token"  # the original's getattr default
    # the original's prepare_inputs_labels_for_multimodal pools with get_2dPool's default stride, whatever the field
    (note,) = image_path.video_config(_ckpt({**ov, "mm_spatial_pool_stride": 4})).notes
    assert "mm_spatial_pool_stride 4 is not used" in note and "stride 2" in note


@pytest.mark.parametrize(("change", "words"), [
    ({"add_faster_video": True}, "add_faster_video"),
    ({"mm_spatial_pool_mode": "mean"}, "mm_spatial_pool_mode 'mean'"),
    ({"mm_spatial_pool_mode": None}, "mm_spatial_pool_mode None"),
    ({"mm_newline_position": "row"}, "mm_newline_position 'row'"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres'"),
])
def test_video_fields_vlmkit_does_not_reproduce_are_refused_by_name(change, words):
    from vlmkit.families.llava import image_path

    with pytest.raises(ConfigError) as e:
        image_path.video_config(_ckpt({**json.loads(RELEASE_OV.read_text()), **change}, "/models/x"))
    assert words in str(e.value) and "/models/x/config.json" in str(e.value)


def test_a_video_is_a_list_of_frames():
    from vlmkit.runtime.messages import MessageError, Video, normalise

    turns = normalise([{"role": "user", "content": [{"type": "video", "video": ["a.png", "b.png"]},
                                                     {"type": "text", "text": "What happens?"}]}])
    assert turns[0].images == [Video(("a.png", "b.png"))] and turns[0].text == "What happens?"
    turns = normalise([{"role": "user", "content": "Q", "images": ["i.png"], "videos": [["a.png"]]}])
    assert turns[0].images == ["i.png", Video(("a.png",))]
    with pytest.raises(MessageError) as e:
        normalise([{"role": "user", "content": "Q", "videos": ["clip.mp4"]}])
    assert "messages[0].videos[0]: a video is a non-empty list of its frames" in str(e.value)
    assert "ffmpeg" in e.value.hint


def test_the_converted_chat_template_puts_a_video_where_the_original_puts_its_image():
    from jinja2 import Environment

    from vlmkit.runtime.templates import chat_template

    text = Environment().from_string(chat_template("qwen_1_5", legacy_tokenizer=True)).render(
        messages=[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<video>\n"
                    "What happens?<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- run: vlmkit.load / vlmkit chat
@pytest.fixture(scope="module")
def tiny_video(tiny_llava):
    """The tiny LLaVA-Video release (OneVision layout, the video training's config fields) and its --config file,
    built once per run (read-only)."""
    video = tiny_llava("video")
    return video["path"], video["heads"]


def _expected_answer(path: Path, heads: Path, question: str, max_new_tokens: int) -> list[int]:
    """The original's greedy answer for the three frames as one video, computed here step by step: transformers'
    SigLIP processor per frame, the trimmed tower's last hidden state, the projector, the hand-written pooling and
    grid newlines, the qwen_1_5 prompt split at its one <image>, and a plain greedy loop without a KV cache."""
    from transformers import AutoTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.families.llava.reference import OriginalLlava
    from vlmkit.options import LoadOptions

    config = json.loads((path / "config.json").read_text())
    model = OriginalLlava.load(open_original(path, LoadOptions(config=json.loads(heads.read_text()))))  # modules only
    side = 70
    processor = SiglipImageProcessorPil(size={"height": side, "width": side}, resample=3, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3, rescale_factor=1 / 255, do_resize=True, do_rescale=True,
                                        do_normalize=True)
    pixels = torch.tensor(np.stack([processor(Image.open(f).convert("RGB"), return_tensors="np")["pixel_values"][0]
                                    for f in FRAMES]))
    with torch.no_grad():
        hidden = model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]  # all 25 tokens, no CLS
        projected = model.projector(hidden).numpy().astype(np.float64)
    assert config["mm_spatial_pool_mode"] == "bilinear" and config["mm_newline_position"] == "grid"
    features = _newlines_by_hand(_pool_by_hand(projected, "bilinear"), "grid",
                                 model.image_newline.detach().numpy().astype(np.float64))
    assert features.shape[0] == 3 * 3 * (3 + 1)  # 3 frames x 3 rows x (3 pooled features + newline)

    tok = AutoTokenizer.from_pretrained(path)
    before = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    after = f"\n{question}<|im_end|>\n<|im_start|>assistant\n"
    embed = model.language_model.get_input_embeddings()
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}  # qwen_1_5's separator, the tokenizer's EOS
    with torch.no_grad():
        seq = torch.cat([embed(torch.tensor(tok(before).input_ids)), torch.tensor(features, dtype=torch.float32),
                         embed(torch.tensor(tok(after).input_ids))])
        answer = []
        for _ in range(max_new_tokens):
            token = int(model.language_model(inputs_embeds=seq[None]).logits[0, -1].argmax())
            answer.append(token)
            if token in stop:
                break
            seq = torch.cat([seq, embed(torch.tensor([token]))])
    return answer


def test_load_and_chat_answer_a_video_as_the_original(tiny_video):
    import vlmkit

    from ..conftest import run_cli

    path, heads = tiny_video
    question = "What happens in this video?"
    expected = _expected_answer(path, heads, question, 6)
    model = vlmkit.load(path, config=json.loads(heads.read_text()))
    reply = model.chat(question, videos=[[str(f) for f in FRAMES]], temperature=0, max_new_tokens=6)
    assert reply.tokens == expected
    assert reply.image_tokens == 36
    # the same video as a content part: the same answer (features cached by the frames' content)
    again = model.chat([{"role": "user", "content": [{"type": "video", "video": [str(f) for f in FRAMES]},
                                                     {"type": "text", "text": question}]}],
                       temperature=0, max_new_tokens=6)
    assert again.tokens == expected

    r = run_cli("chat", path, "--config", heads, "--video", *FRAMES, "--prompt", question, "--temperature", "0",
                "--max-new-tokens", "6")
    assert r.code == 0, r.err
    assert r.out.rstrip("\n") == reply.text


def test_chat_refuses_add_faster_video_in_one_line(tiny_video, tmp_path):
    from ..conftest import run_cli

    path, heads = tiny_video
    faster = tmp_path / "faster"
    shutil.copytree(path, faster)
    config = json.loads((faster / "config.json").read_text())
    (faster / "config.json").write_text(json.dumps({**config, "add_faster_video": True}))
    r = run_cli("chat", faster, "--config", heads, "--video", *FRAMES[:2], "--prompt", "What happens?",
                "--temperature", "0", "--max-new-tokens", "2")
    assert r.code != 0 and r.out == ""
    assert "add_faster_video is true" in r.err and "Traceback" not in r.err


# ----------------------------------------------------------------------------- convert + verify
def test_verify_compares_the_video_probe_where_transformers_computes_the_original(tiny_llava):
    """OneVision's release fields (bilinear, one_token) are what transformers' OneVision computes: the video probe's
    ids, logits and greedy tokens are compared and pass."""
    from ..conftest import run_cli

    ov = tiny_llava("onevision")  # vlmkit convert PATH OUT --to hf --config HEADS, once per run: exits 0
    path, heads, out = ov["path"], ov["heads"], ov.converted()
    assert "warning: video" not in ov.conversion()["convert_err"]
    written = json.loads((out / "video_preprocessor_config.json").read_text())
    assert written["image_mean"] == written["image_std"] == [0.5, 0.5, 0.5]  # not the class defaults (CLIP's)
    r = run_cli("verify", path, out, "--config", heads, "--image", FRAMES[0], "--prompt", "What happens?",
                "--image", FRAMES[1], "--prompt", "Describe it.", "--max-new-tokens", "6")
    assert "[FAIL]" not in r.out, r.out
    for check in ("video preprocessing", "video input ids", "video logits", "video greedy tokens"):
        assert f"[pass] {check}" in r.out, r.out


def test_llava_video_converts_with_a_warning_and_verify_fails_the_video_probe_by_name(tiny_video, tmp_path):
    """LLaVA-Video's grid newlines are not what transformers' OneVision does: convert says so naming the field,
    verify's video probe fails with the reason while the image checks pass, and chat on the converted folder refuses
    a video in one line naming the field (never an answer that is not the original's)."""
    from ..conftest import run_cli

    path, heads = tiny_video
    out = tmp_path / "hf"
    r = run_cli("convert", path, out, "--to", "hf", "--config", heads, "--quiet")
    assert r.code == 0, r.err
    assert "warning: video: the original places newlines by mm_newline_position 'grid'" in r.err, r.err
    r = run_cli("verify", path, out, "--config", heads, "--image", FRAMES[0], "--prompt", "What happens?",
                "--image", FRAMES[1], "--prompt", "Describe it.", "--max-new-tokens", "4")
    assert r.code != 0
    assert "[FAIL] video probe" in r.out and "mm_newline_position 'grid'" in r.out, r.out
    for check in ("pixel values", "input ids", "logits", "greedy tokens", "batched generation"):
        assert f"[pass] {check}" in r.out, r.out
    r = run_cli("chat", out, "--video", *FRAMES[:2], "--prompt", "What happens?", "--temperature", "0",
                "--max-new-tokens", "2")
    assert r.code != 0 and r.out == ""
    assert "would not be the original's answer" in r.err and "mm_newline_position 'grid'" in r.err, r.err
    assert "chat about videos with the original checkpoint" in r.err and "Traceback" not in r.err
