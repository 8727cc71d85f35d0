"""The files in llama.cpp itself (llama-cpp-python's mtmd API): the same numbers as llama.cpp's own files,
the language model exact, ``vlmkit verify`` on a GGUF pair, and the two upstream defects made visible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmkit.parity.llamacpp import LlamaCpp
from vlmkit.runtime import images, templates

from ..conftest import run_cli, save_with_transformers

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gguf")]
IMAGE = Path(images.__file__).parents[1] / "assets" / "images" / "chelsea.png"
QUESTION = "What is shown in this image?"


def _pair(folder: Path) -> tuple[Path, Path]:
    mmproj = next(folder.glob("mmproj-*.gguf"))
    return next(p for p in folder.glob("*.gguf") if p != mmproj), mmproj


def _run(model: Path, mmproj: Path, template: str):
    prompt = templates.render(template, [("user", templates.with_image(QUESTION)), ("assistant", None)])
    with LlamaCpp(model, mmproj, n_ctx=1024) as llm:
        return llm.generate(prompt.replace(templates.IMAGE_TOKEN, llm.marker), [IMAGE], 8)


@pytest.mark.parametrize("name,template", [("v15", "llava_v1"), ("next", "mistral_instruct")])
def test_both_pairs_give_the_same_numbers_in_llama_cpp(parts, gguf_of, llama_cpp_files, name, template):
    """vlmkit's pair and the pair from llama.cpp's tools (given the feature layer, see the next test)."""
    ours = gguf_of(name, *(["--vision-tower", parts["clip"]] if name == "next" else []))
    theirs_mmproj = llama_cpp_files.mmproj({"v15": "v15-f16-feature-layer", "next": "next-f16"}[name])
    a, b = _run(*_pair(ours), template), _run(llama_cpp_files.lm(name, "f16"), theirs_mmproj, template)
    assert [c.kind for c in a.chunks] == [c.kind for c in b.chunks]
    assert [c.ids for c in a.chunks] == [c.ids for c in b.chunks]
    for x, y in zip(a.image_embeddings, b.image_embeddings):
        # the one type that differs on purpose: vlmkit keeps the position embeddings F32, the legacy file F16
        assert x.shape == y.shape and np.abs(x - y).max() <= 5e-3 * np.abs(y).max()
    assert a.tokens == b.tokens and len(a.tokens) == 8
    assert np.abs(a.logits - b.logits).max() <= 5e-3 * np.abs(b.logits).max()


def test_without_feature_layer_llama_cpp_runs_one_block_short(parts, gguf_of, llama_cpp_files):
    """#25817: the legacy route writes block_count = n - 1 and no feature_layer; llama.cpp then runs n - 2
    blocks. vlmkit's mmproj (feature_layer written) gives the original's feature layer, the legacy file the one
    before it; both in llama.cpp's CLS-last order (#25814)."""
    from vlmkit.families.llava.checkpoint import open_original
    from vlmkit.families.llava.gguf_parity import cls_last
    from vlmkit.families.llava.reference import OriginalLlava
    from vlmkit.options import LoadOptions

    ours = gguf_of("v15", "--dtype", "f32")
    legacy = llama_cpp_files.mmproj("v15-f32")
    model, mmproj = _pair(ours)
    square = images.load_image(IMAGE).resize((56, 56), images.BICUBIC)
    embeddings = {}
    for label, projector in (("ours", mmproj), ("legacy", legacy)):
        with LlamaCpp(model, projector, n_ctx=256) as llm:
            embeddings[label] = torch.from_numpy(llm.tokenize(llm.marker, [square])[-1].embeddings)
    reference = OriginalLlava.load(open_original(parts["v15"], LoadOptions()))
    pixels = torch.from_numpy(images.clip_preprocess(square, reference.image_config))[None]
    expected = {}
    for layer in (-2, -3):
        reference.config = {**reference.config, "mm_vision_select_layer": layer}
        with cls_last(reference.vision_tower):
            expected[layer] = reference.encode_images(pixels)[0]
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))  # noqa: E731
    assert cos(expected[-2], embeddings["ours"]) > 0.99999
    assert cos(expected[-3], embeddings["legacy"]) > 0.999  # legacy: F16 matrices
    assert cos(expected[-2], embeddings["legacy"]) < 0.99


@pytest.mark.parametrize("name,dtype", [("v15", "f32"), ("v15", "f16"), ("v15", "q8_0"), ("next", "f16"),
                                        ("lora", "f16")])
