"""The ``vlmkit`` command: a table of contents over the library.

Each command parses its arguments, calls one library function and renders the result.
Errors of type ``VlmkitError`` are shown as one message plus a hint (exit status 1);
``--debug`` or ``VLMKIT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from pathlib import Path

from . import limits
from ._version import __version__
from .errors import VlmkitError
from .console import progress_bar
from .options import LoadOptions, add_load_arguments, refuse_unused

COMMANDS = []


def command(name: str, help: str, examples: list[str]):
    """Register ``fn(args)`` as a sub-command with its arguments set up by ``fn.arguments``."""

    def wrap(fn):
        COMMANDS.append((name, help, examples, fn))
        return fn

    return wrap


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / ``"1000"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".find(unit[:1]) + 1 if unit else 0
    return int(float(m.group(1)) * base**power)


def shard_size(text: str) -> int:
    """``--max-shard-size``: a size (``parse_size``) within ``limits.MAX_SHARD_SIZE``."""
    return limits.MAX_SHARD_SIZE.arg(str(parse_size(text)))


def body_size(text: str) -> int:
    """``--max-body-size``: a size of at least one byte (0 would refuse every request)."""
    return limits.integer(1)(str(parse_size(text)))


# ------------------------------------------------------------------------ inspect


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a checkpoint file, a folder or a hub id")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all", action="store_true", help="list every tensor (default: the first 40)")


@command("inspect", "describe a checkpoint from its headers: format, family, config, tensors",
         ["vlmkit inspect llava-v1.5-7b/", "vlmkit inspect model.gguf --json"])
def cmd_inspect(args) -> int:
    from . import api
    from .inspection import render

    report = api.inspect(args.path)
    print(json.dumps(report, indent=1) if args.json else render(report, limit=None if args.all else 40))
    return 0


# ------------------------------------------------------------------------ convert

# loading options convert has no use for: not in --help, refused with the reason, never ignored
CONVERT_UNUSED = {"device": "converting streams the tensors from file to file on the CPU, and --verify runs "
                            "both models on the CPU in float32"}


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint file, folder or hub id")
    p.add_argument("destination", help="output folder (must not exist unless --force)")
    p.add_argument("--to", choices=["hf", "gguf"], default="hf",
                   help="output format: hf (transformers layout, the default) or gguf (llama.cpp: for LLaVA the "
                        "language model + the mmproj file; --dtype f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0, default f16)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB", help="bytes per shard (default: 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing destination (atomically)")
    p.add_argument("--json", action="store_true", help="print the plan / result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verify", action="store_true",
                   help="after converting, run `vlmkit verify` on the result and put its report in the model card")
    p.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="after converting (and verifying, if asked), upload the folder as `vlmkit push` does")
    _probe_arguments(p)
    add_load_arguments(p, CONVERT_UNUSED)
    gguf = p.add_argument_group("--to gguf")
    gguf.add_argument("--text-only", action="store_true",
                      help="CLIP: write only the text tower; LLaVA: only the language model (no mmproj)")
    gguf.add_argument("--vision-only", action="store_true", help="CLIP: write only the vision tower")
    gguf.add_argument("--image-mean", type=float, nargs=3, metavar=("R", "G", "B"),
                      help="image mean written to the GGUF (default: the model's preprocessor)")
    gguf.add_argument("--image-std", type=float, nargs=3, metavar=("R", "G", "B"),
                      help="image std written to the GGUF (default: the model's preprocessor)")
    gguf.add_argument("--mmproj-only", action="store_true",
                      help="LLaVA: write only the mmproj file (also the only file of a llava.projector input)")


@command("convert", "convert a checkpoint (plan checked before any byte is read; output written atomically)",
         ["vlmkit convert pytorch_model.bin out/ --dtype float16",
          "vlmkit convert llava-v1.5-7b/ llava-hf/ --dry-run",
          "vlmkit convert ckpt/ out/ --max-shard-size 2GB --force",
          "vlmkit convert llava-v1.5-7b/ llava-gguf/ --to gguf --dtype q8_0 --vision-tower clip-vit-large-patch14-336/",
          "vlmkit convert clip-vit-large-patch14/ clip-gguf/ --to gguf --vision-only --dtype f32",
          "vlmkit convert llava-v1.5-7b/ llava-hf/ --verify --push-to-hub me/llava-1.5-7b-hf"])
def cmd_convert(args) -> int:
    refuse_unused(args, "convert", CONVERT_UNUSED)
    if args.push_to_hub:  # the token and the repository id before any byte is converted
        from .publish.push import check_target

        check_target(args.push_to_hub, token=not args.dry_run)
    code = _convert(args)
    if args.push_to_hub and not args.dry_run:
        if code != 0:  # a conversion that failed its proof is not published
            print(f"not pushed to {args.push_to_hub}: the verification failed", file=sys.stderr)
            return code
        from .conversion import output

        # this run wrote the folder and its manifest (and the card, by an atomic rewrite): not hashed again
        return _push(args.destination, args.push_to_hub, manifest=output.read_manifest(Path(args.destination)))
    return code


def _convert(args) -> int:
    import shlex

    from . import api
    from .conversion import engine, output
    from .conversion.plan import human_bytes

    command = shlex.join(["vlmkit", *getattr(args, "argv", ["convert", "..."])])

    gguf_flags = [f for f in ("text_only", "vision_only", "image_mean", "image_std", "mmproj_only") if getattr(args, f)]
    if args.to == "gguf":
        from . import families
        from .conversion import gguf_folder, gguf_sink
        from .tensors import resolve

        type_name = gguf_sink.gguf_type(args.dtype).name  # --dtype names a GGUF type here (q8_0 ...), checked first
        options = LoadOptions.from_args(argparse.Namespace(**{**vars(args), "dtype": None}))
        gguf_options = gguf_sink.GGUFOptions(
            text_only=args.text_only, vision_only=args.vision_only, mmproj_only=args.mmproj_only,
            image_mean=tuple(args.image_mean) if args.image_mean else None,
            image_std=tuple(args.image_std) if args.image_std else None)
        found = families.require(resolve(args.source), "gguf")
        conversion = found.family.gguf(found, options, gguf_options)
        if conversion.summary and not args.json:
            print(conversion.summary, file=sys.stderr)
        bar = None if args.quiet or args.json else progress_bar("converting")
        result = gguf_sink.run(conversion, args.destination, type_name=type_name, force=args.force,
                               dry_run=args.dry_run, progress=bar, provenance=output.provenance(options, command))
        files = [(f.file_name, f.file.role, len(f.plan.targets), f.bytes_out) for f in result.plan.files]
        if args.json:
            print(json.dumps({"destination": str(result.destination) if result.destination else None,
                              "files": result.files, "plan": result.plan.to_dict()}, indent=1))
        elif args.dry_run:
            print(result.plan.render())
            print("dry run: nothing was written")
        else:
            print(f"wrote {args.destination}: " + ", ".join(f"{n} ({k} tensors, {human_bytes(b)})" for n, _, k, b in files))
            model = next((n for n, role, _, _ in files if role == gguf_folder.MODEL), None)
            mmproj = next((n for n, role, _, _ in files if role == gguf_folder.MMPROJ), None)
            if model and mmproj:
                dst = Path(args.destination)
                print(f"run it: llama-mtmd-cli -m {dst / model} --mmproj {dst / mmproj} --image IMAGE "
                      "-p 'Describe the image.' --temp 0 --jinja")
        if args.verify and not args.dry_run:  # the folder this run wrote: its manifest is not hashed again
            return run_verify(args.source, args.destination, options, args, write_card=True,
                              manifest=output.read_manifest(Path(args.destination)))
        return 0
    if gguf_flags:
        from .errors import ConfigError

        raise ConfigError(f"--{gguf_flags[0].replace('_', '-')} applies to --to gguf only", hint="add --to gguf")
    options = LoadOptions.from_args(args)
    conversion = api.prepare(args.source, options, hash_sources=not args.dry_run)
    if conversion.summary and not args.json:
        print(conversion.summary, file=sys.stderr)
    for assumption in [] if args.json or args.dry_run else conversion.assumptions:  # --dry-run's plan lists them
        print(f"warning: assumed {assumption}", file=sys.stderr)
    for warning in [] if args.json else conversion.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    result = engine.run(conversion, args.destination, dtype=options.dtype, max_shard_size=args.max_shard_size,
                        force=args.force, dry_run=args.dry_run,
                        progress=None if args.quiet or args.json else progress_bar("converting"),
                        provenance=output.provenance(options, command))
    if args.json:
        print(json.dumps({"destination": str(result.destination) if result.destination else None,
                          "files": result.files, "plan": result.plan.to_dict()}, indent=1))
    elif args.dry_run:
        print(result.plan.render())
        print("dry run: nothing was written")
    else:
        print(f"wrote {args.destination}: {len(result.plan.targets)} tensors, "
              f"{human_bytes(result.plan.bytes_out)} in {len(result.files)} file(s)")
    if args.verify and not args.dry_run:  # the folder this run wrote: its manifest is not hashed again
        return run_verify(args.source, args.destination, options, args, write_card=True,
                          manifest=output.read_manifest(Path(args.destination)))
    return 0


# ------------------------------------------------------------------------ verify

# verify reads what the conversion wrote (its dtype included) from the converted folder and measures parity
# where it is defined: both models on the CPU, the reference in float32
VERIFY_UNUSED = {"dtype": "verify reads the dtype the conversion wrote from the converted folder",
                 "device": "verify runs both models on the CPU (the reference in float32)"}


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("original", help="the original checkpoint (any form the family reads)")
    p.add_argument("converted", help="the converted folder")
    _probe_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--write-card", action="store_true",
                   help="put the report into the converted folder's model card (README.md) and its manifest")
    add_load_arguments(p, VERIFY_UNUSED)


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", help="probe image (repeat for more; default: two bundled photos)")
    p.add_argument("--prompt", action="append", help="probe question, one per --image")
    p.add_argument("--max-new-tokens", type=limits.MAX_NEW_TOKENS.arg, default=8,
                   help="greedy tokens to compare (default: 8)")


def _probes(args) -> list[tuple[Path, str]]:
    """Probe (image, question) pairs: the given ones, else the two bundled photos; always at least two."""
    from .api import DEFAULT_PROBES

    images = [Path(i) for i in args.image] if args.image else [p for p, _ in DEFAULT_PROBES]
    prompts = list(args.prompt or [])
    probes = [(image, prompts[i] if i < len(prompts) else DEFAULT_PROBES[i % 2][1]) for i, image in enumerate(images)]
    if len(probes) == 1:  # a padded batch needs two different inputs
        probes.append(DEFAULT_PROBES[1])
    return probes


def run_verify(original: str, converted: str, options: LoadOptions, args, *, json_file: str | None = None,
               markdown_file: str | None = None, write_card: bool = False, manifest: dict | None = None) -> int:
    """``manifest``: the converted folder's, when this run just wrote it; else (with ``write_card``) the folder
    is checked against its manifest before the parity run, once, and the card vouches for what was checked."""
    from . import api, families
    from .conversion import gguf_folder
    from .publish import card
    from .tensors import resolve

    if write_card and manifest is None:
        manifest = card.checked_manifest(converted)

    if gguf_folder.is_gguf_folder(converted):  # `convert --to gguf` wrote it: the family checks it in llama.cpp
        found = families.require(resolve(original), "verify")
        report = found.family.verify(found, Path(converted), options, _probes(args),
                                     max_new_tokens=args.max_new_tokens)
    else:
        report = api.verify(original, converted, options=options, probes=_probes(args),
                            max_new_tokens=args.max_new_tokens)
    print(report.render())
    if json_file:
        Path(json_file).write_text(report.to_json() + "\n")
    if markdown_file:
        Path(markdown_file).write_text(report.to_markdown())
    if write_card:
        print(f"wrote the report into {card.write(converted, report, manifest=manifest)}", file=sys.stderr)
    return 0 if report.passed else 3


@command("verify", "prove a conversion: pixels, token ids, logits and generations against the original model",
         ["vlmkit verify llava-v1.5-7b/ llava-1.5-7b-hf/ --vision-tower clip-vit-large-patch14-336/",
          "vlmkit verify orig/ conv/ --image cat.png --prompt 'What is this?' --json report.json",
          "vlmkit verify llava-v1.5-7b/ llava-1.5-7b-hf/ --write-card"])
def cmd_verify(args) -> int:
    refuse_unused(args, "verify", VERIFY_UNUSED)
    return run_verify(args.original, args.converted, LoadOptions.from_args(args), args,
                      json_file=args.json, markdown_file=args.markdown, write_card=args.write_card)


# -------------------------------------------------------------------------- chat


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an original LLaVA checkpoint, a transformers Llava/LlavaNext folder, or a hub id")
    p.add_argument("--image", action="append", default=[], help="image for the first question (repeatable)")
    p.add_argument("--video", action="append", nargs="+", default=[], metavar="FRAME",
                   help="the frames of one video, in order, for the first question: one visual input "
                        "(LLaVA-OneVision / LLaVA-Video originals, converted OneVision folders; repeatable)")
    p.add_argument("--prompt", help="ask one question and exit (default: interactive chat)")
    p.add_argument("--system", help="system prompt replacing the template's")
    p.add_argument("--temperature", type=limits.TEMPERATURE.arg, default=0.2,
                   help="0 = greedy, at most 2 (default: 0.2, as LLaVA's cli)")
    p.add_argument("--top-p", type=limits.TOP_P.arg, default=1.0, help="nucleus sampling, in (0, 1] (default: 1)")
    p.add_argument("--max-new-tokens", type=limits.MAX_NEW_TOKENS.arg, default=512, help="default: 512")
    add_load_arguments(p)


@command("chat", "chat with a model about images: one answer with --prompt, else an interactive conversation",
         ["vlmkit chat llava-1.5-7b-hf/ --image cat.png --prompt 'What is this?' --temperature 0",
          "vlmkit chat llava-v1.5-7b/ --vision-tower clip-vit-large-patch14-336/ --image cat.png",
          "vlmkit chat LLaVA-Video-7B-Qwen2/ --video f1.png f2.png f3.png --prompt 'What happens?'"])
def cmd_chat(args) -> int:
    from .runtime.model import load

    options = LoadOptions.from_args(args)
    model = load(args.model, options=options)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    seed=options.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    images, videos = list(args.image), list(args.video)
    interactive = args.prompt is None
    if interactive:
        print(f"vlmkit chat: {args.model} (template {model.template}); an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            try:
                question = input("USER: ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not question.strip() or question.strip() in ("exit", "quit"):
                return 0
            print("ASSISTANT: ", end="", flush=True)
        else:
            question = args.prompt
        messages.append({"role": "user", "content": question, "images": images, "videos": videos})
        images, videos = [], []  # the images belong to the first question, as in LLaVA's cli
        answer = ""
        for piece in model.stream(messages, **sampling):
            answer += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": answer})
        if not interactive:
            return 0


# ------------------------------------------------------------------------- serve


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model vlmkit chats with (original checkpoint, transformers folder, hub id), or a "
                                  "scoring model (BLIP-2 retrieval: POST /v1/score)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=limits.PORT.arg, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                                      "$VLMKIT_API_KEY, which keeps the key out of the process list)")
    p.add_argument("--served-model-name", help="the model id clients see (default: the folder name)")
    p.add_argument("--max-batch-size", type=limits.integer(1), default=8,
                   help="requests generated together (default: 8)")
    p.add_argument("--max-queue", type=limits.integer(1), default=64, help="waiting requests before 429 (default: 64)")
    p.add_argument("--prefix-cache-size", type=parse_size, default="2GB",
                   help="memory for the KV caches of recent prompts, shared by requests that begin alike, e.g. "
                        "questions about the same image (default: 2GB; 0 turns it off)")
    p.add_argument("--request-timeout", type=limits.number(0, low_open=True), default=300.0,
                   help="seconds per request, image downloads included (default: 300)")
    p.add_argument("--max-body-size", type=body_size, default="32MB", help="request body limit (default: 32MB)")
    p.add_argument("--max-images", type=limits.integer(0), default=4, help="images per request (default: 4)")
    p.add_argument("--max-tokens", type=limits.integer(1), default=2048,
                   help="largest max_tokens a request may ask (default: 2048)")
    p.add_argument("--max-image-pixels", type=limits.integer(1), default=None,
                   help="pixel limit per image (decompression bombs)")
    p.add_argument("--allowed-local-media-path", metavar="DIR", help="allow file:// image URLs under DIR")
    p.add_argument("--allowed-media-domains", default="", help="comma-separated hosts for http(s) image URLs")
    engines = p.add_argument_group("engines and scale-out (vlmkit's front, limits and error bodies stay the same)")
    engines.add_argument("--engine", choices=["vlmkit", "vllm", "llama.cpp"], default="vlmkit",
                         help="what generates: vlmkit (its runtime, in process; the default), vllm (vLLM's server "
                              "on a folder vlmkit wrote), llama.cpp (llama-server on a GGUF pair)")
    engines.add_argument("--mmproj", metavar="GGUF", help="llama.cpp: the mmproj-*.gguf of a GGUF file "
                                                          "(not needed for a folder written by convert --to gguf)")
    engines.add_argument("--rpc", metavar="HOST:PORT,...", help="llama.cpp: spread the model over these "
                                                                "ggml-rpc-server hosts (llama.cpp RPC; README)")
    engines.add_argument("--data-parallel-size", type=limits.integer(1), default=1,
                         help="vllm: engine copies (vLLM's own data parallelism; default: 1)")
    engines.add_argument("--replicas", type=limits.integer(1),
                         help="run N vlmkit workers on Ray Serve behind one front")
    engines.add_argument("--ray-address", metavar="HOST:PORT", help="join this Ray cluster (default: start a "
                                                                    "local Ray, stopped at exit)")
    engines.add_argument("--num-cpus-per-replica", type=limits.number(0), default=1,
                         help="Ray CPUs per worker (default: 1)")
    engines.add_argument("--num-gpus-per-replica", type=limits.number(0), default=0,
                         help="Ray GPUs per worker (default: 0)")
    add_load_arguments(p)


@command("serve", "serve a model over an OpenAI-compatible HTTP API with a web chat page",
         ["vlmkit serve llava-1.5-7b-hf/ --port 8000",
          "vlmkit serve llava-v1.5-7b/ --vision-tower clip-vit-large-patch14-336/ --api-key secret",
          "vlmkit serve model/ --host 0.0.0.0 --allowed-media-domains images.example.com",
          "vlmkit serve llava-1.5-7b-hf/ --engine vllm",
          "vlmkit serve llava-gguf/ --engine llama.cpp",
          "vlmkit serve llava-1.5-7b-hf/ --replicas 2 --ray-address head-node:6379",
          "vlmkit serve blip2-itm-vit-g/ --max-queue 16"])
def cmd_serve(args) -> int:
    from .runtime.images import DEFAULT_MAX_PIXELS
    from .runtime.model import load
    from .serve.app import ServeSettings, create_app, exposure_warning, serve
    from .serve.media import MediaPolicy

    options = LoadOptions.from_args(args)
    folder = Path(str(args.model).rstrip("/")).name
    name = args.served_model_name or folder
    api_key = args.api_key or os.environ.get("VLMKIT_API_KEY") or None
    warning = exposure_warning(args.host, api_key)
    if warning:
        print(warning, file=sys.stderr)
    policy = MediaPolicy(
        allowed_local_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
        allowed_domains=frozenset(d.strip().lower() for d in args.allowed_media_domains.split(",") if d.strip()))
    aliases = tuple(dict.fromkeys((folder, str(args.model).rstrip("/"))))  # what a client may send as "model"
    settings = ServeSettings(model_name=name, model_aliases=aliases, api_key=api_key,
                             max_batch_size=args.max_batch_size,
                             max_queue=args.max_queue, request_timeout=args.request_timeout,
                             prefix_cache_size=args.prefix_cache_size,
                             max_body_size=args.max_body_size, max_images=args.max_images, max_tokens=args.max_tokens,
                             max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS, media=policy)

    from .serve import engines

    engines.check_flags(args)  # engine flags that do not apply to --engine are refused, never ignored
    if args.replicas is not None or args.ray_address is not None:
        # Ray's workers load the model, and Ray retries a worker that fails: a model none can load (no such path,
        # not a model) ends serve here with load's own error, before a Ray cluster starts
        from . import families
        from .tensors import resolve

        families.require(resolve(args.model), "chat_backend")
    if engines.uses_front(args):  # another engine, or Ray Serve replicas, behind the same front
        return engines.run(args, settings, options)

    def load_model():
        from . import families
        from .runtime.scoring import is_scoring_model, load_scorer
        from .tensors import resolve

        if is_scoring_model(families.find(resolve(args.model))):  # a retrieval model answers POST /v1/score
            return load_scorer(args.model, options=options)
        model = load(args.model, options=options)
        model.backend.image_max_pixels = settings.max_image_pixels
        return model

    print(f"vlmkit serve: {name} on http://{args.host}:{args.port} (loading the model...)", file=sys.stderr)
    serve(create_app(load_model, settings), host=args.host, port=args.port)  # raises what loading raised
    return 0


# -------------------------------------------------------------------------- score


def _score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="the image")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to score against the image")
    p.add_argument("model", help="a BLIP-2 retrieval model: a Blip2ForImageTextRetrieval folder or a LAVIS checkpoint")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    add_load_arguments(p)


@command("score", "image-text matching: the ITM probability and the ITC similarity of each text for an image",
         ["vlmkit score cat.png 'a cat on a sofa' 'a rocket at night' blip2-itm-vit-g/",
          "vlmkit score cat.png 'a cat' blip2_pretrained.pth --vision eva_vit_g.pth --language-model bert/"])
def cmd_score(args) -> int:
    from . import api

    rows = api.score(args.image, args.texts, args.model, options=LoadOptions.from_args(args))
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    print(f"{'ITM':>6}  {'ITC':>7}  text   (ITM: probability that the text matches; ITC: contrastive similarity)")
    for row in rows:
        print(f"{row['itm']:6.4f}  {row['itc']:7.4f}  {row['text']}")
    return 0


# ------------------------------------------------------------------- verify-files


def _verify_files_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a folder written by vlmkit")
    p.add_argument("--json", action="store_true")


@command("verify-files", "re-check every file of an output folder against its vlmkit-manifest.json",
         ["vlmkit verify-files llava-hf/"])
def cmd_verify_files(args) -> int:
    from .conversion import verify_files

    result = verify_files(Path(args.folder))
    print(json.dumps(result) if args.json else f"{args.folder}: all {result['checked']} file(s) match the manifest")
    for rel in result.get("leftovers", []):
        print(f"note: ignored {rel}, a temporary left by an interrupted vlmkit run (not in the manifest; "
              "safe to delete)", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------- push


def _push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a folder written by vlmkit (checked against its manifest first)")
    p.add_argument("repo_id", help="the Hub model repository, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--commit-message", help="default: 'Upload FOLDER with vlmkit VERSION'")
    p.add_argument("--dry-run", action="store_true", help="check the folder, list what would be uploaded; no request")


@command("push", "upload a converted folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)",
         ["vlmkit push llava-1.5-7b-hf/ me/llava-1.5-7b-hf",
          "vlmkit push llava-gguf/ me/llava-1.5-7b-gguf --private --dry-run"])
def cmd_push(args) -> int:
    return _push(args.folder, args.repo_id, private=args.private, revision=args.revision,
                 commit_message=args.commit_message, dry_run=args.dry_run)


def _push(folder: str, repo_id: str, **options) -> int:
    from .conversion.plan import human_bytes
    from .publish.push import push

    result = push(folder, repo_id, **options)
    if result.url is None:
        for name, size in result.files.items():
            print(f"{name}  {human_bytes(size)}")
        print(f"dry run: {len(result.files)} file(s), {human_bytes(result.bytes)} would go to {repo_id}; nothing sent")
    else:
        print(f"pushed {folder} to {repo_id}: {len(result.files)} file(s), {human_bytes(result.bytes)} ({result.url})")
    return 0


ARGUMENTS = {"inspect": _inspect_arguments, "convert": _convert_arguments, "verify": _verify_arguments,
             "chat": _chat_arguments, "serve": _serve_arguments, "verify-files": _verify_files_arguments,
             "push": _push_arguments, "score": _score_arguments}


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vlmkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also VLMKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, examples, fn in COMMANDS:
        epilog = "examples:\n" + textwrap.indent("\n".join(examples), "  ")
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        ARGUMENTS[name](p)
        p.set_defaults(func=fn)
    from .data.cli import add_data_command  # command groups that own their sub-commands
    from .train.cli import add_train_commands

    add_data_command(sub)
    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the exact command, for the model card
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("VLMKIT_DEBUG") == "1"
    try:
        return args.func(args)
    except VlmkitError as e:
        if debug:
            raise
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM while writing (conversion.output.Terminated)
        # one that knows better says what may exist (publish.push.Interrupted: a repository on the Hub)
        print(getattr(e, "message", "interrupted: nothing was written"), file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
