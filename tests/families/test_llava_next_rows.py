"""LLaVA-NeXT-repository checkpoints with Qwen and Llama 3 language models (backbone rows ``qwen2``, ``llama3``).

Tiny checkpoints in the layouts of ``lmms-lab/llava-next-72b`` (Qwen1.5 + CLIP-L/336, anyres, spatial_unpad) and
``lmms-lab/llama3-llava-next-8b`` (Llama 3 + CLIP, anyres), with the real vocabularies. What the tests expect is
derived here, from the original code's algorithms written out (LLaVA-NeXT ``mm_utils.tokenizer_image_token``,
``conversation.py``'s prompts, ``train.py``'s ``preprocess_qwen``) on tokenizers rebuilt independently from
llama.cpp's vocab-only GGUF files (``tests/bpe_tokenizers.py``), never from vlmkit's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmkit.families.llava import backbones, tiny

from ..bpe_tokenizers import vocab_vectors
from ..conftest import run_cli

IMAGES = Path(__file__).resolve().parents[1] / "fixtures" / "images"
QUESTION = "What is shown in this image?"
# conversation.py conv_qwen ("qwen_1_5"), CHATML renderer
QWEN_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
               f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
# conv_llava_llama_3: Meta's Llama-3-Instruct chat template applied to the messages (it writes the BOS string)
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
LLAMA3_PROMPT = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>"
                 f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{QUESTION}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
META_LLAMA_3 = Path(__file__).resolve().parents[1] / "fixtures" / "templates" / "meta-llama-3-8b-instruct.jinja"
# row -> (llama.cpp vocabulary fixture, prompt, BOS id of the release tokenizer, GGUF architecture and pre-tokenizer)
RELEASES = {"qwen2": ("qwen2", QWEN_PROMPT, None, "qwen2", "qwen2"),
            "llama3": ("llama-bpe", LLAMA3_PROMPT, 128000, "llama", "llama-bpe")}


def original_ids(tok, prompt: str, bos: int | None) -> list[int]:
    """LLaVA-NeXT ``tokenizer_image_token``: each chunk tokenised with special tokens; a leading BOS kept once."""
    chunks = [tok.encode(c).ids for c in prompt.split("<image>")]
    offset = 1 if bos is not None and chunks[0] and chunks[0][0] == bos else 0
    ids = [chunks[0][0]] if offset else []
    separated = [chunks[0]]
    for chunk in chunks[1:]:  # insert_separator(chunks, [-200] * (offset + 1))
        separated += [[-200] * (offset + 1), chunk]
    for x in separated:
        ids.extend(x[offset:])
    return ids


@pytest.fixture(scope="module")
def independent(bpe_vocabs):
    """Tokenizers rebuilt from llama.cpp's GGUF vocabularies by the test helper (not by vlmkit)."""
    from tokenizers import Tokenizer

    folders, _ = bpe_vocabs
    return {row: Tokenizer.from_file(str(folders[name] / "tokenizer.json")) for row, (name, *_) in RELEASES.items()}


@pytest.fixture(scope="module")
def built(tiny_llava):
    """Each release (the registry's tiny row, built once per run), converted to transformers (``vlmkit convert``)."""
    return {row: (tiny_llava(row)["path"], tiny_llava(row).converted()) for row in RELEASES}


def test_the_tiny_releases_carry_the_real_vocabularies(built):
    """The tokenizer folders the tiny checkpoints ship tokenise llama.cpp's test vectors as the releases do."""
    from tokenizers import Tokenizer

    for row, (name, *_) in RELEASES.items():
        tok = Tokenizer.from_file(str(built[row][0] / "tokenizer.json"))
        for text, ids in vocab_vectors(name):
            assert tok.encode(text, add_special_tokens=False).ids == ids, (row, text)
        assert not (built[row][0] / "tokenizer.model").exists()


