"""``vlmkit data convert | check | tokenize | download``: the command group, registered by ``add_data_command``.

Exit status: 0 when all is well, 3 when ``check`` finds records that would be trained on
wrongly or ``tokenize`` refuses records, 1 for a ``VlmkitError`` (bad file, bad option),
2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from ..errors import ConfigError

FAILED = 3


def _examples(lines: list[str]) -> str:
    return "examples:\n" + textwrap.indent("\n".join(lines), "  ")


def _prompts(args) -> tuple[str, ...]:
    from .tables import read_prompts

    prompts = tuple(p.replace("\\n", "\n") for p in args.prompt or ())
    if args.prompts:
        prompts += read_prompts(args.prompts)
    return prompts


def _prompt_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("instruction (tables)")
    group.add_argument("--prompt", action="append", metavar="TEXT",
                       help="the instruction each caption answers (repeat for several; '\\n' is a newline)")
    group.add_argument("--prompts", metavar="FILE", help="instructions, one per line (or a JSON list)")
    group.add_argument("--image-placement", default="before", choices=["before", "after", "random", "none"],
                       help="<image> before the instruction (<image>\\nTEXT), after it, either (seeded), or none "
                            "(default: before; a prompt that holds <image> is used as is)")
    group.add_argument("--seed", type=int, default=0, help="seed of the per-row prompt / placement choice")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _workers_argument(p: argparse.ArgumentParser) -> None:
    from .pool import default_workers

    p.add_argument("--workers", type=_positive, default=default_workers(), metavar="N",
                   help="processes tokenising (default: every core, here %(default)s); the output is the same for "
                        "any N")


# ------------------------------------------------------------------------------ convert
def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="CSV / TSV / JSONL / JSON / Parquet: a table of image + caption, or chat records")
    p.add_argument("destination", help="FILE.jsonl (one record per line) or FILE.json (an array)")
    p.add_argument("--from", dest="source_format", default="auto",
                   choices=["auto", "table", "llava", "sharegpt", "messages", "openai"],
                   help="input format (default: from the first entry)")
    p.add_argument("--to", default="llava", choices=["llava", "sharegpt", "messages", "openai"],
                   help="output format (default: llava)")
    table = p.add_argument_group("columns (tables)")
    table.add_argument("--image-column", help="image path or URL column (default: image, dir, path, file, url ...)")
    table.add_argument("--text-column", help="caption column (default: text, caption ...)")
    table.add_argument("--id-column", help="id column (default: the row number)")
    table.add_argument("--id-from-file", action="store_true", help="id = the image file's name without extension")
    table.add_argument("--image-template", metavar="TEMPLATE",
                       help="image path from columns, e.g. 'images/{dir}' ({row} = row number); relative to the "
                            "training's --image-folder")
    table.add_argument("--image-folder", metavar="DIR", help="absolute image paths under DIR are written relative")
    table.add_argument("--keep-column", action="append", default=[], metavar="NAME",
                       help="copy this column into each record (repeatable)")
    _prompt_arguments(p)
    p.add_argument("--limit", type=int, help="stop after N records")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_convert(args) -> int:
    from pathlib import Path

    from .convert import convert
    from .tables import TableMapping

    mapping = None
    prompts = _prompts(args)
    if prompts or args.source_format == "table":
        mapping = TableMapping(image_column=args.image_column, text_column=args.text_column,
                               id_column=args.id_column, id_from_file=args.id_from_file, prompts=prompts,
                               placement=args.image_placement, image_template=args.image_template,
                               image_folder=Path(args.image_folder) if args.image_folder else None,
                               keep_columns=tuple(args.keep_column), seed=args.seed)
    result = convert(args.source, args.destination, to=args.to, source_format=args.source_format, mapping=mapping,
                     force=args.force, limit=args.limit)
    rate = result.count / result.seconds if result.seconds else 0
    if args.json:
        print(json.dumps({"source": str(result.source), "from": result.source_format,
                          "destination": str(result.destination), "to": result.format, "records": result.count,
                          "seconds": round(result.seconds, 3)}, ensure_ascii=False))
    else:
        print(f"wrote {result.destination}: {result.count} {result.format} record(s) from {result.source} "
              f"({result.source_format}) in {result.seconds:.1f} s ({rate:,.0f} records/s)")
    return 0


# ------------------------------------------------------------------------------ check
def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="records: LLaVA / ShareGPT / messages (JSON, JSONL or Parquet)")
    p.add_argument("--image-folder", metavar="DIR", help="where relative image paths start (LLaVA's --image_folder)")
    p.add_argument("--model", help="also tokenise with this model's tokenizer and template: token lengths "
                                   "(image features counted) and records whose labels would all be masked")
    p.add_argument("--max-length", type=int, help="the training's model_max_length (default: from the model)")
    p.add_argument("--max-pixels", type=int, help="report images with more pixels (default: the runtime's limit)")
    p.add_argument("--from", dest="source_format", default="auto",
                   choices=["auto", "llava", "sharegpt", "messages", "openai"], help="input format")
    p.add_argument("--fix", metavar="OUT", help="write the records without errors and duplicates to OUT "
                                                "(the input is never modified)")
    p.add_argument("--fix-format", default="llava", choices=["llava", "sharegpt", "messages", "openai"],
                   help="format of the --fix copy (default: llava)")
    p.add_argument("--force", action="store_true", help="replace an existing --fix file")
    p.add_argument("--strict", action="store_true",
                   help="fail on warnings too, and count the records the original trains on in its own way "
                        "(leading gpt turn, <image> in an answer or missing ...) as errors (--fix drops them)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _workers_argument(p)
    _load_arguments(p)


# loading options the data commands have no use for: not in --help, refused with the reason, never ignored
UNUSED_OPTIONS = {
    "device": "the data commands read the model's tokenizer, template and image settings, never its weights",
    "dtype": "the data commands read the model's tokenizer, template and image settings, never its weights",
}


def _load_arguments(p: argparse.ArgumentParser) -> None:
    from ..options import add_load_arguments  # here, not at the top: `data convert` imports no model code

    add_load_arguments(p, UNUSED_OPTIONS)


def _refuse_unused(args, command: str) -> None:
    from ..options import refuse_unused

    refuse_unused(args, f"data {command}", UNUSED_OPTIONS)


def _data_model(args):
    from ..options import LoadOptions
    from .model import load_data_model

    return load_data_model(args.model, LoadOptions.from_args(args), max_length=args.max_length)


def cmd_check(args) -> int:
    from .check import check, render

    _refuse_unused(args, "check")
    model = _data_model(args) if args.model else None
    report = check(args.data, image_folder=args.image_folder, model=model,
                   max_pixels=args.max_pixels, source_format=args.source_format,
                   fix=args.fix, fix_format=args.fix_format, force=args.force, strict=args.strict,
                   workers=args.workers)
    print(json.dumps(report.to_dict(), ensure_ascii=False, indent=1) if args.json else render(report))
    return FAILED if report.failed(args.strict) else 0


# ------------------------------------------------------------------------------ tokenize
def _tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="records: LLaVA / ShareGPT / messages (JSON, JSONL or Parquet)")
    p.add_argument("--model", required=True, help="original LLaVA checkpoint or transformers Llava folder")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help='one {"id", "input_ids", "labels"} or '
                                                                      '{"id", "error"} per record')
    p.add_argument("--max-length", type=int, help="the training's model_max_length (default: from the model)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N records with the trained "
                                                                    "spans highlighted")
    p.add_argument("--image-folder", metavar="DIR", help="where the images are (anyres models count features "
                                                         "by image size)")
    p.add_argument("--from", dest="source_format", default="auto",
                   choices=["auto", "llava", "sharegpt", "messages", "openai"], help="input format")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--strict", action="store_true",
                   help="refuse the records the original trains on in its own way (leading gpt turn, <image> in an "
                        "answer or missing ...; `data check` lists them) instead of tokenising them as it does")
    _workers_argument(p)
    p.add_argument("--ray", action="store_true",
                   help="tokenise on Ray Data (DATA: a Parquet file or a folder of Parquet shards), --workers "
                        "actors; the output is the same file, byte for byte")
    p.add_argument("--ray-address", metavar="ADDRESS", help="the Ray cluster (default: a local one)")
    _load_arguments(p)


def cmd_tokenize(args) -> int:
    import itertools

    from .convert import open_records
    from .examples import iter_examples, tokenize_file
    from .show import highlight
    from .tokenize import RecordError

    _refuse_unused(args, "tokenize")
    if args.ray_address and not args.ray:
        raise ConfigError("--ray-address is for --ray", hint="add --ray, or remove --ray-address")
    model = _data_model(args)
    print(f"template {model.template}, --max-length {model.max_length} ({model.max_length_from})", file=sys.stderr)
    if args.show:  # the first records again, here: the workers write lines, not examples
        color = sys.stdout.isatty()
        first = itertools.islice(open_records(args.data, source_format=args.source_format), args.show)
        for item in iter_examples(first, model, image_folder=args.image_folder, strict=args.strict):
            if isinstance(item, RecordError):
                print(f"── {item.record_id}: refused ──\n{item.message}")
            else:
                print(highlight(item, model.encoder, color=color))
    if args.ray:
        from .distributed import tokenize_on_ray

        result = tokenize_on_ray(args.data, args.out, model, image_folder=args.image_folder,
                                 source_format=args.source_format, force=args.force, strict=args.strict,
                                 workers=args.workers, address=args.ray_address)
    else:
        result = tokenize_file(args.data, args.out, model, image_folder=args.image_folder,
                               source_format=args.source_format, force=args.force, strict=args.strict,
                               workers=args.workers)
    print(f"wrote {result.destination}: {result.examples} example(s), {result.refused} refused, "
          f"{result.trained_tokens} trained token(s), {result.records_per_second:,.0f} records/s", file=sys.stderr)
    if result.refused:
        print(f'refused records carry {{"id", "error"}} lines in {result.destination}; `vlmkit data check '
              f"{args.data} --model {args.model}` lists them", file=sys.stderr)
    return FAILED if result.refused else 0


# ------------------------------------------------------------------------------ download
def _download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", help="URL list: CSV / TSV / JSONL / Parquet with url + caption columns, or .txt")
    p.add_argument("--out", required=True, metavar="DIR", help="image folder (a rerun resumes into it)")
    p.add_argument("--url-column", default="url")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--id-column", help="record ids from this column (default: img2dataset's keys)")
    _prompt_arguments(p)
    p.add_argument("--image-size", type=int, default=336, help="resize target in pixels (default: 336)")
    p.add_argument("--resize-mode", default="border",
                   choices=["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"],
                   help="img2dataset's resize mode (default: border)")
    p.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"])
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--timeout", type=int, default=10, help="seconds per URL")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--records", metavar="FILE", help="records file (default: OUT/records.jsonl)")
    p.add_argument("--to", default="llava", choices=["llava", "sharegpt", "messages", "openai"])
    p.add_argument("--quiet", action="store_true", help="no img2dataset progress output")
    p.add_argument("--distributor", default="multiprocessing", choices=["multiprocessing", "pyspark", "ray"],
                   help="img2dataset's: --processes on this machine (default), the shards as tasks of the active "
                        "Spark session, or of a Ray cluster (--ray-address; default: a local one)")
    p.add_argument("--ray-address", metavar="ADDRESS", help="the Ray cluster of --distributor ray")
    p.add_argument("--shard-size", type=_positive, default=10_000, metavar="N",
                   help="URLs per shard, the unit of work of the distributor (default: 10000)")


def cmd_download(args) -> int:
    from .download import download

    if args.ray_address and args.distributor != "ray":
        raise ConfigError("--ray-address is for --distributor ray", hint="add --distributor ray, or remove --ray-address")

    result = download(args.urls, args.out, prompts=_prompts(args), url_column=args.url_column,
                      caption_column=args.caption_column, id_column=args.id_column, placement=args.image_placement,
                      seed=args.seed, image_size=args.image_size, resize_mode=args.resize_mode,
                      encode_format=args.image_format, processes=args.processes, threads=args.threads,
                      timeout=args.timeout, retries=args.retries, records=args.records, to=args.to,
                      quiet=args.quiet, distributor=args.distributor, ray_address=args.ray_address,
                      shard_size=args.shard_size)
    print(f"{result.folder}: {result.downloaded} image(s) downloaded, {result.failed} failed (listed in "
          f"{result.failed_path}); {result.records} record(s) in {result.records_path}")
    return 0


VERBS = [
    ("convert", "tables (image + caption) and chat datasets to LLaVA / ShareGPT / messages records, streaming",
     _convert_arguments, cmd_convert,
     ["vlmkit data convert wukong_test.csv wukong.jsonl --image-column dir --text-column text "
      "--prompt '为该图片生成标注。'",
      "vlmkit data convert cc3m.tsv cc3m.jsonl --prompts brief_prompts.txt --image-placement random --seed 0",
      "vlmkit data convert llava_v1_5_mix665k.json mix.jsonl --to messages"]),
    ("check", "validate every record: images, placeholders, roles, duplicates; with --model token lengths",
     _check_arguments, cmd_check,
     ["vlmkit data check wukong.jsonl --image-folder images/",
      "vlmkit data check wukong.jsonl --image-folder images/ --model llava-v1.5-7b/ --max-length 2048",
      "vlmkit data check data.json --image-folder images/ --fix clean.jsonl --json"]),
    ("tokenize", "the ids and labels the training sees (original LLaVA masking), one JSON line per record",
     _tokenize_arguments, cmd_tokenize,
     ["vlmkit data tokenize wukong.jsonl --model llava-v1.5-7b/ --out wukong.tokens.jsonl --show 2",
      "vlmkit data tokenize data.jsonl --model llava-hf/ --template llava_v1 --max-length 1024 --out t.jsonl"]),
    ("download", "URL + caption lists to local images (img2dataset) and records pointing at them",
     _download_arguments, cmd_download,
     ["vlmkit data download wukong_urls.csv --out wukong/ --prompt '为该图片生成标注。'",
      "vlmkit data download laion.parquet --out laion/ --url-column URL --caption-column TEXT --processes 4"]),
]


def add_data_command(subparsers) -> argparse.ArgumentParser:
    """Register ``vlmkit data`` and its verbs on the main parser's ``add_subparsers()`` object.

    Each verb sets ``func`` (``args.func(args) -> exit status``), as the other commands do.
    """
    help_text = "training data: convert, check, tokenize, download"
    data = subparsers.add_parser("data", help=help_text, description=help_text,
                                 epilog=_examples([e for *_, examples in VERBS for e in examples[:1]]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = data.add_subparsers(dest="data_command", metavar="VERB")
    for name, text, arguments, fn, examples in VERBS:
        p = verbs.add_parser(name, help=text, description=text, epilog=_examples(examples),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments(p)
        p.set_defaults(func=fn)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])
    return data
