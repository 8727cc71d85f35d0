"""The model card (README.md) of every folder vlmkit writes, rendered from the manifest.

The card is data, not prose per family: what the model is comes from the folder's own
config and processor files (or the GGUF metadata in the plan), where it came from and what
changed from the manifest (source files and hashes, command, plan), the parity report from
``vlmkit verify`` when one ran. What differs per kind of output (the Hub's pipeline tag, the
commands that run it, the known differences from the original) is a ``Kind``: the folder's family
says it (its ``card_kind`` capability); a folder no family claims gets one of the plain kinds here.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..conversion import gguf_folder, output
from ..conversion.plan import human_bytes


@dataclass(frozen=True)
class Kind:
    """What the card says about one kind of output.

    Attributes:
        title: what the model is, in words.
        pipeline_tag: the Hub's task (None: no task fits).
        library: the Hub's ``library_name``.
        tags: Hub tags besides ``vlmkit``.
        run: keys of ``SNIPPETS`` that run this folder, in the order shown.
        differences: known differences from the original model (kept in step with ``vlmkit verify``'s notes).
        prompt: the question form the model is asked in, ``{}`` for the question (BLIP-2: LAVIS's QA prompt).
    """

    title: str
    pipeline_tag: str | None
    library: str
    tags: tuple[str, ...]
    run: tuple[str, ...]
    differences: tuple[str, ...] = ()
    prompt: str | None = None


# folders no family claims
TENSORS = Kind("tensors in safetensors (no transformers config)", None, "safetensors", (), ())
GGUF = Kind("a language model as GGUF for llama.cpp", "text-generation", "gguf", ("gguf", "llama.cpp"), ("llama-cli",))

# {path}: the folder's name (the commands run from the folder that holds it); {model}/{mmproj}: GGUF files;
# {prompt}: the question as the model is asked it (Kind.prompt)
SNIPPETS: dict[str, tuple[str, str]] = {
    "transformers-chat": ("python", '''from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

path = "{path}"
processor = AutoProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path)
question = {{"type": "text", "text": "What is shown in this image?"}}
messages = [{{"role": "user", "content": [{{"type": "image"}}, question]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("image.jpg"), text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''),
    "transformers-blip2": ("python", '''from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

path = "{path}"
processor = AutoProcessor.from_pretrained(path)
model = Blip2ForConditionalGeneration.from_pretrained(path)
inputs = processor(images=Image.open("image.jpg"), text="{prompt}", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(processor.decode(output[0], skip_special_tokens=True))'''),
    "transformers-flava": ("python", '''from PIL import Image
from transformers import AutoProcessor, FlavaModel

path = "{path}"
processor = AutoProcessor.from_pretrained(path)
model = FlavaModel.from_pretrained(path)
inputs = processor(images=Image.open("image.jpg"), text=["a photo of a cat"], return_tensors="pt", padding=True)
outputs = model(**inputs)
print(outputs.image_embeddings.shape, outputs.text_embeddings.shape, outputs.multimodal_embeddings.shape)'''),
    "transformers-clip": ("python", '''from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

path = "{path}"
processor = CLIPImageProcessor.from_pretrained(path)
model = CLIPModel.from_pretrained(path)
inputs = processor(images=Image.open("image.jpg"), return_tensors="pt")
print(model.get_image_features(**inputs))'''),
    "vlmkit-chat": ("sh", 'vlmkit chat {path} --image image.jpg --prompt "What is shown in this image?" '
                          '--temperature 0 --max-new-tokens 64'),
    "vllm": ("sh", "vllm serve {path}"),
    "to-gguf": ("sh", "vlmkit convert {path} {path}-gguf --to gguf --dtype q8_0   # for llama.cpp"),
    "llama-mtmd-cli": ("sh", 'llama-mtmd-cli -m {path}/{model} --mmproj {path}/{mmproj} --image image.jpg '
                             '-p "What is shown in this image?" --temp 0 --jinja'),
    "llama-cli": ("sh", 'llama-cli -m {path}/{model} -p "Hello" --temp 0'),
    "llama-server": ("sh", "llama-server -m {path}/{model} --mmproj {path}/{mmproj} --jinja"),
    "vlmkit-serve-llama": ("sh", "vlmkit serve {path} --engine llama.cpp"),
}

# preprocessor_config.json fields that decide the pixels
IMAGE_FIELDS = ("image_processor_type", "size", "crop_size", "do_center_crop", "do_resize", "resample", "do_pad",
                "image_mean", "image_std", "image_grid_pinpoints", "codebook_image_size")
GGUF_MODEL_KEYS = ("general.architecture", "general.name", "block_count", "embedding_length", "head_count",
                   "context_length", "projector_type", "image_size", "patch_size", "feature_layer", "image_mean",
                   "image_std")


def checked_manifest(folder: str | Path) -> dict:
    """The manifest of ``folder`` once every file was re-hashed against it (``ManifestError`` if one differs)."""
    output.verify_files(Path(folder))
    return output.read_manifest(Path(folder))


def write(folder: str | Path, report=None, *, manifest: dict | None = None) -> Path:
    """Render the card of a finished folder again (with ``report``, a ``parity.Report``) and update its manifest.

    Args:
        manifest: the folder's manifest as ``checked_manifest`` returned it (or as the conversion that just
            wrote the folder left it); None: the folder is checked here.

    Raises:
        ManifestError: the folder no longer matches its manifest (nothing is written: the card
            would vouch for bytes that are not the ones converted).
    """
    folder = Path(folder)
    if manifest is None:
        manifest = checked_manifest(folder)
    if report is not None:
        manifest["parity"] = report.to_dict()
    output.rewrite_file(folder, manifest, output.CARD, render(manifest, folder).encode("utf-8"))
    return folder / output.CARD


def kind_of(manifest: dict, folder: Path) -> Kind:
    """What ``folder`` is, for its card: its family's ``card_kind`` (a transformers folder of the family, or the
    GGUF files it wrote), else a plain kind from the manifest."""
    from .. import families

    found = families.find(Path(folder))
    if families.can(found, "card_kind"):
        return found.family.card_kind(found)
    return GGUF if (manifest.get("provenance") or {}).get("output") == "gguf" else TENSORS


def render(manifest: dict, folder: Path) -> str:
    """The model card of ``folder`` from its manifest (with ``parity`` once ``vlmkit verify`` wrote it)."""
    folder = Path(folder)
    kind = kind_of(manifest, folder)
    source, prov = manifest.get("source") or {}, manifest.get("provenance") or {}
    # while converting, the folder is the temporary one beside the destination (see output.atomic_folder)
    name = folder.name[1:].split(".vlmkit-tmp-")[0] if ".vlmkit-tmp-" in folder.name else folder.name
    sections = [
        _front_matter(kind, source),
        f"# {name}\n\n{kind.title}, converted by vlmkit "
        f"{manifest.get('vlmkit_version', __version__)} on {manifest.get('created', '?')}."
        + (f"\n\n{prov['summary']}." if prov.get("summary") else ""),
        _model_section(manifest, folder, kind),
        _provenance_section(manifest),
        _changes_section(manifest),
        _differences_section(kind),
        _parity_section(manifest, name),
        _files_section(manifest),
        _run_section(kind, manifest, name),
    ]
    return "\n\n".join(s.rstrip() for s in sections if s) + "\n"


def _front_matter(kind: Kind, source: dict) -> str:
    import yaml

    meta: dict = {"library_name": kind.library}
    if kind.pipeline_tag:
        meta["pipeline_tag"] = kind.pipeline_tag
    if source.get("hub_id"):
        meta["base_model"] = source["hub_id"]
        if kind.library == "gguf":
            meta["base_model_relation"] = "quantized"
    meta["tags"] = ["vlmkit", *kind.tags]
    meta.update(source.get("license") or {})
    text = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    if not source.get("license"):
        text += "# license: the source states none; add the original model's license here before publishing\n"
    return f"---\n{text}---"


def _model_section(manifest: dict, folder: Path, kind: Kind) -> str:
    lines = ["## Model", ""]
    if kind.library == "gguf":
        for f in (manifest.get("plan") or {}).get("files") or []:
            meta = f.get("metadata") or {}
            shown = {k: v for k, v in meta.items() if any(k == g or k.endswith("." + g) for g in GGUF_MODEL_KEYS)}
            lines.append(f"- `{f['file']}` ({f['arch']}, {len(f.get('tensors') or [])} tensors): "
                         + ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
        template = next((m.get("tokenizer.chat_template") for f in (manifest.get("plan") or {}).get("files") or []
                         if (m := f.get("metadata") or {}).get("tokenizer.chat_template")), None)
    else:
        from ..inspection import summarise_config

        config = _json(folder / "config.json")
        for field, value in summarise_config(config).items():
            lines.append(f"- {field}: " + (", ".join(f"{k}={_short(v)}" for k, v in value.items())
                                           if isinstance(value, dict) else _short(value)))
        image = _json(folder / "preprocessor_config.json") or {}
        if image:
            lines.append("- image preprocessing: " + ", ".join(f"{k}={_short(image[k])}" for k in IMAGE_FIELDS
                                                               if k in image))
        from ..runtime.templates import read_chat_template

        template = read_chat_template(folder)
    if template:
        from ..runtime.templates import marked_name

        lines.append(f"- chat template: {marked_name(template) or 'the Jinja template in the folder'}")
    return "\n".join(lines)


def _provenance_section(manifest: dict) -> str:
    source, prov = manifest.get("source") or {}, manifest.get("provenance") or {}
    lines = ["## Provenance", "",
             f"- source: `{_local_name(source.get('path'))}` ({source.get('format')})"
             + (f", from the Hub repository [{source['hub_id']}](https://huggingface.co/{source['hub_id']})"
                if source.get("hub_id") else ""),
             f"- source listing fingerprint (names, shapes, dtypes, file sizes): `{source.get('fingerprint')}`"]
    for label, key in (("vision tower", "vision_tower"), ("base language model", "model_base")):
        if prov.get(key):
            lines.append(f"- {label}: `{_local_name(prov[key])}`")
    lines.append(f"- vlmkit {manifest.get('vlmkit_version')}; command: "
                 + (f"`{_public_command(prov['command'])}`" if prov.get("command") else "the Python API"))
    if prov.get("config_override"):
        lines.append(f"- `--config` overrode: `{json.dumps(prov['config_override'], sort_keys=True)}`")
    files = source.get("files") or []
    if files:
        lines += ["", "| source file | bytes | sha256 |", "|---|---:|---|"]
        lines += [f"| `{_source_file(f['path'], source.get('path'))}` | {f['bytes']} | `{f['sha256']}` |"
                  for f in files]
    return "\n".join(lines)


def _changes_section(manifest: dict) -> str:
    plan, prov = manifest.get("plan") or {}, manifest.get("provenance") or {}
    lines = ["## What changed on the way", ""]
    if "files" in plan:  # GGUF: the first stage (original -> transformers names), then the GGUF files
        if plan.get("first_stage"):
            lines += _plan_changes(plan["first_stage"], prov)
        lines += _gguf_changes(plan, prov)
    else:
        lines += _plan_changes(plan, prov)
    if len(lines) == 2:
        lines.append("- nothing but names and layout")
    return "\n".join(lines)


def _plan_changes(plan: dict, prov: dict) -> list[str]:
    """A ``Plan.to_dict()``: casts, created tensors, the ops that change values, drops with their reasons."""
    casts: dict[tuple[str, str], int] = {}
    created: list[str] = []
    ops: dict[str, int] = {}
    for step in plan.get("steps") or []:
        src = step["sources"][0]["dtype"] if step["sources"] else "new"
        for t in step["targets"]:
            casts[(src, t["dtype"])] = casts.get((src, t["dtype"]), 0) + 1
        if not step["sources"]:
            created += [t["name"] for t in step["targets"]]
        for op in step.get("ops") or []:
            if not op.startswith("create "):
                ops[op] = ops.get(op, 0) + 1
    drops: dict[str, list[str]] = {}
    for d in plan.get("drops") or []:
        drops.setdefault(d["why"], []).append(d["name"])
    asked = prov.get("dtype")
    lines = [f"- dtype: {'cast to ' + asked if asked else 'as stored'}; "
             + ", ".join(f"{a} -> {b}: {n} tensor(s)" if a != b else f"{a}: {n} tensor(s)"
                         for (a, b), n in sorted(casts.items()))]
    if created:
        lines.append(f"- created (the source has no such tensor): {_names(created)}")
    return lines + _op_lines(ops, prov) + [f"- dropped {len(n)} tensor(s) ({_names(n)}): {why}"
                                           for why, n in drops.items()]


def _gguf_changes(plan: dict, prov: dict) -> list[str]:
    """The type asked for, each tensor in another type with the reason, the ops, and what no file holds."""
    lines = [f"- GGUF type: {plan.get('type')}"]
    reasons: dict[tuple[str, str], list[str]] = {}
    ops: dict[str, int] = {}
    written = {name for f in plan["files"] for t in f.get("tensors") or [] for name in t.get("from") or []}
    dropped: dict[str, list[str]] = {}
    for f in plan["files"]:
        for t in f.get("tensors") or []:
            if t.get("why"):
                reasons.setdefault((t["type"], t["why"]), []).append(t["name"])
            for op in t.get("ops") or []:
                ops[op] = ops.get(op, 0) + 1
        for d in f.get("drops") or []:
            if d["name"] not in written:  # one file leaves out what another writes: only what no file holds
                dropped.setdefault(d["name"], []).append(d["why"])
    lines += [f"- {len(n)} tensor(s) in {ty} instead ({_names(n)}): {why}" for (ty, why), n in reasons.items()]
    lines += _op_lines(ops, prov)
    by_reason: dict[str, list[str]] = {}
    for name, whys in dropped.items():
        by_reason.setdefault("; ".join(dict.fromkeys(whys)), []).append(name)
    return lines + [f"- dropped {len(n)} tensor(s) ({_names(n)}): {why}" for why, n in by_reason.items()]


def _op_lines(ops: dict[str, int], prov: dict) -> list[str]:
    lines = []
    for op, n in ops.items():
        line = f"- {op}: {n} tensor(s)"
        if op.startswith("rows "):
            line += f" (vocabulary growth; new rows drawn at random with `--seed {prov.get('seed', 0)}`)"
        lines.append(line)
    return lines


def _differences_section(kind: Kind) -> str:
    if not kind.differences:
        return ""
    lines = ["## Known differences from the original", ""]
    lines += [f"- {d}" for d in kind.differences]
    return "\n".join(lines)


def _parity_section(manifest: dict, name: str) -> str:
    report = manifest.get("parity")
    assumptions = _assumptions(manifest)
    lines = ["## Parity with the original", ""]
    if report is None:
        prov = manifest.get("provenance") or {}
        command = ["vlmkit", "verify", _local_name((manifest.get("source") or {}).get("path") or "ORIGINAL"), name]
        for flag, key in (("--vision-tower", "vision_tower"), ("--model-base", "model_base")):
            command += [flag, _local_name(prov[key])] if prov.get(key) else []
        lines.append(f"Not verified yet. `{shlex.join(command + ['--write-card'])}` runs the original and this "
                     "folder on the same probes and writes the report here.")
    else:
        from ..parity.report import Report

        body = Report.from_dict(report).to_markdown()
        lines.append(body.replace("# ", "### ", 1).strip())
    if assumptions:
        lines += ["", "The conversion and the report rest on these assumptions (values no file of the source states):",
                  ""] + [f"- {a}" for a in assumptions]
    return "\n".join(lines)


def _assumptions(manifest: dict) -> list[str]:
    """Assumed values recorded by the plan, the manifest or the report (``assumptions: list[str]``), once each."""
    found: list[str] = []
    for holder in (manifest, manifest.get("plan") or {}, manifest.get("parity") or {}):
        for a in holder.get("assumptions") or []:
            if str(a) not in found:
                found.append(str(a))
    return found


def _files_section(manifest: dict) -> str:
    files = {k: v for k, v in (manifest.get("files") or {}).items() if k != output.CARD}
    lines = ["## Files", "",
             f"`{output.MANIFEST}` lists every file with its sha256 (this card too); "
             "`vlmkit verify-files FOLDER` re-checks them.", "",
             "| file | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| `{rel}` | {e['bytes']} ({human_bytes(e['bytes'])}) | `{e['sha256']}` |" for rel, e in files.items()]
    return "\n".join(lines)


def _run_section(kind: Kind, manifest: dict, name: str) -> str:
    if not kind.run:
        return ""
    files = [f["file"] for f in (manifest.get("plan") or {}).get("files") or []]
    mmproj = next((f for f in files if gguf_folder.role(f) == gguf_folder.MMPROJ), "")
    model = next((f for f in files if gguf_folder.role(f) == gguf_folder.MODEL), "")
    lines = ["## How to run", "",
             f"Download the folder (`hf download OWNER/REPO --local-dir {name}`), then, from the folder that holds "
             f"`{name}` and with any photo as `image.jpg`:"]
    prompt = kind.prompt.format("What is shown in this image?") if kind.prompt else ""
    for key in kind.run:
        lang, code = SNIPPETS[key]
        lines += ["", f"```{lang}", code.format(path=name, model=model, mmproj=mmproj, prompt=prompt), "```"]
    return "\n".join(lines)


# The card is published: a local path shows as its name only (the manifest keeps the full path).


def _is_local_path(value: str) -> bool:
    """An absolute or explicitly relative path, or one that exists here (a hub id ``owner/name`` stays)."""
    return value.startswith(("/", "~", "./", "../")) or ("/" in value and Path(value).exists())


def _local_name(value: str | None) -> str | None:
    return Path(value.rstrip("/")).name or value if value and _is_local_path(value) else value


def _source_file(path: str, source: str | None) -> str:
    """A source file relative to the source folder, else its name."""
    if source and Path(source).is_absolute() and Path(path) != Path(source) and Path(path).is_relative_to(source):
        return Path(path).relative_to(source).as_posix()
    return Path(path).name


def _public_command(command: str) -> str:
    """The command line with each local path (also in ``--flag=PATH``) reduced to its name."""
    def public(arg: str) -> str:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--"):
            return f"{flag}={_local_name(value)}"
        return _local_name(arg)

    try:
        return shlex.join(public(a) for a in shlex.split(command))
    except ValueError:  # not shell syntax: nothing to reduce reliably
        return command


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def _names(names: list[str]) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")
