"""The LLaVA-NeXT repository's conversation templates (qwen_1_5 / qwen_2 / qwen_2_5, llava_llama_3).

Expected prompts come from the original's rules applied here: the CHATML branch of
``Conversation.get_prompt()`` (LLaVA-VL/LLaVA-NeXT ``llava/conversation.py``) written out in this file, and
for LLAMA_3 Meta's Llama-3-Instruct chat template (``fixtures/templates``) rendered by Jinja as
``apply_chat_template(..., add_generation_prompt=True)`` does. Token ids use the real Qwen2 and Llama-3
vocabularies (``tests/bpe_tokenizers.py``); special ids are read from the GGUF token lists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlmkit.errors import TemplateError
from vlmkit.runtime import templates
from vlmkit.runtime.templates import TEMPLATES, render, with_image
from vlmkit.runtime.tokens import tokenizer_image_token
from vlmkit.runtime.vocab import open_vocab

from .test_templates import jinja_render, to_transformers

META_LLAMA_3 = (Path(__file__).parent.parent / "fixtures" / "templates" / "meta-llama-3-8b-instruct.jinja").read_text()
# System texts copied from llava/conversation.py (conv_qwen, conv_qwen_2_5, conv_llava_llama_3)
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant."
QWEN_2_5_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
LLAMA_3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")

CONVERSATIONS = {
    "single": [("user", with_image("What is shown?")), ("assistant", None)],
    "multi": [("user", with_image("q1")), ("assistant", "a1"), ("user", "q2"), ("assistant", None)],
    "answered": [("user", with_image("q1")), ("assistant", "a1")],
    "spaces": [("user", with_image("  q1 \n")), ("assistant", "\n a1  "), ("user", " q2"), ("assistant", None)],
    "two-images": [("user", with_image("compare", 2)), ("assistant", "same"), ("user", "sure?"), ("assistant", None)],
}


def chatml_prompt(system: str, messages) -> str:
    """The CHATML branch of the original get_prompt(), roles ("<|im_start|>user", "<|im_start|>assistant")."""
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    sep = "<|im_end|>"
    ret = "" if system == "" else system + sep + "\n"
    for role, message in messages:
        ret += roles[role] + "\n" + message + sep + "\n" if message else roles[role] + "\n"
    return ret


def llama_3_prompt(system: str, messages) -> str:
    """The LLAMA_3 branch: Meta's template over [system] + the non-empty messages, generation prompt on."""
    chat = [{"role": "system", "content": system}] + [{"role": r, "content": m} for r, m in messages if m]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    return env.from_string(META_LLAMA_3).render(messages=chat, bos_token="<|begin_of_text|>",
                                                add_generation_prompt=True)


def test_qwen_prompt_is_the_chatml_of_the_original():
    # the string transformers' convert_llava_onevision_weights_to_hf.py hard-codes for its check
    assert render("qwen_1_5", CONVERSATIONS["single"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is shown?"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert TEMPLATES["qwen_2"] is TEMPLATES["qwen_1_5"]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("name,system", [("qwen_1_5", QWEN_SYSTEM), ("qwen_2", QWEN_SYSTEM),
                                         ("qwen_2_5", QWEN_2_5_SYSTEM)])
def test_qwen_render_equals_the_original(name, system, conv):
    assert render(name, CONVERSATIONS[conv]) == chatml_prompt(system, CONVERSATIONS[conv])


def test_qwen_empty_system_drops_the_system_block():
    messages = [("system", ""), ("user", "q"), ("assistant", None)]
    assert render("qwen_1_5", messages) == chatml_prompt("", messages[1:])
    assert render("qwen_1_5", [("system", "Be brief.")] + messages[1:]) == chatml_prompt(
        "<|im_start|>system\nBe brief.", messages[1:])


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_llava_llama_3_render_equals_metas_template(conv):
    text = render("llava_llama_3", CONVERSATIONS[conv])
    assert text == llama_3_prompt(LLAMA_3_SYSTEM, CONVERSATIONS[conv])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    # get_prompt always asks for the generation prompt: an answered conversation still opens a turn
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llava_llama_3_system_message_is_trimmed_and_always_written():
    messages = [("user", "q"), ("assistant", None)]
    assert render("llava_llama_3", [("system", " Be brief.\n")] + messages) == llama_3_prompt(" Be brief.\n", messages)
    assert render("llava_llama_3", [("system", "")] + messages) == llama_3_prompt("", messages)


