"""vlmkit.load / chat / stream / generate on original and converted LLaVA models."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from PIL import Image

import vlmkit
from vlmkit.errors import ImageError, VlmkitError
from vlmkit.runtime.generation import ContextError

from ..conftest import run_cli

PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"
CAT, ROCKET, COFFEE = PHOTOS / "chelsea.png", PHOTOS / "rocket.png", PHOTOS / "coffee.png"
GREEDY = dict(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
def loaded(models):
    return {name: vlmkit.load(models[name], vision_tower=str(models["clip"]) if name == "next" else None)
            for name in ("v15", "v15-hf", "next", "next-hf")}


def ask(text, image=CAT):
    return [{"role": "user", "content": text, "images": [image]}]


@contextlib.contextmanager
def positions_read(model):
    """The number of positions each forward pass of the language model reads, while inside."""
    computed: list[int] = []
    forward = model.backend.forward

    def counting(embeds, *args):
        computed.append(embeds.shape[1])
        return forward(embeds, *args)

    model.backend.forward = counting
    try:
        yield computed
    finally:
        model.backend.forward = forward


@pytest.mark.parametrize("family", ["v15", "next"])
def test_original_and_converted_give_the_same_greedy_tokens(loaded, family):
    original = loaded[family].chat(ask("What is shown in this image?"), **GREEDY)
    converted = loaded[f"{family}-hf"].chat(ask("What is shown in this image?"), **GREEDY)
    assert original.tokens == converted.tokens and len(original.tokens) == 8
    assert original.prompt_tokens == converted.prompt_tokens and original.image_tokens > 0
    assert original.text == converted.text


def test_templates_are_the_checkpoints(loaded):
    assert loaded["v15"].template == "llava_v1" and loaded["v15-hf"].template == "llava_v1"
    assert loaded["next"].template == "mistral_instruct" and loaded["next-hf"].template == "mistral_instruct"


def test_a_paused_stream_leaves_the_callers_grad_mode_alone(loaded):
    import torch

    stream = loaded["v15-hf"].stream(ask("Describe it."), max_new_tokens=4, temperature=0)
    next(stream)
    assert torch.is_grad_enabled()  # between tokens the caller may train, or compute anything else
    list(stream)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", ["v15", "next-hf"])
def test_streaming_yields_the_same_text(loaded, name):
    model = loaded[name]
    pieces = list(model.stream(ask("Describe it."), max_new_tokens=12, temperature=0))
    assert len(pieces) > 1 and "".join(pieces) == model.chat(ask("Describe it."), max_new_tokens=12, temperature=0).text


@pytest.mark.parametrize("name", ["v15", "v15-hf", "next-hf"])
def test_second_turn_reuses_the_cache_and_equals_a_cold_run(models, loaded, name):
    model = loaded[name]
    first = model.chat(ask("What is this?"), **GREEDY)
    follow_up = ask("What is this?") + [{"role": "assistant", "content": first.text},
                                        {"role": "user", "content": "And its colours?"}]
    with positions_read(model) as computed:
        warm = model.chat(follow_up, **GREEDY)
    cold = vlmkit.load(models[name], vision_tower=str(models["clip"]) if name == "next" else None).chat(follow_up, **GREEDY)
    assert warm.tokens == cold.tokens
    assert computed[0] < warm.prompt_tokens - warm.image_tokens  # neither the image nor the first turn re-read


@pytest.mark.parametrize("name", ["v15", "next-hf"])
def test_batched_equals_one_by_one(loaded, name):
    model = loaded[name]
    conversations = [ask("What is this?"), ask("Which colours do you see here?", ROCKET), ask("Describe.", COFFEE)]
    batch = model.generate(conversations, **GREEDY)
    single = [model.chat(c, **GREEDY) for c in conversations]
    assert [b.tokens for b in batch] == [s.tokens for s in single]


def test_sampling_is_reproducible_with_a_seed(loaded):
    model = loaded["v15-hf"]
    a = model.chat(ask("Tell a story."), temperature=0.9, top_p=0.9, seed=7, max_new_tokens=16)
    b = model.chat(ask("Tell a story."), temperature=0.9, top_p=0.9, seed=7, max_new_tokens=16)
    c = model.chat(ask("Tell a story."), temperature=0.9, top_p=0.9, seed=8, max_new_tokens=16)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_strings_cut_the_answer(loaded):
    model = loaded["v15"]
    full = model.chat(ask("What is this?"), max_new_tokens=12, temperature=0).text
    stop = full[4:7]
    cut = model.chat(ask("What is this?"), max_new_tokens=12, temperature=0, stop=[stop])
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_images_as_bytes_and_pil_are_the_same_image(loaded):
    model = loaded["v15-hf"]
    by_path = model.chat(ask("What?"), **GREEDY).tokens
    assert model.chat(ask("What?", CAT.read_bytes()), **GREEDY).tokens == by_path
    assert model.chat(ask("What?", Image.open(CAT).convert("RGB")), **GREEDY).tokens == by_path


# ------------------------------------------------------------------------- bad inputs


def test_unreadable_truncated_and_oversized_images(loaded, tmp_path):
    model = loaded["v15"]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png"):
        model.chat(ask("?", text))
    cut = tmp_path / "cut.png"
    cut.write_bytes(CAT.read_bytes()[:5000])
    with pytest.raises(ImageError, match="cut.png"):
        model.chat(ask("?", cut))
    big = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(big, format="PNG")
    model.backend.image_max_pixels = 1000 * 1000
    try:
        with pytest.raises(ImageError, match="pixel"):
            model.chat(ask("?", big.getvalue()))
    finally:
        from vlmkit.runtime.images import DEFAULT_MAX_PIXELS

        model.backend.image_max_pixels = DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("name", ["v15", "v15-hf"])
def test_placeholders_and_images_must_agree(loaded, name):
    model = loaded[name]
    with pytest.raises(VlmkitError, match="2 image placeholder"):
        model.chat([{"role": "user", "content": "<image>\nWhat?", "images": [CAT]}])
    with pytest.raises(VlmkitError, match="1 image placeholder.* but 0 image"):
        model.chat([{"role": "user", "content": "<image>\nWhat?"}])


def test_prompt_longer_than_the_context(loaded):
    with pytest.raises(ContextError, match="exceeds the model's context of 4096"):
        loaded["v15"].chat(ask("word " * 5000), max_new_tokens=4)


def test_malformed_messages(loaded):
    model = loaded["v15"]
    with pytest.raises(VlmkitError, match="role 'robot' is unknown"):
        model.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(VlmkitError, match="last message must be the user's"):
        model.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


# ------------------------------------------------------------------------------- CLI


def test_cli_chat_one_answer(models, capsys):
    r = run_cli("chat", models["v15-hf"], "--image", CAT, "--prompt", "What is this?", "--temperature", "0",
                "--max-new-tokens", "8")
    assert r.code == 0
    expected = vlmkit.load(models["v15"]).chat(ask("What is this?"), **GREEDY).text
    assert r.out.strip() == expected.strip()


def test_cli_chat_interactive(models, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this?\nAnd then?\n\n"))
    r = run_cli("chat", models["v15"], "--image", CAT, "--temperature", "0", "--max-new-tokens", "4")
    assert r.code == 0 and r.out.count("ASSISTANT: ") == 2


def test_questions_about_an_image_already_read_share_its_positions(models, loaded):
    model = loaded["v15-hf"]
    model.generate([ask("What is this?")], **GREEDY)  # the image is read (and kept) once
    conversations = [ask("Which colours do you see here?"), ask("Describe.", ROCKET)]
    with positions_read(model) as computed:
        warm = model.generate(conversations, **GREEDY)
    cold = vlmkit.load(models["v15-hf"]).generate(conversations, **GREEDY)
    assert [w.tokens for w in warm] == [c.tokens for c in cold]
    # the cat's prompt reads only the words after the image; the rocket's shares the system prompt, not the image
    assert computed[0] < warm[0].prompt_tokens - warm[0].image_tokens
    assert warm[1].image_tokens < computed[1] < warm[1].prompt_tokens


@pytest.mark.parametrize("temperature, top_p", [(5e-324, 1.0), (1.0, 5e-324), (1e-45, 1e-45)])
def test_vanishing_temperature_or_top_p_picks_the_greedy_token(temperature, top_p):
    # Values the server's schema accepts (temperature >= 0, top_p > 0) that vanish in float32: found by
    # schemathesis as a 500 ("probability tensor contains either inf, nan or element < 0").
    import torch

    from vlmkit.runtime.generation import SamplingParams, pick

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [7.0, 1.0, 6.5, -2.0]])
    params = SamplingParams(temperature=temperature, top_p=top_p)
    for seed in range(5):
        picked = pick(logits, params, torch.Generator().manual_seed(seed))
        assert picked.tolist() == [1, 0]
