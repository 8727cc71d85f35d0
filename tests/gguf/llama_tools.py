"""llama.cpp's own conversion tools, run as a user runs them, and a comparison of two GGUF files.

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
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch


def run_script(tree: Path, script: str, *args, cwd: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}  # the scripts' own gguf-py, as in their tree
    r = subprocess.run([sys.executable, str(tree / script), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


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


def language_model(tree: Path, folder: Path, out: Path, outtype: str) -> Path:
    run_script(tree, "convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype)
    return out


def projector(tree: Path, original: Path, clip: Path, work: Path, *, f32: bool = False,
              feature_layer: bool = False) -> Path:
    """The legacy mmproj route on a copy of ``original``; returns the mmproj GGUF.

    Args:
        feature_layer: put the LLaVA config's ``mm_vision_select_layer`` into the CLIP config, so the
            legacy converter writes ``clip.vision.feature_layer`` (by default it does not: #25817).
    """
    legacy = "tools/mtmd/legacy-models/"
    surgery = work / "surgery"
    shutil.copytree(original, surgery)
    llava = json.loads((original / "config.json").read_text())
    tower_inside = any("vision_tower" in k for k in json.loads(
        next(surgery.glob("*.index.json")).read_text())["weight_map"])
    run_script(tree, legacy + "llava_surgery_v2.py", "-m", surgery, *(["-C"] if tower_inside else []))
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
    out = work / "out"
    run_script(tree, legacy + "convert_image_encoder_to_gguf.py", "-m", vit, "--llava-projector",
               surgery / "llava.projector", "--output-dir", out, *(["--use-f32"] if f32 else []))
    return next(out.glob("mmproj-*.gguf"))


def clip_model(tree: Path, clip: Path, work: Path, *, flag: str | None = None, f32: bool = False) -> Path:
    """The legacy converter on a CLIP folder (with the ``vocab.json`` its text tower reads)."""
    import gzip

    from vlmkit.conversion.gguf_vocab import CLIP_MERGES, clip_bpe

    folder = work / "clip"
    shutil.copytree(clip, folder)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(clip_bpe())}))
    merges = gzip.open(CLIP_MERGES, "rt", encoding="utf-8").read().split("\n")[1:48895]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    out = work / "out"
    run_script(tree, "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py", "-m", folder, "--output-dir", out,
               *([flag] if flag else []), *(["--use-f32"] if f32 else []))
    return next(out.glob("*.gguf"))


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
