"""Conversation templates: prompts written by hand from the original ``get_prompt()`` rules,
auto-selection, and the Jinja chat template's text and token ids against the original's."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlmkit.errors import TemplateError
from vlmkit.families.llava.templates import choose_template, get_model_name_from_path
from vlmkit.runtime.templates import TEMPLATES, chat_template, get_template, render, with_image
from vlmkit.runtime.tokens import build_converted_tokenizer, tokenizer_image_token
from vlmkit.runtime.vocab import Vocab, open_vocab

TOKENIZERS = Path(__file__).parent.parent / "fixtures" / "tokenizers"
IMAGES = Path(__file__).parent.parent / "fixtures" / "images"

# System prompts copied from llava/conversation.py (not from vlmkit).
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions.")
LLAVA_LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
MPT = ("A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest "
       "answers.")

SINGLE = [("user", "<image>\nWhat is shown in this image?"), ("assistant", None)]
MULTI = [("user", "<image>\nq1"), ("assistant", "a1"), ("user", "q2"), ("assistant", None)]
ANSWERED = [("user", "<image>\nq1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]

# (template, conversation, expected prompt), each written out by hand from get_prompt()'s branch
# for the template's separator style.
EXPECTED = [
    # TWO: system + " ", "ROLE: msg" + [" ", "</s>"][i % 2], open turn "ROLE:"
    ("vicuna_v1", SINGLE, VICUNA + " USER: <image>\nWhat is shown in this image? ASSISTANT:"),
    ("vicuna_v1", MULTI, VICUNA + " USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"),
    ("vicuna_v1", ANSWERED, VICUNA + " USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"),
    ("v1", MULTI, VICUNA + " USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"),
    # the verification prompt of transformers' convert_llava_next_weights_to_hf.py (vicuna models)
    ("llava_v1", SINGLE, "A chat between a curious human and an artificial intelligence assistant. The assistant "
     "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown in this "
     "image? ASSISTANT:"),
    ("llava_v1", MULTI, HUMAN + " USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"),
    ("llava_v1", ANSWERED, HUMAN + " USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"),
    # LLAMA_2: sep + "[INST] msg [/INST]" (system wrapped into the first), " msg " + sep2, then
    # lstrip(sep) removes the leading "<s>"; later user turns keep theirs.
    ("llava_llama_2", SINGLE,
     "[INST] <<SYS>>\n" + LLAVA_LLAMA_2 + "\n<</SYS>>\n\n<image>\nWhat is shown in this image? [/INST]"),
    ("llava_llama_2", MULTI,
     "[INST] <<SYS>>\n" + LLAVA_LLAMA_2 + "\n<</SYS>>\n\n<image>\nq1 [/INST] a1 </s><s>[INST] q2 [/INST]"),
    ("llava_llama_2", ANSWERED,
     "[INST] <<SYS>>\n" + LLAVA_LLAMA_2 + "\n<</SYS>>\n\n<image>\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>"),
    # the mistral verification prompt of the same transformers script
    ("mistral_instruct", SINGLE, "[INST] <image>\nWhat is shown in this image? [/INST]"),
    ("mistral_instruct", MULTI, "[INST] <image>\nq1 [/INST] a1 </s>[INST] q2 [/INST]"),
    ("mistral_instruct", ANSWERED, "[INST] <image>\nq1 [/INST] a1 </s>[INST] q2 [/INST] a2 </s>"),
    # MPT: system + sep, role + msg + sep, open turn = role; no newlines between turns
    ("chatml_direct", SINGLE, "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n"
     "What is shown in this image?<|im_end|><|im_start|>assistant\n"),  # the 34b verification prompt
    ("chatml_direct", MULTI, "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nq1"
     "<|im_end|><|im_start|>assistant\na1<|im_end|><|im_start|>user\nq2<|im_end|><|im_start|>assistant\n"),
    ("mistral_direct", SINGLE, "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n"
     "What is shown in this image?<|im_end|><|im_start|>assistant\n"),
    ("mpt", MULTI, "<|im_start|>system\n" + MPT + "<|im_end|><|im_start|>user\n<image>\nq1<|im_end|>"
     "<|im_start|>assistant\na1<|im_end|><|im_start|>user\nq2<|im_end|><|im_start|>assistant\n"),
    ("mpt", ANSWERED, "<|im_start|>system\n" + MPT + "<|im_end|><|im_start|>user\n<image>\nq1<|im_end|>"
     "<|im_start|>assistant\na1<|im_end|><|im_start|>user\nq2<|im_end|><|im_start|>assistant\na2<|im_end|>"),
    # PLAIN: system (""), then msg + sep per message, open turn ""
    ("plain", SINGLE, "<image>\nWhat is shown in this image?\n"),
    ("v0_plain", [("user", "<image>\n"), ("assistant", None)], "<image>\n\n"),
    # SINGLE: system + "###", "ROLE: msg###", open turn "ROLE:"
    ("llava_v0", SINGLE, HUMAN + "###Human: <image>\nWhat is shown in this image?###Assistant:"),
    ("llava_v0", MULTI, HUMAN + "###Human: <image>\nq1###Assistant: a1###Human: q2###Assistant:"),
    ("llava_v0", ANSWERED, HUMAN + "###Human: <image>\nq1###Assistant: a1###Human: q2###Assistant: a2###"),
    # llama_2: the stock LLaMA-2 system prompt, with its two spaces after "safe."
    ("llama_2", [("user", "hi"), ("assistant", None)],
     "[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
     "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
     "or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a "
     "question does not make any sense, or is not factually coherent, explain why instead of answering something "
     "not correct. If you don't know the answer to a question, please don't share false information.\n<</SYS>>\n\n"
     "hi [/INST]"),
]


@pytest.mark.parametrize("name,messages,expected", EXPECTED, ids=[f"{e[0]}-{len(e[1])}" for e in EXPECTED])
def test_render_matches_hand_written_prompt(name, messages, expected):
    assert render(name, messages) == expected


def test_with_image_places_images_like_the_original_cli():
    assert with_image("What is this?") == "<image>\nWhat is this?"
    assert with_image("q", n_images=2) == "<image>\n<image>\nq"


def test_system_message_replaces_the_system_prompt():
    assert render("llava_v1", [("system", "Be brief."), ("user", "q"), ("assistant", None)]) == \
        "Be brief. USER: q ASSISTANT:"
    assert render("mistral_instruct", [("system", "Be brief."), ("user", "q"), ("assistant", None)]) == \
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nq [/INST]"
    assert render("chatml_direct", [("system", "Be brief."), ("user", "q"), ("assistant", None)]) == \
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nq<|im_end|><|im_start|>assistant\n"
    # an empty system prompt drops LLAMA_2's <<SYS>> block, as wrap_sys does for len 0
    assert render("llava_llama_2", [("system", ""), ("user", "q"), ("assistant", None)]) == "[INST] q [/INST]"


def test_empty_text_is_an_open_turn_as_in_the_original():
    # get_prompt tests "if message:", so "" renders like None
    assert render("vicuna_v1", [("user", "q"), ("assistant", "")]) == VICUNA + " USER: q ASSISTANT:"


def test_templates_table_keeps_the_original_aliases():
    assert TEMPLATES["v1"] is TEMPLATES["vicuna_v1"]
    assert TEMPLATES["mistral_direct"] is TEMPLATES["chatml_direct"]
    assert TEMPLATES["v0_plain"] is TEMPLATES["plain"]
    assert TEMPLATES["llava_v1"].full_system == HUMAN
    assert TEMPLATES["chatml_direct"].full_system == "<|im_start|>system\nAnswer the questions."


@pytest.mark.parametrize("messages,match", [
    ([("assistant", "a"), ("user", "q")], r"message 0 .* has role 'assistant', expected 'user'"),
    ([("user", "q"), ("user", "q2")], r"message 1 .* expected 'assistant'"),
    ([("user", "q"), ("system", "s")], r"message 1 .* has role 'system'"),
])
def test_render_refuses_roles_out_of_order(messages, match):
    with pytest.raises(TemplateError, match=match) as info:
        render("vicuna_v1", messages)
    assert "alternate user/assistant" in info.value.hint


def test_render_refuses_what_the_original_cannot_render():
    with pytest.raises(TemplateError, match="empty first user message"):
        render("llava_llama_2", [("user", None), ("assistant", None)])
    with pytest.raises(TemplateError, match="answered assistant turn") as info:
        render("plain", [("user", "<image>\n"), ("assistant", "a caption")])
    assert "prompt-only" in info.value.hint
    with pytest.raises(TemplateError, match="unknown conversation template 'vicuna'") as info:
        get_template("vicuna")
    assert "vicuna_v1" in info.value.hint


@pytest.mark.parametrize("model_name,expected", [
    ("llava-v1.5-7b", "llava_v1"),
    ("llava-v1.5-13b-lora", "llava_v1"),
    ("llava-v1.6-vicuna-13b", "llava_v1"),
    ("llava-v1.6-mistral-7b", "mistral_instruct"),
    ("llava-v1.6-34b", "chatml_direct"),
    ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
    ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
    ("llava-13b-delta-v0", "llava_v0"),
    ("my-model", "llava_v0"),
    # the order decides when several match: llama-2 > mistral > v1.6-34b > v1 > mpt
    ("llama-2-mistral-v1", "llava_llama_2"),
    ("mistral-v1.6-34b", "mistral_instruct"),
    ("v1.6-34b-mpt", "chatml_direct"),
    ("mpt-v1", "llava_v1"),
])
def test_choose_template_follows_the_original_order(model_name, expected):
    assert choose_template(model_name) == expected


@pytest.mark.parametrize("path,expected", [
    ("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"),
    ("/models/llava-v1.6-34b/", "llava-v1.6-34b"),
    ("./checkpoints/llava-v1.5-7b-lora/checkpoint-5000", "llava-v1.5-7b-lora_checkpoint-5000"),
    ("checkpoint-5000", "checkpoint-5000"),  # the original would raise IndexError here
])
def test_get_model_name_from_path(path, expected):
    assert get_model_name_from_path(path) == expected


# ------------------------------------------------------------------------------ Jinja template
def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def jinja_render(name: str, legacy: bool, messages: list[dict], add_generation_prompt: bool) -> str:
    # the environment transformers renders chat templates with
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(chat_template(name, legacy_tokenizer=legacy)).render(
        messages=messages, add_generation_prompt=add_generation_prompt, raise_exception=_raise)


def to_transformers(messages):
    """(role, text) pairs -> transformers messages; leading "<image>\\n"s become image items."""
    out = []
    for role, text in messages:
        if text is None:
            continue
        items = []
        while role == "user" and text.startswith("<image>\n"):
            items.append({"type": "image"})
            text = text[len("<image>\n"):]
        out.append({"role": role, "content": items + [{"type": "text", "text": text}] if items else text})
    return out, messages[-1][1] is None


CONVERSATIONS = {
    "single": SINGLE,
    "multi": MULTI,
    "answered": ANSWERED,
    "two-images": [("user", with_image("compare", 2)), ("assistant", "same"), ("user", "sure?"), ("assistant", None)],
    "system": [("system", "Be brief."), ("user", with_image("q1")), ("assistant", "a1"), ("user", "q2"),
               ("assistant", None)],
}
ALL_TEMPLATES = ["vicuna_v1", "llava_v1", "llava_llama_2", "llama_2", "mistral_instruct", "chatml_direct", "mpt",
                 "plain", "llava_v0"]


def cases(names):
    """(template, conversation) pairs; plain is prompt-only, so it gets the single turn alone."""
    return [(name, conv) for name in names for conv in CONVERSATIONS if name != "plain" or conv == "single"]


@pytest.mark.parametrize("name,conv", cases(ALL_TEMPLATES))
def test_jinja_text_equals_render(name, conv):
    messages = CONVERSATIONS[conv]
    hf_messages, gen = to_transformers(messages)
    expected = render(name, messages)
    assert jinja_render(name, True, hf_messages, gen) == expected
    # non-legacy tokenizers need a space after each <image> (see templates.IMAGE_TEXT)
    assert jinja_render(name, False, hf_messages, gen) == expected.replace("<image>\n", "<image> \n")


def test_jinja_accepts_string_content_and_list_system_content():
    list_form, _ = to_transformers(MULTI)
    string_form = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + [
        {"role": m[0], "content": m[1]} for m in MULTI[:-1]]
    for legacy in (True, False):
        assert jinja_render("llava_v1", legacy, string_form, True) == jinja_render(
            "llava_v1", legacy, [{"role": "system", "content": "Be brief."}] + list_form, True)


def test_jinja_refuses_what_render_refuses():
    with pytest.raises(jinja2.exceptions.TemplateError, match="prompt-only"):
        jinja_render("plain", True, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="first user message must not be empty"):
        jinja_render("mistral_instruct", True, [{"role": "user", "content": ""}], True)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
        jinja_render("vicuna_v1", True, [{"role": "tool", "content": "x"}], True)


# --------------------------------------------------------------- token ids against the original
@pytest.fixture(scope="module")
def tokenizers():
    """name -> (original tokenizer, converted tokenizer, legacy flag), as each release ships it."""
    out = {}
    for name in ("llama-spm", "mistral-spm"):
        original = open_vocab(TOKENIZERS / name)
        out[name] = (original, build_converted_tokenizer(TOKENIZERS / name, legacy=original.legacy), original.legacy)
    return out


def original_ids(original: Vocab, prompt: str, image_id: int) -> list[int]:
    ids = tokenizer_image_token(prompt, original)
    return [image_id if i == -200 else i for i in ids]


# The templates each tokenizer is used with (llava-v1.5 / v1.6-vicuna / llama-2 / pretraining
# checkpoints ship llama-spm with legacy=false; v1.6-mistral ships mistral-spm with legacy=true),
# plus the ChatML ones on both, which exercises the same rules on other text.
PAIRS = [("llama-spm", *case) for case in cases(["vicuna_v1", "llava_v1", "llava_llama_2", "llama_2", "plain",
                                                   "llava_v0", "chatml_direct"])] + [
    ("mistral-spm", *case) for case in cases(["mistral_instruct", "chatml_direct", "mpt"])]


@pytest.mark.parametrize("tokenizer,name,conv", PAIRS)
def test_chat_template_ids_equal_original_ids(tokenizers, tokenizer, name, conv):
    messages = CONVERSATIONS[conv]
    original, converted, legacy = tokenizers[tokenizer]
    image_id = converted.convert_tokens_to_ids("<image>")
    hf_messages, gen = to_transformers(messages)
    text = jinja_render(name, legacy, hf_messages, gen)
    # one call, BOS from the tokenizer: what LlavaProcessor does with a prompt that has no BOS
    assert converted(text).input_ids == original_ids(original, render(name, messages), image_id)


def test_non_legacy_needs_the_space_after_image(tokenizers):
    """Control: the legacy layout "<image>\\n" on the non-legacy tokenizer loses the original's "▁"."""
    original, converted, _ = tokenizers["llama-spm"]
    hf_messages, gen = to_transformers(SINGLE)
    expected = original_ids(original, render("llava_v1", SINGLE), 32000)
    got = converted(jinja_render("llava_v1", True, hf_messages, gen)).input_ids
    assert expected[expected.index(32000):][:3] == [32000, 29871, 13]  # -200, "▁", "\n" in the original
    assert got[got.index(32000):][:2] == [32000, 13]
    assert converted(jinja_render("llava_v1", False, hf_messages, gen)).input_ids == expected


def test_through_transformers_apply_chat_template_and_llava_processor(tokenizers):
    """End to end: the tokenizer's own apply_chat_template, then LlavaProcessor with a real image."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    original, converted, legacy = tokenizers["llama-spm"]
    template = chat_template("llava_v1", legacy_tokenizer=legacy)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    converted.chat_template = template
    try:
        text = converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    finally:
        converted.chat_template = None
    assert text == render("llava_v1", [("user", with_image("What is shown?")), ("assistant", None)]).replace(
        "<image>\n", "<image> \n")

    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                                  crop_size={"height": 336, "width": 336}),
                               tokenizer=converted, chat_template=template, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image = Image.open(IMAGES / "chelsea.png").convert("RGB")
    ids = list(processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                         images=image)["input_ids"][0])
    assert ids.count(32000) == 24 * 24  # the processor expands <image> to one token per patch
    collapsed = [t for i, t in enumerate(ids) if not (t == 32000 and i and ids[i - 1] == 32000)]
    assert collapsed == original_ids(original, render("llava_v1", [("user", with_image("What is shown?")),
                                                                  ("assistant", None)]), 32000)