def test_backbone_of_tells_llama3_from_llama_by_the_tokenizer(built, tmp_path):
    """llama3-llava-next shares LlavaLlamaForCausalLM / llava_llama with LLaVA-1.5: only the tokenizer differs."""
    original = built["llama3"][0]
    config = json.loads((original / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert backbones.backbone_of(config, original).name == "llama3"
    spm = tmp_path / "vicuna"  # the same config beside a SentencePiece tokenizer.model: LLaVA-1.5's LLaMA
    spm.mkdir()
    tiny.copy_tokenizer(spm, "llama")
    assert backbones.backbone_of(config, spm).name == "llama"
    qwen = json.loads((built["qwen2"][0] / "config.json").read_text())
    assert backbones.backbone_of(qwen, built["qwen2"][0]).name == "qwen2"


@pytest.mark.parametrize("row", list(RELEASES))
def test_prompt_ids_are_the_originals_on_both_sides(row, built, independent):
    """The original's ids (reference) and the converted folder's (its chat template + tokenizer) equal the ids the
    original algorithm gives on the real vocabulary; Llama 3's start with two <|begin_of_text|> (chunk 0 gets the
    post-processor's BOS before the template's BOS string, and tokenizer_image_token keeps both)."""
    from transformers import AutoProcessor

    from vlmkit.runtime import templates
    from vlmkit.runtime.tokens import tokenizer_image_token
    from vlmkit.runtime.vocab import open_vocab

    _, prompt, bos, *_ = RELEASES[row]
    original, converted = built[row]
    expected = original_ids(independent[row], prompt, bos)
    if bos is not None:
        assert expected[:2] == [bos, bos]
    if row == "llama3":  # the literal prompt is what Meta's chat template renders
        import jinja2

        meta = jinja2.Environment().from_string(META_LLAMA_3.read_text()).render(
            messages=[{"role": "system", "content": LLAMA3_SYSTEM}, {"role": "user", "content": f"<image>\n{QUESTION}"}],
            bos_token="<|begin_of_text|>", add_generation_prompt=True)
        assert meta == prompt
    template = backbones.ROWS[row].default_template
    rendered = templates.render(template, [("user", templates.with_image(QUESTION)), ("assistant", None)])
    assert rendered == prompt
    assert tokenizer_image_token(rendered, open_vocab(original)) == expected

    processor = AutoProcessor.from_pretrained(converted)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image_id = json.loads((converted / "config.json").read_text())["image_token_index"]
    ids = [-200 if i == image_id else i for i in processor.tokenizer(text).input_ids]
    assert ids == expected


@pytest.mark.parametrize("row", list(RELEASES))
def test_convert_and_verify_pass(row, built, tmp_path):
    """LlavaNextForConditionalGeneration with the Qwen2 / Llama text config; verify PASS at float32."""
    original, converted = built[row]
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["text_config"]["model_type"] == backbones.ROWS[row].hf_model_type
    if row == "qwen2":
        # Qwen's rows are padded past its 151,646 tokens: <image> takes the first spare one, nothing is resized
        # (transformers' convert_llava_next_weights_to_hf.py for lmms-lab/llava-next-72b / 110b)
        assert (config["image_token_index"], config["text_config"]["vocab_size"]) == (151646, 151936)
    report = tmp_path / "report.json"
    result = run_cli("verify", original, converted, "--json", report)
    assert result.code == 0, result.out + result.err
    checks = {c["name"]: c["passed"] for c in json.loads(report.read_text())["checks"]}
    assert checks == {"pixel values": True, "input ids": True, "logits": True, "greedy tokens": True,
                      "batched generation": True}


@pytest.mark.parametrize("row", list(RELEASES))
def test_chat_gives_the_originals_greedy_answer(row, built):
    """`vlmkit chat` on the original (the reference) and on the conversion: the same greedy answer."""
    answers = []
    for model in built[row]:
        result = run_cli("chat", model, "--image", IMAGES / "chelsea.png", "--prompt", QUESTION,
                         "--max-new-tokens", "6", "--temperature", "0")
        assert result.code == 0, result.err
        answers.append(result.out.strip())
    assert answers[0] and answers[0] == answers[1]


def test_lora_fine_tune_of_the_qwen_release(tmp_path):
    """adapter_config.json + non_lora_trainables.bin (projector and image_newline) beside a bfloat16 Qwen base,
    as LLaVA-NeXT's builder loads it with --model-base: convert and verify PASS at float32."""
    clip = tiny.make_clip(tmp_path / "clip-vit-tiny-patch14")
    base = tiny.make_base_llm(tmp_path / "Qwen1.5-tiny-chat", backbone="qwen2", dtype=torch.bfloat16)
    lora = tiny.make_lora(tmp_path / "llava-next-qwen-tiny-lora", base, clip, backbone="qwen2", next_=True)
    converted = tmp_path / "hf"
    assert run_cli("convert", lora, converted, "--model-base", base, "--dtype", "float32", "--quiet").code == 0
    report = tmp_path / "report.json"
    result = run_cli("verify", lora, converted, "--model-base", base, "--json", report)
    assert result.code == 0, result.out + result.err
    assert all(c["passed"] for c in json.loads(report.read_text())["checks"])


@pytest.mark.parametrize("row", list(RELEASES))
def test_gguf_language_model_loads_in_llama_cpp_and_tokenises_as_the_original(row, built, independent, tmp_path):
    """--to gguf writes the Qwen2 / Llama 3 language model with a gpt2 vocabulary that llama.cpp loads and
    tokenises as the original tokenizer does; the mmproj of the anyres checkpoint is written as for LLaVA-1.6."""
    import llama_cpp

    name, prompt, bos, arch, pre = RELEASES[row]
    out = tmp_path / "gguf"
    result = run_cli("convert", built[row][0], out, "--to", "gguf", "--dtype", "f32", "--quiet")
    assert result.code == 0, result.err
    model = next(f for f in out.glob("*.gguf") if not f.name.startswith("mmproj-"))
    assert any(f.name.startswith("mmproj-") for f in out.glob("*.gguf"))
    llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    try:
        meta = llm.metadata
        assert (meta["general.architecture"], meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == \
            (arch, "gpt2", pre)
        for chunk in prompt.split("<image>"):
            want = independent[row].encode(chunk).ids
            assert llm.tokenize(chunk.encode(), add_bos=True, special=True) == want, chunk
        for text, ids in vocab_vectors(name)[:20]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
    finally:
        llm.close()


def test_data_tokenize_with_the_qwen_release(built, tmp_path, independent):
    """`vlmkit data tokenize --model <llava-next-qwen>`: qwen_1_5 ids and labels as preprocess_qwen gives them."""
    records = [{"id": "a", "image": "chelsea.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat, sitting!"},
        {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Orange."}]}]
    data, out = tmp_path / "data.json", tmp_path / "out.jsonl"
    data.write_text(json.dumps(records))
    result = run_cli("data", "tokenize", data, "--model", built["qwen2"][0], "--out", out,
                     "--image-folder", IMAGES)
    assert result.code == 0, result.err
    got = json.loads(out.read_text().splitlines()[0])

    # preprocess_qwen: <image> added as a special token (then -200); system + each turn through a system-less
    # ChatML; labels IGNORE for system and user turns, the assistant turn whole; then 198 ("\n"), <|im_start|>,
    # <|im_end|> get their labels back everywhere
    from tokenizers import AddedToken

    tok = independent["qwen2"]
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    image = tok.token_to_id("<image>")
    turns = [("system", "You are a helpful assistant.", False), ("user", "<image>\nWhat is shown?", False),
             ("assistant", "A cat, sitting!", True), ("user", "And the colour?", False), ("assistant", "Orange.", True)]
    ids, labels = [], []
    for role, content, trained in turns:
        piece = [-200 if i == image else i for i in tok.encode(f"<|im_start|>{role}\n{content}<|im_end|>\n").ids]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    structure = {198, tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")}
    labels = [i if i in structure else label for i, label in zip(ids, labels)]
    assert got["input_ids"] == ids
    assert got["labels"] == labels
