"""vLLM on the transformers folders ``vlmkit convert`` writes of LLaVA-NeXT-repository checkpoints.

llava-next-qwen and llama3-llava-next (``LlavaNextForConditionalGeneration`` with a Qwen2 / Llama 3 text
model) and LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``: Qwen2 + SigLIP + ``anyres_max_9``),
each a tiny release built in its real layout (``make_tiny``) and converted by the CLI. vLLM's loader reads
only the published llava-hf names, its own image processors and the folder's chat template, so loading a
folder and answering an image question with the original's greedy tokens checks all of what vlmkit wrote.

To stay cheap, ONE vLLM process (``.venv-vllm``, its offline API, one engine at a time) loads the three
folders one after another, with the engine arguments of ``vlmkit serve --engine vllm``'s own command line
(parsed by vLLM's parser) and vlmkit's environment for it. The expected tokens are the original checkpoint's
under vlmkit's reference of the original forward (``vlmkit chat`` on the original), not the converted folder's.

Slow; never skipped: without vLLM (``make vllm``) the process fails and these tests say so.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ..conftest import run_cli
from .conftest import CAT, ask

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm")]

QUESTION = "What is shown in this image?"  # about chelsea.png, 451 x 300: a non-square photo (anyres grids)
NEW_TOKENS = 8
ROWS = ("qwen2", "llama3", "onevision")  # make_tiny variants: llava-next-qwen, llama3-llava-next, OneVision

LOGPROBS = 5  # vLLM's top log-probabilities per generated token: the logit gaps are compared, not only the argmax
# vLLM's offline API on each case in turn: the engine arguments vlmkit's command line sets (what differs from
# vLLM's defaults once its own parser has read it), the chat through the folder's template, greedy decoding
DRIVER = """
import dataclasses, gc, json, sys, traceback
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

LOGPROBS = %d
parser = make_arg_parser(FlexibleArgumentParser())
fields = {f.name for f in dataclasses.fields(EngineArgs)}
for case in json.load(sys.stdin):
    args = parser.parse_args(case["argv"])
    given = {k: v for k, v in vars(args).items() if k in fields and v != parser.get_default(k)}
    try:
        llm = LLM(**given)
        params = SamplingParams(temperature=0, max_tokens=case["max_tokens"], logprobs=LOGPROBS)
        out = llm.chat(case["messages"], params, use_tqdm=False, tokenization_kwargs=case["tokenization_kwargs"])[0]
        result = {"prompt": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
                  "logprobs": [{i: p.logprob for i, p in step.items()} for step in out.outputs[0].logprobs]}
        del llm, out
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    gc.collect()
    print("RESULT " + json.dumps({"row": case["row"], **result}), flush=True)
