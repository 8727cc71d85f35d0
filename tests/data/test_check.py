"""`vlmkit data check` on a purpose-built bad dataset: every problem caught and named, --fix, --model."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from vlmkit.data.check import PROBLEMS, check, render
from vlmkit.data.model import load_data_model

from .conftest import IMAGES


def conv(*texts, roles=None):
    roles = roles or [("human", "gpt")[i % 2] for i in range(len(texts))]
    return [{"from": r, "value": t} for r, t in zip(roles, texts)]


GOOD = {"id": "good", "image": "chelsea.png", "conversations": conv("<image>\nWhat is it?", "A cat.")}
BAD = [
    GOOD,
    {"id": "missing", "image": "missing.png", "conversations": conv("<image>\nWhat is it?", "A cat.")},
    {"id": "truncated", "image": "truncated.png", "conversations": conv("<image>\nWhat is it?", "A cat.")},
    {"id": "not-an-image", "image": "notes.png", "conversations": conv("<image>\nWhat is it?", "A note.")},
    {"id": "too-large", "image": "astronaut.png", "conversations": conv("<image>\nWho is it?", "An astronaut.")},
    {"id": "url", "image": "http://example.com/cat.jpg", "conversations": conv("<image>\nWhat?", "A cat.")},
    {"id": "no-placeholder", "image": "coffee.png", "conversations": conv("What is it?", "Coffee.")},
    {"id": "two-placeholders", "image": "coffee.png",
     "conversations": conv("<image>\nWhat is it?", "Coffee.", "<image>\nAnd now?", "Still coffee.")},
    {"id": "human-twice", "conversations": conv("Hi", "Hello?", "Hi", roles=["human", "human", "gpt"])},
    {"id": "gpt-first", "conversations": conv("Welcome!", "Hi", "Hello", roles=["gpt", "human", "gpt"])},
    {"id": "narrator", "conversations": conv("Once upon a time", "Hi", roles=["narrator", "gpt"])},
    {"id": "empty-answer", "image": "coffee.png", "conversations": conv("<image>\nWhat is it?", "  ")},
    {"id": "unanswered", "conversations": conv("Hi", "Hello", "And?")},
    {"id": "image-in-answer", "image": "coffee.png", "conversations": conv("What is it?", "<image>\nCoffee.")},
    {"id": "good", "image": "coffee.png", "conversations": conv("<image>\nWhat is it?", "Coffee.")},
    {"id": "copy", "image": "chelsea.png", "conversations": conv("<image>\nWhat is it?", "A cat.")},
    {"id": "with-system", "system": "Be brief.", "image": "coffee.png",
     "conversations": conv("<image>\nDescribe.", "Coffee in a cup.")},
    {"id": "two-images", "image": ["coffee.png", "chelsea.png"],
     "conversations": conv("<image>\n<image>\nCompare.", "A drink and a cat.")},
    {"id": "text-placeholder", "conversations": conv("<image>\nSay hi.", "Hi.")},
    {"id": "merged", "image": "chelsea.png", "conversations": conv("<image> Who is it? <image>", "Chelsea.")},
]
EXPECTED = {  # problem -> the records it must name, exactly
    "missing_image": {"missing", "url"},
    "truncated_image": {"truncated"},
    "unreadable_image": {"not-an-image"},
    "image_too_large": {"too-large"},
    "image_count": {"two-placeholders"},
    "roles": {"human-twice", "narrator"},
    "empty_turn": {"empty-answer"},
    "unanswered": {"unanswered"},
    "duplicate_id": {"good"},
    "duplicate_pair": {"copy"},
    "system_ignored": {"with-system"},
    "multi_image": {"two-images"},
    # trained as the original trains them: warnings (errors with --strict)
    "leading_gpt": {"gpt-first"},
    "image_unplaced": {"no-placeholder"},
    "image_in_answer": {"image-in-answer"},
    "text_placeholder": {"text-placeholder"},
    "image_merged": {"merged"},
}
ORIGINAL_WAY = {"gpt-first", "no-placeholder", "image-in-answer", "text-placeholder", "merged"}
MAX_PIXELS = 250_000  # chelsea 451x300 and coffee 600x400 fit, astronaut 512x512 does not


@pytest.fixture
def bad(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea.png", "coffee.png", "astronaut.png"):
        shutil.copyfile(IMAGES / name, images / name)
    data = (IMAGES / "chelsea.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "notes.png").write_text("not a picture")
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in BAD))
    return path, images


def named(report, code):
    return {e["id"] for e in report.problems[code].examples}


def test_every_problem_is_caught_and_named(bad):
    path, images = bad
    report = check(path, image_folder=images, max_pixels=MAX_PIXELS)
    assert {code: named(report, code) for code in report.problems} == EXPECTED
    assert report.records == len(BAD)
    clean = {"good", "with-system", "two-images", "copy"} | ORIGINAL_WAY  # warnings only (or nothing) for these
    assert report.errors == len(BAD) - len(clean) - 1  # the second "good" has a duplicate id and is fine
    assert report.failed()
    assert set(EXPECTED) <= set(PROBLEMS)


def test_messages_name_the_file_and_the_fix(bad):
    path, images = bad
    report = check(path, image_folder=images, max_pixels=MAX_PIXELS)
    text = render(report)
    assert "record 'missing' (bad.jsonl:2):" in text and "missing.png: no such file" in text
    assert "fix: fix the path or --image-folder" in text
    missing = report.problems["missing_image"].examples
    assert missing[1]["message"] == "http://example.com/cat.jpg is a URL, not a file"
    assert "truncated or corrupt" in report.problems["truncated_image"].examples[0]["message"]
    assert "250,000" in report.problems["image_too_large"].examples[0]["message"]
    assert report.problems["duplicate_id"].examples[0]["message"] == "id 'good' also at bad.jsonl:1"


def test_cli_exit_status_json_and_fix(bad, tmp_path, vlmkit_data):
    path, images = bad
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    fixed = tmp_path / "clean.jsonl"
    result = vlmkit_data("check", path, "--image-folder", images, "--max-pixels", MAX_PIXELS, "--json",
                         "--fix", fixed)
    assert result.code == 3
    report = json.loads(result.out)
    assert report["problems"]["roles"]["severity"] == "error" and report["problems"]["roles"]["count"] == 2
    assert report["problems"]["leading_gpt"]["severity"] == "warning"
    kept = [json.loads(line)["id"] for line in fixed.read_text().splitlines()]
    # no errors, no duplicates (second "good", "copy"); what the original trains on in its own way is kept
    assert kept == ["good", "no-placeholder", "gpt-first", "image-in-answer", "with-system", "two-images",
                    "text-placeholder", "merged"]
    assert report["fixed"] == {"path": str(fixed), "kept": len(kept), "dropped": len(BAD) - len(kept)}
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the input is never modified
    again = vlmkit_data("check", fixed, "--image-folder", images, "--max-pixels", MAX_PIXELS)
    assert again.code == 0, again.out
    assert vlmkit_data("check", fixed, "--image-folder", images, "--max-pixels", MAX_PIXELS, "--strict").code == 3
    strict_fixed = tmp_path / "strict.jsonl"
    strict = vlmkit_data("check", path, "--image-folder", images, "--max-pixels", MAX_PIXELS, "--json", "--strict",
                         "--fix", strict_fixed)
    assert strict.code == 3
    problems = json.loads(strict.out)["problems"]
    assert {code for code, p in problems.items() if p["severity"] == "error"} >= set(EXPECTED) - {
        "duplicate_id", "duplicate_pair", "system_ignored", "multi_image"}
    assert [json.loads(line)["id"] for line in strict_fixed.read_text().splitlines()] == [
        "good", "with-system", "two-images"]
    refused = vlmkit_data("check", path, "--fix", path)
    assert refused.code == 1 and "never modifies its input" in refused.err


@pytest.fixture
def long_records(tmp_path):
    shutil.copyfile(IMAGES / "chelsea.png", tmp_path / "chelsea.png")
    rows = [
        GOOD,
        {"id": "separator-in-answer", "conversations": conv("Say it.", "USER: hi ASSISTANT: done")},
        {"id": "long-answer", "image": "chelsea.png", "conversations": conv("<image>\nDescribe.", "cat " * 150)},
        {"id": "long-question", "image": "chelsea.png",
         "conversations": conv("<image>\n" + "Look closely at this picture. " * 30, "A cat.")},
        {"id": "long-text-only", "conversations": conv("Tell me a story. " * 40, "No.")},
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_model_token_statistics_and_masked_records(long_records, tiny_models):
    model = load_data_model(tiny_models["v15"], max_length=128)
    assert (model.template, model.fixed_image_tokens, model.max_length_from) == ("llava_v1", 16, "--max-length")
    report = check(long_records, image_folder=long_records.parent, model=model)
    tokens = report.tokens
    assert tokens.all_masked == ["separator-in-answer", "long-question", "long-text-only"]
    assert named(report, "untrainable") == {"separator-in-answer", "long-question", "long-text-only"}
    assert "tokenization mismatch" in report.problems["untrainable"].examples[0]["message"]
    assert named(report, "truncated") == {"long-answer"}
    assert tokens.count == 2 and tokens.over_max_length == 1 and tokens.maximum > 128
    assert sum(tokens.histogram) == 2
    # the good record: its ids plus 15 more positions for the 16 image features
    from vlmkit.data.tokenize import tokenize
    from vlmkit.data.formats import decode_conversations

    ids = tokenize(decode_conversations("x", GOOD, 0), "llava_v1", model.encoder, max_length=128).input_ids
    assert tokens.minimum == len(ids) + 15
    text = render(report)
    assert "every label masked: 3: 'separator-in-answer', 'long-question', 'long-text-only'" in text
    assert "over --max-length 128: 1" in text


def test_cli_with_model(long_records, tiny_models, vlmkit_data):
    result = vlmkit_data("check", long_records, "--image-folder", long_records.parent, "--model", tiny_models["v15"],
                         "--max-length", 128, "--json")
    assert result.code == 3
    tokens = json.loads(result.out)["tokens"]
    assert tokens["all_masked"] == ["separator-in-answer", "long-question", "long-text-only"]
    assert tokens["image_tokens"] == 16 and tokens["max_length"] == 128
    assert [b["count"] for b in tokens["histogram"] if b["count"]] == [1, 1]


def test_records_the_original_trains_its_own_way_are_warnings_that_say_how(bad):
    path, images = bad
    report = check(path, image_folder=images, max_pixels=MAX_PIXELS)

    def message(code):
        return report.problems[code].examples[0]["message"]

    assert message("leading_gpt").startswith("turn 1 is gpt's: the original drops it (source = source[1:])")
    assert "the original loads the image, but its ids hold no image token" in message("image_unplaced")
    assert "in answer turn 2: the original moves it to the front of that answer" in message("image_in_answer")
    assert "the original tokenises it as the text '<image>'" in message("text_placeholder")
    assert "turn 1 holds 2 <image> for one image: the original keeps one" in message("image_merged")
    assert "assert" in message("roles") and "KeyError" in report.problems["roles"].examples[1]["message"]
    text = render(report)
    assert "  warning leading_gpt " in text and "  error   image_count " in text
    strict = render(check(path, image_folder=images, max_pixels=MAX_PIXELS, strict=True))
    assert "  error   leading_gpt " in strict and "  warning system_ignored " in strict


def test_plain_template_reads_no_roles(tmp_path, llama):
    from vlmkit.data.model import DataModel

    rows = [{"id": "caption-first", "image": "chelsea.png", "conversations": conv("<image>", "A cat.",
                                                                                roles=["gpt", "human"])},
            {"id": "no-image", "conversations": conv("<image>", "A cat.")},
            {"id": "three", "image": "chelsea.png", "conversations": conv("<image>", "A cat.", "More?")}]
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copyfile(IMAGES / "chelsea.png", tmp_path / "chelsea.png")
    model = DataModel(tmp_path, "original", "plain", llama, 2048, "test", 576)
    report = check(path, image_folder=tmp_path, model=model)
    assert {code: named(report, code) for code in report.problems} == {
        "roles_ignored": {"caption-first"}, "text_placeholder": {"no-image"}, "roles": {"three"}}
    assert "all-zero dummy image" in report.problems["text_placeholder"].examples[0]["message"]
    assert "len(source) == 2" in report.problems["roles"].examples[0]["message"]
    assert report.tokens.count == 2  # both warned records are tokenised (and measured) as the original trains them