def test_verify_gguf_pair(parts, gguf_of, tmp_path, name, dtype):
    """The language model exact on llama.cpp's own inputs; the mmproj right; the defect named."""
    extra = {"next": ["--vision-tower", parts["clip"]], "lora": ["--model-base", parts["base"]]}.get(name, [])
    out = gguf_of(name, "--dtype", dtype, *extra)
    report_file = tmp_path / "report.json"
    v = run_cli("verify", parts[name], out, "--json", report_file, *extra)
    report = json.loads(report_file.read_text())
    assert v.code == 0 and report["verdict"] == "PASS", v.out
    checks = {c["name"]: c for c in report["checks"]}
    assert {"files", "image embeddings (mmproj)", "prompt ids (probe 1)", "prompt ids (probe 2)",
            "language model logits (llama.cpp's inputs)", "language model greedy tokens",
            "end to end: greedy tokens (probe 1)"} <= set(checks)
    bound = {"f32": 1e-4, "f16": 2e-2, "q8_0": 3e-1}[dtype]  # measured: 3e-6, 5e-3, 0.12
    assert checks["language model logits (llama.cpp's inputs)"]["measured"]["max_abs_diff"] <= bound
    mmproj = checks["image embeddings (mmproj)"]["measured"]
    # this llama.cpp build has #25814: its embeddings follow the CLS-last order, not the original's
    assert mmproj["cosine_vs_cls_last"] > 0.999 > mmproj["cosine_vs_original"]
    assert "ggml-org/llama.cpp#25814" in v.out and "[pass] end to end" in v.out


def test_verify_catches_a_wrong_mmproj(parts, tmp_path):
    """The mmproj written with the last vision layer instead of LLaVA's -2: the image embeddings check fails,
    the language model still passes."""
    override = tmp_path / "wrong.json"
    override.write_text(json.dumps({"vision_feature_layer": -1}))
    out = tmp_path / "gguf"
    assert run_cli("convert", parts["v15"], out, "--to", "gguf", "--quiet", "--dtype", "f32",
                   "--config", override).code == 0
    v = run_cli("verify", parts["v15"], out)
    assert v.code == 3, v.out
    assert "[FAIL] image embeddings (mmproj)" in v.out
    assert "[pass] language model logits" in v.out and "[pass] prompt ids (probe 1)" in v.out


PROMPTS = ["What is shown in this image?",
           "Describe  the picture,   please.\n    Indented code:\tx = 1234567;\n\n- a list\n- of things",
           "naïve café — 日本語のテキスト, emoji 🙂 and a URL: https://example.com/a_b?c=d"]


def _llama_ids(model: Path, texts: list[str]) -> list[list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=True, special=False) for t in texts]
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["v15", "next"])
def test_tokenizer_json_vocabulary_gives_llama_cpp_the_sentencepiece_ids(parts, hf, gguf_of, tmp_path, name):
    """A folder transformers 5 saved (tokenizer.json, no tokenizer.model) -> GGUF: llama.cpp tokenizes to the
    ids of the GGUF from tokenizer.model, which are the SentencePiece model's own. The scores matter: with the
    -1000 placeholders llama.cpp's converter writes from tokenizer.json, llama.cpp gives other ids."""
    import gguf
    import sentencepiece

    saved = save_with_transformers(hf[name], tmp_path / "saved", "loaded")
    assert not (saved / "tokenizer.model").exists()
    from_json = tmp_path / "json"
    assert run_cli("convert", saved, from_json, "--to", "gguf", "--quiet", "--dtype", "f32").code == 0
    files = {label: next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))
             for label, out in (("model", gguf_of(f"hf:{name}", "--dtype", "f32")), ("json", from_json))}
    placeholder = tmp_path / "placeholder.gguf"
    placeholder.write_bytes(files["json"].read_bytes())
    reader = gguf.GGUFReader(placeholder, "r+")
    scores = reader.fields["tokenizer.ggml.scores"]
    for i in scores.data:
        scores.parts[i][...] = -1000.0
    reader.data.flush()
    del reader

    sp = sentencepiece.SentencePieceProcessor(model_file=str(parts[name] / "tokenizer.model"))
    original = [[sp.bos_id(), *sp.encode(t)] for t in PROMPTS]
    assert _llama_ids(files["model"], PROMPTS) == original
    assert _llama_ids(files["json"], PROMPTS) == original
    assert _llama_ids(placeholder, PROMPTS) != original