@pytest.mark.parametrize("name", ["qwen_1_5", "qwen_2_5", "llava_llama_3"])
@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_converted_chat_template_renders_the_same_text(name, conv):
    """The Jinja template a converted folder carries gives the original's prompt (byte-level BPE tokenizers
    need no "<image> \\n" fix: the template is asked for the legacy layout)."""
    messages = CONVERSATIONS[conv]
    hf_messages, gen = to_transformers(messages)
    assert jinja_render(name, True, hf_messages, gen) == render(name, messages)
    system = [{"role": "system", "content": " Be brief. "}]
    assert jinja_render(name, True, system + hf_messages, gen) == render(name, [("system", " Be brief. ")] + messages)


# ------------------------------------------------------------------------ ids with the real vocabularies
@pytest.fixture(scope="module")
def vocabs(bpe_vocabs):
    return bpe_vocabs  # (folders, ids): tests/conftest.py builds them once per run


def test_llava_llama_3_inference_ids_start_with_two_bos(vocabs):
    """mm_utils.tokenizer_image_token encodes each chunk WITH special tokens: Llama 3's post-processor adds
    <|begin_of_text|> before the one the template wrote; offset=1 keeps the first of chunk 0 and drops the first
    of every chunk. So the original's inference ids start with two BOS."""
    from tokenizers import Tokenizer

    folders, ids = vocabs
    prompt = render("llava_llama_3", CONVERSATIONS["single"])
    raw = Tokenizer.from_file(str(folders["llama-bpe"] / "tokenizer.json"))
    chunks = [raw.encode(chunk).ids for chunk in prompt.split("<image>")]
    bos = ids["llama-bpe"]["<|begin_of_text|>"]
    assert chunks[0][:2] == [bos, bos]
    expected = chunks[0][:1] + chunks[0][1:] + [-200] + chunks[1][1:]
    got = tokenizer_image_token(prompt, open_vocab(folders["llama-bpe"]))
    assert got == expected
    assert got[:3] == [bos, bos, ids["llama-bpe"]["<|start_header_id|>"]] and got.count(bos) == 2


def test_qwen_inference_ids_have_no_bos(vocabs):
    folders, ids = vocabs
    got = tokenizer_image_token(render("qwen_1_5", CONVERSATIONS["single"]), open_vocab(folders["qwen2"]))
    assert got[0] == ids["qwen2"]["<|im_start|>"] and ids["qwen2"]["<|endoftext|>"] not in got
    assert got.count(-200) == 1


@pytest.mark.parametrize("name,tokenizer", [("qwen_1_5", "qwen2"), ("llava_llama_3", "llama-bpe")])
def test_converted_chat_template_ids_equal_the_originals(vocabs, name, tokenizer):
    """A converted folder: its tokenizer with <image> as a special token, the chat template's text tokenised in
    one call (special tokens added) -- the same ids as the original, both BOS of llava_llama_3 included."""
    from tokenizers import AddedToken, Tokenizer

    folders, _ = vocabs
    converted = Tokenizer.from_file(str(folders[tokenizer] / "tokenizer.json"))
    converted.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    image = converted.token_to_id("<image>")
    for conv in ("single", "multi", "two-images", "spaces"):
        messages = CONVERSATIONS[conv]
        hf_messages, gen = to_transformers(messages)
        got = [-200 if i == image else i for i in converted.encode(jinja_render(name, True, hf_messages, gen)).ids]
        assert got == tokenizer_image_token(render(name, messages), open_vocab(folders[tokenizer])), conv


def test_stop_ids(vocabs):
    folders, ids = vocabs
    llama, qwen = open_vocab(folders["llama-bpe"]), open_vocab(folders["qwen2"])
    assert ids["llama-bpe"]["<|eot_id|>"] == 128009 and 128009 in templates.stop_ids("llava_llama_3", llama)
    # the tokenizer's EOS stays
    assert ids["llama-bpe"]["<|end_of_text|>"] in templates.stop_ids("llava_llama_3", llama)
    assert ids["qwen2"]["<|im_end|>"] in templates.stop_ids("qwen_1_5", qwen)
    assert ids["qwen2"]["<|endoftext|>"] in templates.stop_ids("qwen_2_5", qwen)
    with pytest.raises(TemplateError, match=r"'<\|im_end\|>'.*does not have"):
        templates.stop_ids("qwen_1_5", llama)
