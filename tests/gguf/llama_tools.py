"""llama.cpp's own conversion tools, run as a user runs them (several in one interpreter), and a comparison of
two GGUF files.

* the language model: ``convert_hf_to_gguf.py`` (the current converter) on a transformers folder;
* the projector: ``llava_surgery_v2.py`` + ``convert_image_encoder_to_gguf.py`` (the legacy pair;
  the current converter refuses a CLIP tower: "Unsupported model type: clip_vision_model").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch


ADDED = {"<image>": 32000, "<pad>": 32001}  # the tokens LLaVA adds to Vicuna's / Mistral's 32000
LEGACY = "tools/mtmd/legacy-models/"


@dataclass
class Job:
    """One run of a llama.cpp script, as ``python SCRIPT ARGS``."""

    script: str  # relative to the llama.cpp tree
    args: tuple


# Each job as `python SCRIPT ARGS` runs it (as __main__, its own folder first on sys.path, its own argv), all
# in one interpreter: torch, transformers, gguf-py and convert_hf_to_gguf.py's hundred model modules load once
# for all the files instead of once per file. A job that fails is recorded and the next one runs.
_RUNNER = r"""
import json, os, runpy, sys, traceback
jobs, results = json.loads(sys.argv[1]), sys.argv[2]
path, failures = list(sys.path), []
for script, args in jobs:
    print(f"\n=== {script} {' '.join(args)}", flush=True)
    sys.argv = [script, *args]
    sys.path[:] = [os.path.dirname(script), *path[1:]]
    try:
        runpy.run_path(script, run_name="__main__")
        failures.append(None)
    except SystemExit as e:
        failures.append(None if e.code in (0, None) else f"exit status {e.code}")
    except BaseException:
        failures.append(traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
with open(results, "w") as f:
    json.dump(failures, f)
"""


def run_scripts(tree: Path, jobs: dict[str, Job]) -> dict[str, str | None]:
    """Run ``jobs`` (one interpreter, in order); returns each one's failure (its output), None where it ran."""
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}  # the scripts' own gguf-py, as in their tree
    spec = [[str(tree / j.script), [str(a) for a in j.args]] for j in jobs.values()]
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.json"
        r = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(spec), str(results)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env)
        if r.returncode != 0 or not results.exists():
            return {key: f"the runner failed:\n{r.stdout[-3000:]}" for key in jobs}
        failures = json.loads(results.read_text())
    outputs = r.stdout.split("\n=== ")[1:]
    return {key: None if failure is None else f"{jobs[key].script} failed:\n{output[-3000:]}\n{failure}"
            for key, failure, output in zip(jobs, failures, outputs)}


def with_tokenizer(hf_folder: Path, original: Path, dst: Path, added: dict[str, int]) -> Path:
    """The transformers folder plus the original ``tokenizer.model`` and ``added_tokens.json``, as the
    llava-hf repositories ship them: what llama.cpp's converter needs for real token scores."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in hf_folder.iterdir():
        if f.is_file() and f.name != "tokenizer.model":
            (dst / f.name).symlink_to(f.resolve())
    shutil.copy(original / "tokenizer.model", dst / "tokenizer.model")
    (dst / "added_tokens.json").write_text(json.dumps(added))
    return dst


def export_language_model(hf_folder: Path, original: Path, dst: Path, added: dict[str, int]) -> Path:
    """llama.cpp's documented route for LLaVA-NeXT language models: save the transformers model's
    language model on its own (its converter has no LlavaNext text architecture)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(hf_folder, dtype=torch.float32)
    lm = AutoModelForCausalLM.from_config(model.config.text_config)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.save_pretrained(dst)
    for name in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "special_tokens_map.json"):
        if (hf_folder / name).exists():
            shutil.copy(hf_folder / name, dst / name)
    shutil.copy(original / "tokenizer.model", dst / "tokenizer.model")
    (dst / "added_tokens.json").write_text(json.dumps(added))
    return dst


def language_model(folder: Path, out: Path, outtype: str) -> Job:
    """The current converter on a transformers folder: writes ``out``."""
    return Job("convert_hf_to_gguf.py", (folder, "--outfile", out, "--outtype", outtype))


# The legacy mmproj route, in two steps (the second reads what the first wrote); the mmproj is then
# next((work / "out").glob("mmproj-*.gguf")), the surgery's projector work / "surgery" / "llava.projector".


def surgery(original: Path, work: Path) -> Job:
    """``llava_surgery_v2.py`` on a copy of ``original`` (``-C`` where the checkpoint holds its tower)."""
    folder = work / "surgery"
    shutil.copytree(original, folder)
    return Job(LEGACY + "llava_surgery_v2.py", ("-m", folder, *(["-C"] if _tower_inside(folder) else [])))


def _tower_inside(checkpoint: Path) -> bool:
    return any("vision_tower" in k for k in json.loads(next(checkpoint.glob("*.index.json")).read_text())["weight_map"])


