"""``vlmkit merge-lora`` of a LLaVA LoRA run: the run + its base -> one standalone model, streamed like a conversion.

Two layouts, both through the conversion engine (plan checked before any byte is read, one
tensor at a time, written atomically, with a manifest):

* ``original``: LLaVA's ``merge_lora_weights.py`` result, a full original checkpoint (the base's
  tensors, ``non_lora_trainables.bin`` over them, ``W + scale * B @ A`` for every adapted
  weight; the vision tower stays in its CLIP folder unless it was trained), with the run's
  ``config.json``, the base's tokenizer and generation config. ``vlmkit chat`` and ``convert`` take it.
* ``transformers``: the published llava-hf layout with processor and chat template: exactly
  ``vlmkit convert`` of the LoRA form (the family's rules merge the same way).

Before anything is read, the adapter is checked to be a LoRA run and the base to be the model it
was trained on (``vlmkit-train.json`` records the base's fingerprint): merging into another base
gives a model that talks nonsense, so it is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ... import dtypes
from ...conversion import Conversion, drop, engine, lora_merge, rename, transform
from ...errors import ConfigError
from ...options import LoadOptions
from ...tensors import open_source, resolve
from . import checkpoint as llava_checkpoint
from .checkpoint import TOWER, UNUSED_CLIP, OriginalCheckpoint
from .train_outputs import RECORD, TOKENIZER_FILES, base_fingerprint


def check_pair(adapter: Path, base: Path) -> str | None:
    """Refuse the recurring mix-ups before reading a tensor; returns a note, or None.

    Raises:
        ConfigError: the adapter is no LoRA run, the base is an adapter, or the base is not the one trained on.
    """
    form = llava_checkpoint.form_of(adapter)
    if form != "lora":
        what = {"projector": "a stage-1 projector (mm_projector.bin): nothing to merge; use it with --model-base",
                "full": "a full model already: nothing to merge"}.get(form, "not a LoRA run")
        raise ConfigError(f"{adapter} is {what}",
                          hint="merge-lora takes the folder with adapter_config.json + non_lora_trainables.bin")
    if llava_checkpoint.form_of(base) in ("lora", "projector"):
        raise ConfigError(f"--base {base} is itself a {llava_checkpoint.form_of(base)} folder, not a base model",
                          hint="ADAPTER is the LoRA run (LLaVA's --model-path); --base is the model it was trained "
                               "on (LLaVA's --model-base)")
    record = adapter / RECORD
    if not record.exists():
        return f"{adapter} has no {RECORD} (not trained by vlmkit): the base cannot be checked"
    info = json.loads(record.read_text())
    expected = info.get("base_fingerprint")
    actual = base_fingerprint(open_source(base))
    if expected and expected != actual:
        raise ConfigError(f"--base {base} is not the model {adapter} was trained on ({info.get('base')}): its weights "
                          "differ, and the merged model would produce garbled output",
                          hint=f"pass --base {info.get('base')}")
    return None


def original_rules(ckpt: OriginalCheckpoint, tower_trained: bool) -> list:
    """Full original checkpoint names out; LoRA merged; the CLIP folder's tensors dropped."""
    lora = [transform([m + ".weight", m + ".lora_A.weight", m + ".lora_B.weight"], m + ".weight",
                      lora_merge(ckpt.lora.scale)) for m in ckpt.lora.modules]
    tower = [] if tower_trained else [drop(TOWER + "{rest:path}", why="the vision tower stays in its CLIP folder "
                                                                      "(mm_vision_tower), as in the released models")]
    return [
        drop(UNUSED_CLIP + "{rest:path}", why="only CLIP's vision tower is part of LLaVA"),
        drop("model.layers.{layer}.self_attn.rotary_emb.inv_freq", why="recomputed from rope_theta at load"),
        *tower,
        *lora,
        rename("{name:path}", "{name:path}"),
    ]


def _tower_trained(adapter: Path, base: Path) -> bool:
    trained = open_source(adapter / "non_lora_trainables.bin").keys()
    return any("vision_tower." in k for k in trained) or any(k.startswith(TOWER) for k in open_source(base).keys())


def _write_original_extras(folder: Path, adapter: Path, ckpt: OriginalCheckpoint, dtype: str) -> None:
    config = json.loads((adapter / "config.json").read_text())
    config["torch_dtype"] = dtypes.config_name(dtype)  # what was written, not what the run trained in
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (ckpt.tokenizer_folder / name).exists():
            shutil.copyfile(ckpt.tokenizer_folder / name, folder / name)


def merge_lora(adapter: str | Path, base: str | Path, output: str | Path, *, format: str = "original",
               options: LoadOptions | None = None, force: bool = False, progress=None,
               announce: Callable[[str], None] | None = None) -> engine.Result:
    """Merge the LoRA run ``adapter`` into ``base`` and write one standalone folder (``vlmkit.train.merge_lora``).

    Args:
        adapter: the LoRA run folder (``adapter_config.json``, ``adapter_model.safetensors``,
            ``non_lora_trainables.bin``, ``config.json``).
        base: the model it was trained on.
        output: the new folder (refused if it exists, unless ``force``).
        format: "original" (LLaVA layout) or "transformers" (llava-hf layout with processor).
        options: loading options (``--vision-tower`` where the CLIP folder moved, ``--dtype``).
        progress: as ``engine.run``'s.
        announce: receives ``check_pair``'s note (the base cannot be checked).

    Raises:
        ConfigError: wrong pair (before anything is read); PlanError; OutputError.
    """
    adapter, base = resolve(adapter), resolve(base)
    note = check_pair(adapter, base)
    if note and announce:
        announce(note)
    options = LoadOptions(**{**(options.__dict__ if options else {}), "model_base": str(base)})
    if format == "transformers":
        from .convert import conversion

        return engine.run(conversion(adapter, options), output, dtype=options.dtype, force=force, progress=progress)
    ckpt = llava_checkpoint.open_original(adapter, options)
    rules = original_rules(ckpt, _tower_trained(adapter, base))
    summary = f"LoRA {adapter} merged into {base} (scale {ckpt.lora.scale:g}, {len(ckpt.lora.modules)} module kinds)"
    dtype = options.dtype or ckpt.lora.base_dtype
    conversion = Conversion(ckpt.source, rules, summary=summary, dtype=dtype,
                            write_extras=lambda folder: _write_original_extras(folder, adapter, ckpt, dtype))
    return engine.run(conversion, output, dtype=options.dtype, force=force, progress=progress)
