"""Original BLIP-2 OPT-6.7B (LAVIS ``.pth``) -> transformers with ``vlmkit convert``: peak RSS and wall time.

Synthesises (random values, no model code) ``{"model": original_model.state_dict()}`` of
LAVIS's ``blip2_opt`` with ``opt_model="facebook/opt-6.7b"``, in one zip-format ``.pth`` as
``torch.save`` writes it, with LAVIS's dtypes: the EVA ViT-g's convolution and linear layers in
fp16 (``convert_weights_to_fp16``), its norms, ``q_bias``/``v_bias``, ``cls_token``, ``pos_embed``
in fp32; the Q-Former, ``query_tokens``, ``ln_vision`` and ``opt_proj`` in fp32; OPT-6.7B in fp16.
The file is written tensor by tensor (the pickle first, then each storage record), so making it
never holds the model either. Beside it, an ``opt-6.7b`` folder with config and tokenizer only.

Then, each as its own process under ``/usr/bin/time -v``: ``cp`` of the ``.pth``, and
``vlmkit convert BLIP2.pth OUT --language-model OPT --config HEADS`` (the full conversion:
renames, the q/v bias fusion, drops, config and processor).

Targets: peak RSS <= 1 GiB and wall time <= 1.2 x the copy's (issue 22; issue 4 asked <= 2 GB).

Usage:
    .venv/bin/python benchmarks/convert_blip2.py                # full size (~15.8 GB; needs ~50 GB free)
    .venv/bin/python benchmarks/convert_blip2.py --scale 0.05   # quick run (every width x 0.05)
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from convert_stream import drop_caches, timed
from vlmkit.families.blip2 import tiny
from vlmkit.tensors import open_source

F16, F32 = torch.float16, torch.float32


def blip2_opt67_specs(scale: float) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """LAVIS Blip2OPT(opt-6.7b).state_dict(): EVA ViT-g 39 x 1408, Q-Former 12 x 768, OPT-6.7B 32 x 4096."""
    w = lambda x: max(8, int(x * scale))  # noqa: E731
    vh, vf, qh, qf, h, ff = w(1408), w(6144), w(768), w(3072), w(4096), w(16384)
    specs = [("visual_encoder.cls_token", (1, 1, vh), F32), ("visual_encoder.pos_embed", (1, 257, vh), F32),
             ("visual_encoder.patch_embed.proj.weight", (vh, 3, 14, 14), F16),
             ("visual_encoder.patch_embed.proj.bias", (vh,), F16)]
    for i in range(39):
        p = f"visual_encoder.blocks.{i}."
        specs += [(p + "norm1.weight", (vh,), F32), (p + "norm1.bias", (vh,), F32),
                  (p + "attn.q_bias", (vh,), F32), (p + "attn.v_bias", (vh,), F32),
                  (p + "attn.qkv.weight", (3 * vh, vh), F16),
                  (p + "attn.proj.weight", (vh, vh), F16), (p + "attn.proj.bias", (vh,), F16),
                  (p + "norm2.weight", (vh,), F32), (p + "norm2.bias", (vh,), F32),
                  (p + "mlp.fc1.weight", (vf, vh), F16), (p + "mlp.fc1.bias", (vf,), F16),
                  (p + "mlp.fc2.weight", (vh, vf), F16), (p + "mlp.fc2.bias", (vh,), F16)]

    def linear(name, d_out, d_in, dtype):
        return [(name + ".weight", (d_out, d_in), dtype), (name + ".bias", (d_out,), dtype)]

    def norm(name, width, dtype):
        return [(name + ".weight", (width,), dtype), (name + ".bias", (width,), dtype)]

    specs += norm("ln_vision", vh, F32) + [("query_tokens", (1, 32, qh), F32),
                                           ("Qformer.bert.embeddings.position_ids", (1, 512), torch.int64)]
    specs += norm("Qformer.bert.embeddings.LayerNorm", qh, F32)

    for i in range(12):
        p = f"Qformer.bert.encoder.layer.{i}."
        for kind, kv in (("attention", qh),) + ((("crossattention", vh),) if i % 2 == 0 else ()):
            specs += linear(p + f"{kind}.self.query", qh, qh, F32) + linear(p + f"{kind}.self.key", qh, kv, F32)
            specs += linear(p + f"{kind}.self.value", qh, kv, F32) + linear(p + f"{kind}.output.dense", qh, qh, F32)
            specs += norm(p + f"{kind}.output.LayerNorm", qh, F32)
        specs += linear(p + "intermediate_query.dense", qf, qh, F32) + linear(p + "output_query.dense", qh, qf, F32)
        specs += norm(p + "output_query.LayerNorm", qh, F32)
    d = "opt_model.model.decoder."
    specs += [(d + "embed_tokens.weight", (50272, h), F16), (d + "embed_positions.weight", (2050, h), F16)]
    for i in range(32):
        p = f"{d}layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += linear(p + f"self_attn.{n}", h, h, F16)
        specs += norm(p + "self_attn_layer_norm", h, F16) + linear(p + "fc1", ff, h, F16)
        specs += linear(p + "fc2", h, ff, F16) + norm(p + "final_layer_norm", h, F16)
    specs += norm(d + "final_layer_norm", h, F16) + [("opt_model.lm_head.weight", (50272, h), F16)]
    specs += linear("opt_proj", h, qh, F32)
    return specs


class _Tensor:
    """A tensor not yet made: pickled as torch pickles a tensor, its bytes written later."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.key, self.shape, self.dtype = key, shape, dtype