def image_encoder(original: Path, clip: Path, work: Path, *, f32: bool = False, feature_layer: bool = False) -> Job:
    """``convert_image_encoder_to_gguf.py`` on the CLIP tower and the surgery's projector.

    Args:
        feature_layer: put the LLaVA config's ``mm_vision_select_layer`` into the CLIP config, so the
            legacy converter writes ``clip.vision.feature_layer`` (by default it does not: #25817).
    """
    surgery = work / "surgery"
    llava = json.loads((original / "config.json").read_text())
    tower_inside = _tower_inside(surgery)
    vit = work / "vit"
    shutil.copytree(clip, vit)
    config = json.loads((vit / "config.json").read_text())
    if tower_inside:  # NeXT: the fine-tuned tower from llava.clip, the anyres facts in the vision config
        state = torch.load(vit / "pytorch_model.bin", weights_only=True)
        state.update(torch.load(surgery / "llava.clip", weights_only=True))
        torch.save(state, vit / "pytorch_model.bin")
        for key in ("image_grid_pinpoints", "mm_patch_merge_type", "image_aspect_ratio", "mm_projector_type"):
            config["vision_config"][key] = llava[key]
        # llama.cpp's docs use --clip-model-is-vision here; that path needs transformers 4.x
        # (CLIPVisionModel.vision_model), the CLIPModel path is the same code otherwise.
    if feature_layer or tower_inside:
        config["mm_vision_select_layer"] = llava["mm_vision_select_layer"]
    (vit / "config.json").write_text(json.dumps(config))
    return Job(LEGACY + "convert_image_encoder_to_gguf.py",
               ("-m", vit, "--llava-projector", surgery / "llava.projector", "--output-dir", work / "out",
                *(["--use-f32"] if f32 else [])))


def clip_model(clip: Path, work: Path, *, flag: str | None = None, f32: bool = False) -> Job:
    """The legacy converter on a CLIP folder (with the ``vocab.json`` its text tower reads); the file is then
    next((work / "out").glob("*.gguf"))."""
    import gzip

    from vlmkit.conversion.gguf_vocab import CLIP_MERGES, clip_bpe

    folder = work / "clip"
    shutil.copytree(clip, folder)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(clip_bpe())}))
    merges = gzip.open(CLIP_MERGES, "rt", encoding="utf-8").read().split("\n")[1:48895]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return Job(LEGACY + "convert_image_encoder_to_gguf.py", ("-m", folder, "--output-dir", work / "out",
                                                            *([flag] if flag else []), *(["--use-f32"] if f32 else [])))


# ------------------------------------------------------------------------------ comparison


def _values(t) -> np.ndarray:
    shape = list(reversed([int(d) for d in t.shape]))
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).float().numpy().reshape(shape)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(shape)


@dataclass
class Differences:
    """Everything two GGUF files disagree on."""

    keys: dict[str, str] = field(default_factory=dict)  # key -> "ours only" / "theirs only" / "value"
    tensors: dict[str, str] = field(default_factory=dict)  # name -> "ours only" / "theirs only" / "type X vs Y"
    values: dict[str, float] = field(default_factory=dict)  # name -> max abs diff beyond the types' rounding


def compare(ours: Path, theirs: Path) -> Differences:
    """Keys (values equal) and tensors (names, shapes, types, values within the coarser type's rounding)."""
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    fa = {k: f for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f for k, f in b.fields.items() if not k.startswith("GGUF.")}
    d = Differences()
    d.keys.update({k: "ours only" for k in fa.keys() - fb.keys()})
    d.keys.update({k: "theirs only" for k in fb.keys() - fa.keys()})
    for k in fa.keys() & fb.keys():
        va, vb = fa[k].contents(), fb[k].contents()
        if isinstance(va, float) or (isinstance(va, list) and va and isinstance(va[0], float)):
            same = np.allclose(va, vb, rtol=0, atol=1e-7)
        else:
            same = va == vb
        if not same or [t.name for t in fa[k].types] != [t.name for t in fb[k].types]:
            d.keys[k] = "value"
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    d.tensors.update({n: "ours only" for n in ta.keys() - tb.keys()})
    d.tensors.update({n: "theirs only" for n in tb.keys() - ta.keys()})
    for n in ta.keys() & tb.keys():
        x, y = ta[n], tb[n]
        if list(x.shape) != list(y.shape):
            d.tensors[n] = f"shape {list(x.shape)} vs {list(y.shape)}"
            continue
        if x.tensor_type != y.tensor_type:
            d.tensors[n] = f"type {x.tensor_type.name} vs {y.tensor_type.name}"
        vx, vy = _values(x), _values(y)
        coarse = max(gguf.GGML_QUANT_SIZES[x.tensor_type][1] / gguf.GGML_QUANT_SIZES[x.tensor_type][0],
                     gguf.GGML_QUANT_SIZES[y.tensor_type][1] / gguf.GGML_QUANT_SIZES[y.tensor_type][0])
        # same type: bit-identical; F32 vs F16: within half an F16 step
        rounding = 0.0 if x.tensor_type == y.tensor_type else (2.0 ** -11 if coarse <= 2 else 2.0 ** -7)
        excess = float(np.max(np.abs(vx - vy) - rounding * np.abs(vy))) if vx.size else 0.0
        if excess > 1e-7:
            d.values[n] = excess
    return d
