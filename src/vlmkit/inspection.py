"""``vlmkit inspect``: what a checkpoint is, from headers alone."""

from __future__ import annotations

from pathlib import Path

from . import families
from .conversion.plan import human_bytes
from .tensors import open_source, resolve

# Config fields worth a line in the summary, when present (top level or in sub-configs).
SUMMARY_FIELDS = (
    "model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings", "torch_dtype", "dtype",
    "mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
    "image_aspect_ratio", "mm_patch_merge_type", "image_size", "patch_size",
)


def summarise_config(config: dict | None) -> dict:
    if not config:
        return {}
    out = {k: config[k] for k in SUMMARY_FIELDS if config.get(k) is not None}
    for sub in ("text_config", "vision_config", "qformer_config"):
        if isinstance(config.get(sub), dict):
            out[sub] = {k: v for k, v in config[sub].items() if k in SUMMARY_FIELDS and v is not None}
    return out


def inspect_checkpoint(path: str | Path) -> dict:
    """Describe a checkpoint without reading tensor data.

    Returns:
        A JSON-ready dict: path, format, family, config summary, files, tensors
        (name, shape, dtype, bytes, file), total parameters and bytes.
    """
    local = resolve(path)
    source = open_source(local)
    try:
        config = families.read_config(local)
        found = families.find(local, config)
        tensors = [source.info(n) for n in source.keys()]
        if source.format == "gguf":
            summary = {k: v for k, v in source.fields.items() if not isinstance(v, list) or len(v) <= 16}
        else:
            summary = summarise_config(config)
        report = {
            "path": str(local),
            "format": source.format,
            "family": found.name if found else None,
            "config": summary,
            "files": [str(f.relative_to(local)) if local.is_dir() else f.name for f in source.files()],
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes, "file": t.file.name}
                for t in tensors
            ],
            "parameters": sum(t.numel for t in tensors),
            "bytes": sum(t.nbytes for t in tensors),
        }
        if families.can(found, "describe"):
            report["details"] = found.family.describe(found)
        template = _chat_template_name(local)
        if template:
            report.setdefault("details", {})["template"] = template
        return report
    finally:
        source.close()


def _chat_template_name(folder: Path) -> str | None:
    """The conversation template of a converted folder: vlmkit's marker, or 'the folder's own chat template'."""
    from .runtime.templates import marked_name, read_chat_template

    template = read_chat_template(folder)
    if template is None:
        return None
    return marked_name(template) or "the folder's own chat template"


def render(report: dict, *, limit: int | None = None) -> str:
    """The human-readable form of ``inspect_checkpoint``'s report."""
    lines = [
        f"path:    {report['path']}",
        f"format:  {report['format']} ({len(report['files'])} file(s))",
        f"family:  {report['family'] or 'none (a checkpoint vlmkit converts tensor by tensor as it is)'}",
    ]
    for key, value in report["config"].items():
        lines.append(f"  {key}: {value}")
    for key, value in (report.get("details") or {}).items():
        lines.append(f"  {key}: {value}")
    tensors = report["tensors"]
    shown = tensors if limit is None else tensors[:limit]
    width = max((len(t["name"]) for t in shown), default=4)
    lines.append(f"{'name':<{width}}  {'shape':<22} {'dtype':<6} {'bytes':>10}")
    for t in shown:
        lines.append(f"{t['name']:<{width}}  {str(t['shape']):<22} {t['dtype']:<6} {human_bytes(t['bytes']):>10}")
    if len(shown) < len(tensors):
        lines.append(f"... {len(tensors) - len(shown)} more (use --all)")
    lines.append(f"{len(tensors)} tensors, {report['parameters']:,} parameters, {human_bytes(report['bytes'])}")
    return "\n".join(lines)
