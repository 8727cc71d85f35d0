"""LLaVA image preprocessing: hand-worked cases from the original code, an independent CLIP computation, and
equality with the transformers 5 processors that the conversion writes."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlmkit.errors import ConfigError, ImageError
from vlmkit.families.llava.hf_output import image_processor as hf_image_processor
from vlmkit.runtime.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageConfig,
    anyres_grid_shape,
    clip_preprocess,
    divide_to_patches,
    expand2square,
    load_image,
    preprocess,
    resize_and_pad_image,
    select_best_resolution,
    unpad_features,
)

PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"
NAMES = ["chelsea", "astronaut", "coffee", "rocket"]  # 451x300, 512x512, 600x400, 640x427
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # llava-v1.6 config.json
TINY_PINPOINTS = tuple((w // 12, h // 12) for w, h in PINPOINTS)  # 336 -> 28, as tiny test models use
REAL = {a: ImageConfig(aspect=a, grid_pinpoints=PINPOINTS if a == "anyres" else ())
        for a in ("pad", "square", "anyres")}
TINY = {a: ImageConfig(aspect=a, size=28, crop=(28, 28), patch=28,
                       grid_pinpoints=TINY_PINPOINTS if a == "anyres" else ()) for a in ("pad", "square", "anyres")}
KIND = {"pad": "llava", "square": "llava", "anyres": "llava_next"}


def photo(name: str) -> Image.Image:
    return load_image(PHOTOS / f"{name}.png")


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def solid(w: int, h: int, rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (w, h), rgb)


# ------------------------------------------------------------------------------ select_best_resolution
@pytest.mark.parametrize("size, best", [
    ((1024, 899), (672, 672)),   # effective 672*589 beats 382*336 of the wide/tall candidates
    ((500, 1500), (336, 1008)),
    ((1920, 1080), (672, 672)),   # 672x378 = 254016 kept, against 597x336 = 200592 on the wide ones
    ((300, 200), (336, 672)),     # tie region: every candidate keeps all 60000 pixels, least waste 336*672 ties
    ((200, 300), (336, 672)),     # with 672*336, and the FIRST listed candidate wins
    ((336, 336), (336, 672)),
    ((337, 336), (672, 336)),     # just outside: only the wide candidates keep every pixel
    ((336, 337), (336, 672)),
])
def test_select_best_resolution_hand_worked(size, best):
    assert select_best_resolution(size, PINPOINTS) == best


def test_select_best_resolution_ties_go_to_the_first_candidate():
    assert select_best_resolution((300, 200), [(672, 336), (336, 672)]) == (672, 336)
    assert select_best_resolution((300, 200), [(336, 672), (672, 336)]) == (336, 672)


def test_select_best_resolution_of_a_sliver_keeps_the_first_least_wasteful():
    # 1x10000 keeps 0 pixels on every canvas (int(0.1008) = 0): the original then takes the least waste
    assert select_best_resolution((1, 10000), PINPOINTS) == (336, 672)
    from transformers.image_processing_utils import select_best_resolution as hf_select
    assert hf_select((10000, 1), [[h, w] for w, h in PINPOINTS]) == (672, 336)


# ------------------------------------------------------------------------------ placement
def test_resize_and_pad_places_the_image_centred_on_black():
    # 300x200 onto 336x672: width-bound, height ceil(200 * 336/300) = ceil(224.00000000000003) = 225 (float!)
    out = np.asarray(resize_and_pad_image(solid(300, 200, (255, 255, 255)), (336, 672)))
    assert out.shape == (672, 336, 3)
    rows = np.flatnonzero(out[:, 168, 0])
    assert (rows[0], rows[-1]) == (223, 223 + 225 - 1)  # paste y = (672 - 225) // 2 = 223
    assert out[0, 0].tolist() == [0, 0, 0] and out[-1, -1].tolist() == [0, 0, 0]
    # 400x100 onto 672x336: 672x168 pasted at y = (336 - 168) // 2 = 84
    out = np.asarray(resize_and_pad_image(solid(400, 100, (255, 255, 255)), (672, 336)))
    rows = np.flatnonzero(out[:, 300, 0])
    assert (rows[0], rows[-1]) == (84, 84 + 168 - 1)


def test_divide_to_patches_is_row_major():
    canvas = Image.new("RGB", (56, 84))
    for i in range(6):  # colour each 28x28 cell by its row-major index
        canvas.paste((i, 0, 0), ((i % 2) * 28, (i // 2) * 28, (i % 2) * 28 + 28, (i // 2) * 28 + 28))
    patches = divide_to_patches(canvas, 28)
    assert [p.size for p in patches] == [(28, 28)] * 6
    assert [p.getpixel((0, 0))[0] for p in patches] == [0, 1, 2, 3, 4, 5]


def test_expand2square_colour_and_placement():
    background = tuple(int(m * 255) for m in CLIP_MEAN)
    assert background == (122, 116, 104)
    wide = np.asarray(expand2square(solid(300, 200, (255, 0, 0)), background))
    assert wide.shape == (300, 300, 3)
    assert wide[49, 0].tolist() == [122, 116, 104] and wide[50, 0].tolist() == [255, 0, 0]  # y = (300-200)//2
    assert wide[249, 0].tolist() == [255, 0, 0] and wide[250, 0].tolist() == [122, 116, 104]
    tall = np.asarray(expand2square(solid(200, 301, (0, 255, 0)), background))
    assert tall.shape == (301, 301, 3)  # x = (301-200)//2 = 50: 50 columns left, 51 right
    assert tall[0, 49].tolist() == [122, 116, 104] and tall[0, 50].tolist() == [0, 255, 0]
    assert tall[0, 249].tolist() == [0, 255, 0] and tall[0, 250].tolist() == [122, 116, 104]
    square = solid(64, 64, (1, 2, 3))
    assert expand2square(square, background) is square


# ------------------------------------------------------------------------------ model side: grid and unpad
@pytest.mark.parametrize("size, grid, tokens", [
    ((1024, 899), (2, 2), 2634), ((640, 480), (2, 2), 2340), ((1920, 1080), (2, 2), 1948),
    ((500, 1500), (1, 3), 2376), ((336, 336), (1, 2), 1176), ((300, 200), (1, 2), 976), ((200, 300), (1, 2), 1476),
])
def test_token_counts_of_the_fact_sheet(size, grid, tokens):
    assert anyres_grid_shape(size, PINPOINTS, 336) == grid
    features = torch.zeros(1, grid[1] * 24, grid[0] * 24)  # (C, rows, cols) as spatial_unpad lays them out
    _, rows, cols = unpad_features(features, size).shape
    assert 576 + rows * (cols + 1) == tokens  # base image + unpadded grid + one newline per row


def test_grid_pinpoints_may_be_the_string_form():
    assert anyres_grid_shape((1024, 899), str([list(p) for p in PINPOINTS]), 336) == (2, 2)


def test_unpad_truncates_and_cuts_symmetrically():
    # 1024x899 on a 48x48 grid: int(899 * 48/1024) = int(42.14) = 42 rows, 3 cut on each side
    assert unpad_features(torch.zeros(1, 48, 48), (1024, 899)).shape == (1, 42, 48)
    # 1000x300 on 24x72: int(21.6) = 21 rows; (24 - 21) // 2 = 1 cut each side leaves 22 (odd remainder)
    assert unpad_features(torch.zeros(1, 24, 72), (1000, 300)).shape == (1, 22, 72)
    # tall: 500x1500 on 72x24: int(500 * 72/1500) = 24 columns, nothing cut
    assert unpad_features(torch.zeros(1, 72, 24), (500, 1500)).shape == (1, 72, 24)


def test_unpad_rounding_differs_from_transformers_where_documented():
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    # 88x55 lands on the 336x672 canvas: 48 rows x 24 columns of features. 55 * (24/88) is
    # 14.999999999999998: the original keeps int() = 14 rows (cut (48-14)//2 = 17 each side); transformers
    # rounds to 15 first and keeps 16 rows (cut 16 each side), i.e. 2 x 25 more image tokens.
    canvas = torch.zeros(1, 48, 24)
    assert anyres_grid_shape((88, 55), PINPOINTS, 336) == (1, 2)
    assert unpad_features(canvas, (88, 55)).shape == (1, 14, 24)
    assert unpad_image(canvas, (55, 88)).shape == (1, 16, 24)  # (H, W) there


# ------------------------------------------------------------------------------ CLIP preprocessing
RESIZED = {"chelsea": (505, 336), "astronaut": (336, 336), "coffee": (504, 336), "rocket": (503, 336)}
# 4.37 truncates the long edge: 336*451/300 = 505.1, 336*600/400 = 504, 336*640/427 = 503.6 -> 503 (not 504)


@pytest.mark.parametrize("name", NAMES)
def test_clip_preprocess_matches_an_independent_computation(name):
    img = photo(name)
    w, h = RESIZED[name]
    x = torch.from_numpy(np.array(img.resize((w, h), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    top, left = (h - 336) // 2, (w - 336) // 2
    x = (x[:, top:top + 336, left:left + 336].double() / 255).float()
    expected = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    got = clip_preprocess(img, REAL["square"])
    assert got.dtype == np.float32 and got.shape == (3, 336, 336)
    assert np.abs(got - expected.numpy()).max() <= 1e-6


def test_preprocess_shapes_and_sizes():
    images = [photo(n) for n in NAMES]
    pv, sizes = preprocess(images, REAL["pad"])
    assert pv.shape == (4, 3, 336, 336) and sizes == [(451, 300), (512, 512), (600, 400), (640, 427)]
    pv, _ = preprocess(images, REAL["anyres"])  # chelsea: 672x336 canvas (2 crops); the others 672x672 (4)
    assert isinstance(pv, list) and [t.shape[0] for t in pv] == [3, 5, 5, 5]
    pv, _ = preprocess(images[1:], REAL["anyres"])
    assert pv.shape == (3, 5, 3, 336, 336)
    # pad: the mean-coloured band normalises to (int(m*255)/255 - m) / s, just below zero
    band = preprocess([photo("chelsea")], REAL["pad"])[0][0, :, 0, 0]
    expected = (torch.tensor([122, 116, 104]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(band, expected.float(), atol=1e-6)


def test_preprocess_accepts_paths_and_bytes():
    path = PHOTOS / "coffee.png"
    a, _ = preprocess([path], TINY["pad"])
    b, _ = preprocess([path.read_bytes()], TINY["pad"])
    c, _ = preprocess([Image.open(path)], TINY["pad"])
    assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------ transformers equality
def assert_hf_equal(images: list[Image.Image], cfg: ImageConfig) -> None:
    processor, _ = hf_image_processor(cfg, KIND[cfg.aspect])
    ours, sizes = preprocess(images, cfg)
    out = processor(images, return_tensors="pt")
    theirs = out["pixel_values"]
    for i, t in enumerate(ours if isinstance(ours, list) else list(ours)):
        if cfg.aspect == "anyres":  # transformers zero-pads the crop dimension to the batch maximum
            assert not theirs[i, t.shape[0]:].any()
            assert out["image_sizes"][i].tolist() == [sizes[i][1], sizes[i][0]]  # (H, W) there
            theirs_i = theirs[i, :t.shape[0]]
        else:
            theirs_i = theirs[i]
        assert theirs_i.shape == t.shape
        assert (theirs_i - t).abs().max().item() <= 1e-5


@pytest.mark.parametrize("aspect", ["pad", "square", "anyres"])
def test_hf_processor_equals_reference_on_photos_at_336(aspect):
    assert_hf_equal([photo(n) for n in NAMES], REAL[aspect])


@pytest.mark.parametrize("aspect", ["pad", "square", "anyres"])
def test_hf_processor_equals_reference_on_photos_tiny(aspect):
    assert_hf_equal([photo(n) for n in NAMES], TINY[aspect])


@pytest.mark.parametrize("aspect", ["pad", "square", "anyres"])
def test_hf_processor_equals_reference_in_the_tie_region(aspect):
    assert_hf_equal([noise(300, 200, 1), noise(200, 300, 2), noise(336, 336, 3), noise(337, 336, 4)], REAL[aspect])
    assert_hf_equal([noise(25, 17, 5), noise(17, 25, 6), noise(28, 28, 7), noise(300, 200, 8)], TINY[aspect])


def test_llava_hf_pinpoints_unswapped_would_pick_the_transposed_canvas():
    processor, pinpoints = hf_image_processor(REAL["anyres"], "llava_next")
    assert pinpoints == [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]
    processor.image_grid_pinpoints = [list(p) for p in PINPOINTS]  # as llava-hf publishes them
    img = noise(300, 200, 1)
    ours, _ = preprocess([img], REAL["anyres"])
    theirs = processor([img], return_tensors="pt")["pixel_values"]
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() > 1  # 2 crops side by side, not stacked


def test_swapped_pinpoints_reproduce_every_choice_and_grid():
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape as hf_grid

    for pinpoints, side, sizes in [(PINPOINTS, 336, range(8, 1400, 7)), (TINY_PINPOINTS, 28, range(1, 120))]:
        swapped = [[h, w] for w, h in pinpoints]
        unswapped_mismatch = set()
        for w in sizes:
            for h in sizes:
                ours = select_best_resolution((w, h), pinpoints)
                assert hf_select((h, w), swapped)[::-1] == ours, (w, h)
                assert hf_grid((h, w), swapped, side)[::-1] == anyres_grid_shape((w, h), pinpoints, side)
                if hf_select((h, w), [list(p) for p in pinpoints])[::-1] != ours:
                    unswapped_mismatch.add((w, h))
        # without the swap, exactly the ties go the other way: images that fit every canvas whole, and
        # 1-pixel slivers longer than the longest canvas side, which keep 0 pixels on every canvas
        ties = {(w, h) for w in sizes for h in sizes if w <= side and h <= side}
        slivers = {(w, h) for w in sizes for h in sizes if min(w, h) == 1 and max(w, h) > 3 * side}
        assert unswapped_mismatch == ties | slivers


@pytest.mark.parametrize("aspect", ["pad", "anyres"])
def test_saved_processor_reloads_to_the_same_class_and_output(tmp_path, aspect):
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    processor, _ = hf_image_processor(TINY[aspect], KIND[aspect])
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == type(processor).__name__.removesuffix("Pil")
    reloaded = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(reloaded) is type(processor)
    if not is_torchvision_available():  # here transformers falls back to PIL on its own
        assert type(AutoImageProcessor.from_pretrained(tmp_path)) is type(processor)
    images = [photo("chelsea"), noise(17, 25)]
    a = processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(a, reloaded(images, return_tensors="pt")["pixel_values"])


def test_hf_processor_refuses_a_kind_that_cannot_match():
    with pytest.raises(ConfigError, match="aspect='anyres' cannot be done by kind='llava'"):
        hf_image_processor(REAL["anyres"], "llava")


# ------------------------------------------------------------------------------ ImageConfig.from_original
def test_from_original_v15_with_old_style_preprocessor():
    cfg = ImageConfig.from_original({"image_aspect_ratio": "pad"}, {
        "crop_size": 336, "size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "resample": 3})
    assert cfg == ImageConfig(aspect="pad", size=336, crop=(336, 336), patch=336)


def test_from_original_v16_with_string_pinpoints():
    cfg = ImageConfig.from_original(
        {"image_aspect_ratio": "anyres", "image_grid_pinpoints": "[[336, 672], [672, 336], [672, 672], "
                                                                 "[1008, 336], [336, 1008]]"},
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
         "rescale_factor": 0.00392156862745098})
    assert cfg.aspect == "anyres" and cfg.grid_pinpoints == PINPOINTS and cfg.patch == 336


def test_from_original_defaults_follow_the_original():
    cfg = ImageConfig.from_original({}, {})  # no image_aspect_ratio: the plain CLIP branch; CLIP defaults 224
    assert (cfg.aspect, cfg.size, cfg.crop) == ("square", 224, (224, 224))


@pytest.mark.parametrize("llava, clip, message", [
    ({"image_aspect_ratio": "anyres_max_9"}, {}, "image_aspect_ratio='anyres_max_9'"),
    ({}, {"do_center_crop": False}, "do_center_crop=False is not supported"),
    ({}, {"size": {"height": 336, "width": 336}}, "size=.* has no shortest_edge"),
    ({}, {"resample": 2}, "resample=2"),
    ({}, {"size": 224, "crop_size": 336}, r"crop=\(336, 336\) must be positive and fit inside size=224"),
    ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[300, 600]]}, {"size": 336, "crop_size": 336},
     r"\[\(300, 600\)\] are not positive multiples of patch=336"),
    ({"image_aspect_ratio": "anyres"}, {}, "needs grid_pinpoints"),
    ({}, {"crop_size": {"height": 224}}, "crop_size=.* needs height and width"),
])
def test_from_original_refuses_what_the_pipeline_does_not_do(llava, clip, message):
    with pytest.raises(ConfigError, match=message):
        ImageConfig.from_original(llava, clip)


# ------------------------------------------------------------------------------ load_image
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data (nothing that size is ever allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    photo("chelsea").save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def pil_globals():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    yield
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before  # never changed by vlmkit


def test_load_image_sources_agree(pil_globals):
    path = PHOTOS / "rocket.png"
    a, b = load_image(path), load_image(path.read_bytes())
    c = load_image(Image.open(path).convert("RGBA"))
    assert a.mode == b.mode == c.mode == "RGB" and a.size == (640, 427)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))


def test_load_image_refuses_a_bomb_header_without_decoding(pil_globals):
    with pytest.raises(ImageError, match="image bytes: the header claims a huge image"):
        load_image(png_header_only(20000, 20000))  # 400 Mpx: above PIL's own hard limit too
    # 72 Mpx: under PIL's limits, over ours; refused from the header (there is no pixel data to decode)
    with pytest.raises(ImageError, match=r"image bytes: image is 8000x9000 = 72,000,000 pixels, more than"):
        load_image(png_header_only(8000, 9000))
    with pytest.raises(ImageError, match=r"chelsea.png: image is 451x300 = 135,300 pixels, more than the limit of 1,"):
        load_image(PHOTOS / "chelsea.png", max_pixels=1000)
    with pytest.raises(ImageError, match="PIL image: image is 451x300"):
        load_image(photo("chelsea"), max_pixels=1000)


@pytest.mark.parametrize("lenient", [False, True], ids=["pil-default", "someone-set-LOAD_TRUNCATED_IMAGES"])
def test_load_image_refuses_truncated_files(tmp_path, monkeypatch, lenient):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient)  # as another library might
    png = (PHOTOS / "chelsea.png").read_bytes()
    for name, data in [("half.png", png[:len(png) // 2]), ("no-iend.png", png[:-12]),
                       ("half.jpg", jpeg_bytes()[:len(jpeg_bytes()) // 2])]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageError, match=f"{name}: image data is truncated or corrupt") as err:
            load_image(path)
        assert "re-download or re-export" in str(err.value)
        with pytest.raises(ImageError, match="image bytes: image data is truncated"):
            load_image(data)


def test_load_image_refuses_what_is_not_an_image(tmp_path, pil_globals):
    text = tmp_path / "notes.txt"
    text.write_text("a caption, not an image\n")
    with pytest.raises(ImageError, match="notes.txt: not an image that PIL can read") as err:
        load_image(text)
    assert "pass a PNG, JPEG" in str(err.value)
    with pytest.raises(ImageError, match="image bytes: not an image"):
        load_image(b"\x89PNG\r\n\x1a\n\x00")  # a header cut short
    with pytest.raises(ImageError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="cannot read the file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="PIL image: image is 0x5, it has no pixels"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(TypeError, match="not int"):
        load_image(3)  # type: ignore[arg-type]