"""


def _build(root, row):
    """``(original, converted, load options)`` of the tiny release ``row``, converted by ``vlmkit convert``."""
    from vlmkit.families import llava

    original = llava.make_tiny(root, row)
    options = llava.tiny_options(root, row)
    flags = []
    if "config" in options:  # the tiny SigLIP's head count (no released tower): --config, as a user passes it
        (root / "config-override.json").write_text(json.dumps(options["config"]))
        flags = ["--config", root / "config-override.json"]
    result = run_cli("convert", original, root / "hf", "--quiet", *flags)
    assert result.code == 0, result.err
    return original, root / "hf", options


def _reference_logits(model, reply):
    """The original's logits (vlmkit's reference forward) at each generated position, the answer fed back."""
    from vlmkit.runtime.messages import normalise

    backend = model.backend  # the original checkpoint's: OriginalLlava
    ids = backend.prompt_ids(normalise([{"role": "user", "content": QUESTION, "images": [CAT]}]))
    logits = backend.model.logits(ids + reply.tokens[:-1], [backend.image_features(CAT)])
    return logits[-len(reply.tokens):]


def _launch(folder):
    """vLLM's engine arguments for ``folder``, from vlmkit's own command line: ``vlmkit serve --engine vllm``'s
    pre-start check passes and the folder reaches vLLM as it is (published layout: no renamed view)."""
    from vlmkit.options import LoadOptions
    from vlmkit.serve.app import ServeSettings
    from vlmkit.serve.engines import vllm

    config = vllm.check_folder(folder)
    assert vllm.published_view(folder) is None
    settings = ServeSettings(model_name="tiny")
    return vllm.command("python", folder, 8000, "tiny", settings, LoadOptions(device="cpu"), config)[3:]


@pytest.fixture(scope="session")  # built and run once (2.5 minutes) whatever order xdist runs the tests in
def runs(tmp_path_factory):
    """row -> (converted folder, the original's reply under vlmkit's reference, vLLM's result)."""
    import vlmkit
    from vlmkit.runtime.templates import read_chat_template
    from vlmkit.serve.engines import vllm

    built, cases = {}, []
    for row in ROWS:
        original, converted, options = _build(tmp_path_factory.mktemp(f"vllm-{row}"), row)
        model = vlmkit.load(original, dtype="float32", **options)
        reply = model.chat([{"role": "user", "content": QUESTION, "images": [CAT]}], temperature=0,
                           max_new_tokens=NEW_TOKENS)
        built[row] = (converted, reply, _reference_logits(model, reply))
        # vlmkit serve asks vLLM for the tokenizer's special tokens where the template writes no BOS itself
        bos = "bos_token" in (read_chat_template(converted) or "")
        cases.append({"row": row, "argv": _launch(converted), "messages": ask(QUESTION, CAT),
                      "max_tokens": NEW_TOKENS, "tokenization_kwargs": {} if bos else {"add_special_tokens": True}})
    env = {**os.environ, **vllm.ENV_DEFAULTS, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": str(vllm.SITE)}  # SITE: vlmkit's sitecustomize that lets torchvision import (LLaVA needs it)
    # VLLM_ENABLE_V1_MULTIPROCESSING 0: each engine runs in this process (no engine-core process per model)
    run = subprocess.run([vllm.python(), "-c", DRIVER % LOGPROBS], input=json.dumps(cases), capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = {r["row"]: r for r in (json.loads(line[len("RESULT "):]) for line in run.stdout.splitlines()
                                     if line.startswith("RESULT "))}
    assert set(results) == set(ROWS), run.stderr[-4000:]
    return {row: (*built[row], results[row], run.stderr) for row in ROWS}


@pytest.mark.parametrize("row", ROWS)
def test_the_folder_is_in_the_published_llava_hf_layout(runs, row):
    """Every tensor under a llava-hf release's name (what vLLM's loader maps), none in another layout."""
    from vlmkit.families.llava import layout
    from vlmkit.serve.engines.vllm import weight_names

    names = weight_names(runs[row][0])
    assert names and all(n.startswith(layout.PUBLISHED) for n in names), [n for n in names
                                                                          if not n.startswith(layout.PUBLISHED)]
    architecture = json.loads((runs[row][0] / "config.json").read_text())["architectures"]
    assert architecture == ["LlavaOnevisionForConditionalGeneration" if row == "onevision"
                            else "LlavaNextForConditionalGeneration"]


@pytest.mark.parametrize("row", ROWS)
def test_vllm_answers_with_the_originals_greedy_tokens(runs, row):
    _, reply, _, got, log = runs[row]
    assert "error" not in got, got.get("error", "") + "\n" + log[-3000:]
    assert len(reply.tokens) == NEW_TOKENS  # no early stop: every token compared
    assert got["tokens"] == reply.tokens
    # the prompt: the template's ids with the image's feature positions, as many as the original computes
    assert len(got["prompt"]) == reply.prompt_tokens


@pytest.mark.parametrize("row", ROWS)
def test_vllms_logit_gaps_are_the_originals(runs, row):
    """At each generated token, vLLM's log-probability gaps between its top tokens equal the original's logit gaps
    (a softmax's normaliser cancels in a gap, so the padded vocabulary rows do not enter): the image features
    reach vLLM's model as the original computes them, not only close enough to keep the argmax."""
    _, reply, logits, got, log = runs[row]
    assert "error" not in got, got.get("error", "") + "\n" + log[-3000:]
    for step, (top, want) in enumerate(zip(got["logprobs"], logits)):
        token = reply.tokens[step]
        for other, logprob in top.items():
            other = int(other)
            if other < want.shape[0] and other != token:  # a row the original has
                gap = top[str(token)] - logprob
                assert abs(gap - (want[token] - want[other]).item()) < 1e-3, (step, token, other)