class _Storage:
    def __init__(self, tensor: _Tensor):
        self.tensor = tensor


STORAGE_TYPES = {F16: torch.HalfStorage, F32: torch.FloatStorage, torch.int64: torch.LongStorage}


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            stride = tuple(int(torch.tensor(obj.shape[i + 1:]).prod()) for i in range(len(obj.shape)))
            return torch._utils._rebuild_tensor_v2, (_Storage(obj), 0, obj.shape, stride, False, OrderedDict())
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            t = obj.tensor
            return "storage", STORAGE_TYPES[t.dtype], t.key, "cpu", int(torch.tensor(t.shape).prod())
        return None


def write_pth(path: Path, specs) -> None:
    """``torch.save({"model": state_dict})``'s zip layout, written one tensor at a time (random values)."""
    refs = OrderedDict((name, _Tensor(str(i), shape, dtype)) for i, (name, shape, dtype) in enumerate(specs))
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({"model": refs})
    generator = torch.Generator().manual_seed(0)
    with torch.serialization._open_zipfile_writer(str(path)) as writer:
        data = buffer.getvalue()
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for name, ref in refs.items():
            if ref.dtype == torch.int64:
                tensor = torch.arange(ref.shape[-1]).reshape(ref.shape)
            else:
                tensor = (torch.randn(ref.shape, generator=generator) * 0.02).to(ref.dtype)
            writer.write_record(f"data/{ref.key}", tensor.untyped_storage(), tensor.nbytes)
            del tensor


def make_opt_folder(folder: Path, specs) -> None:
    """``facebook/opt-6.7b``'s config and (OPT-layout) tokenizer; no weights: the .pth holds them."""
    shapes = {n: s for n, s, _ in specs}
    h = shapes["opt_model.model.decoder.embed_tokens.weight"][1]
    sizes = tiny.TinySizes(lm_hidden=h, lm_layers=32, lm_heads=32 if h % 32 == 0 else 1,
                           lm_ffn=shapes["opt_model.model.decoder.layers.0.fc1.weight"][0])
    tiny.make_language_model(folder, "opt", sizes, weights=False)
    config = json.loads((folder / "config.json").read_text())
    config.update(max_position_embeddings=2048, torch_dtype="float16", _name_or_path="facebook/opt-6.7b")
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-blip2"))
    parser.add_argument("--scale", type=float, default=1.0, help="width scale of every tensor (1.0 = real 6.7B)")
    parser.add_argument("--no-copy", action="store_true", help="skip the cp reference run (saves disk)")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    specs = blip2_opt67_specs(args.scale)
    shapes = {n: shape for n, shape, _ in specs}
    qh, vh = shapes["query_tokens"][2], shapes["visual_encoder.cls_token"][2]
    heads = {"vision_config": {"num_attention_heads": 16 if vh % 16 == 0 else 1},
             "qformer_config": {"num_attention_heads": 12 if qh % 12 == 0 else 1}}
    try:
        (work / "lavis").mkdir(parents=True)
        src = work / "lavis" / "blip2_opt6.7b_full.pth"
        print(f"synthesising {len(specs)} tensors into {src} ...", flush=True)
        write_pth(src, specs)
        make_opt_folder(work / "opt-6.7b", specs)
        (work / "heads.json").write_text(json.dumps(heads))
        size = src.stat().st_size
        print(f"synthesised {size / 1e9:.2f} GB", flush=True)
        rows = []
        cached = drop_caches()
        if not args.no_copy:
            rows.append(("cp (the .pth)", *timed(["cp", str(src), str(work / "copy.pth")])))
            (work / "copy.pth").unlink()
            drop_caches()
        vlmkit = str(Path(sys.executable).parent / "vlmkit")
        rows.append(("vlmkit convert (LAVIS .pth -> transformers)",
                     *timed([vlmkit, "convert", str(src), str(work / "out"), "--quiet", "--language-model",
                             str(work / "opt-6.7b"), "--config", str(work / "heads.json")])))
        out = open_source(work / "out")
        written = len(out.keys())
        out.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nsource: {size / 1e9:.2f} GB .pth, {len(specs)} tensors -> {written}; "
          f"page cache dropped: {'yes' if cached else 'no'}")
    copy = rows[0][1] if not args.no_copy else None
    print("| step | wall time (s) | x copy | peak RSS (GiB) |")
    print("|---|---:|---:|---:|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {f'{wall / copy:.2f}' if copy else '-'} | {rss:.2f} |")
    wall, rss = rows[-1][1:]
    print(f"\ntargets: peak RSS <= 1 GiB (issue 22; 2 GiB in issue 4): {'met' if rss <= 1.0 else 'NOT met'}; "
          f"wall <= 1.2 x the copy (issue 22): "
          f"{'not measured (--no-copy)' if copy is None else 'met' if wall <= 1.2 * copy else 'NOT met'}")


if __name__ == "__main__":
    main()
