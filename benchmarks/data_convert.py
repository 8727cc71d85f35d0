"""Benchmark: `vlmkit data` at millions of records, each figure beside its peer measured in the same run.

1. ``data convert``: a synthetic Wukong-like CSV (columns ``dir``, ``text``: image paths and Chinese
   captions of 8-40 characters) of ``--rows`` rows (default 1,000,000) and a 10x smaller one, converted to
   LLaVA JSONL by three converters, each in its own process (peak RSS is its own; imports excluded
   from the time, included in the RSS):
   - vlmkit: the ``data convert`` command's function (``vlmkit.data.cli.cmd_convert``), with its row checks;
   - the handbook: ``pd.read_csv``, ``iterrows`` building the records into a list, one ``json.dump``;
   - a plain streaming loop: ``csv.DictReader``, ``json.dumps(..., ensure_ascii=False)`` per row, no checks.
   Rows/s by the clock and per CPU-second (the machine may be shared: CPU time is what contention
   inflates least); each run ``--repeat`` times, the fastest kept. Also the whole ``python -m vlmkit.cli
   data convert`` command's peak RSS (the entry point's own imports included).
2. ``data tokenize`` and ``data check --model`` on ``--tokenize`` records (the tiny LLaVA-1.5's original
   slow LLaMA tokenizer, real 32,000-token vocabulary): 1 worker against every core, and the peak RSS of
   the main process and of the largest worker at a tenth and at all of the records.
3. ``data tokenize --ray`` (a local Ray cluster, every core) against one process on the same
   ``--ray-records`` records in 4 Parquet shards; the two outputs are compared byte for byte.
4. ``data download`` of ``--urls`` URLs from a local HTTP server (127.0.0.1), img2dataset's
   multiprocessing distributor against its Ray distributor (a local cluster), shards of ``--urls / 8``.

Run: ``.venv/bin/python benchmarks/data_convert.py`` (``--rows 100000 --tokenize 10000`` for a quick look).
Temporary files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "为该图片生成标注。"
CHARS = ("一只猫狗在草地上的白色红色杯子咖啡火箭发射台宇航员国旗前微笑图片风景山水城市"
         "夜晚人们走路桌子木头汽车蓝天白云海边沙滩孩子玩耍老人公园花朵树叶秋天冬天"
         "雪地房子窗户灯光街道市场水果蔬菜美食餐厅厨房")


def make_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["dir", "text"])
        for i in range(rows):
            caption = "".join(rng.choices(CHARS, k=rng.randint(8, 40)))
            writer.writerow([f"wukong_test/{i // 1000:05d}/{i:09d}.jpg", caption])


def _status(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run_vlmkit(source: str, out: str) -> int:
    import argparse

    from vlmkit.data import cli

    parser = argparse.ArgumentParser()
    cli._convert_arguments(parser)
    args = parser.parse_args([source, out, "--image-column", "dir", "--text-column", "text", "--prompt", PROMPT,
                              "--force"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.cmd_convert(args) == 0
    return int(printed.getvalue().split(": ", 1)[1].split()[0])  # "wrote OUT: N llava record(s) ..."


def _run_pandas(source: str, out: str) -> int:
    import pandas as pd

    df = pd.read_csv(source)
    data = []
    for index, row in df.iterrows():
        data.append({"id": str(index), "image": row["dir"],
                     "conversations": [{"from": "human", "value": "<image>\n" + PROMPT},
                                       {"from": "gpt", "value": row["text"]}]})
    with open(out, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return len(data)


def _run_plain(source: str, out: str) -> int:
    count = 0
    with open(source, newline="", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as o:
        for i, row in enumerate(csv.DictReader(f)):
            o.write(json.dumps({"id": f"{i:09d}", "image": row["dir"], "conversations": [
                {"from": "human", "value": "<image>\n" + PROMPT}, {"from": "gpt", "value": row["text"]}]},
                ensure_ascii=False) + "\n")
            count += 1
    return count


CONVERTERS = {"vlmkit": _run_vlmkit, "pandas": _run_pandas, "plain": _run_plain}
NAMES = {"vlmkit": "vlmkit data convert (streaming, row checks)",
         "pandas": "handbook pandas loop (list + json.dump)",
         "plain": "plain streaming loop (csv + json.dumps)"}


def _imports(kind: str) -> None:
    if kind == "vlmkit":
        from vlmkit.data import cli  # noqa: F401  (what `data convert` imports: its own modules, no torch)
    elif kind == "pandas":
        import pandas  # noqa: F401


def child(kind: str, source: str, out: str) -> None:
    _imports(kind)
    before = _status("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    rows = CONVERTERS[kind](source, out)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"rows": rows, "seconds": seconds, "cpu": cpu, "rss_after_imports": before,
                      "peak_rss": _status("VmHWM")}))


def run_child(kind: str, source: Path, out: Path, repeat: int) -> dict:
    """The fastest of ``repeat`` runs (peak RSS: the largest)."""
    runs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, __file__, "--child", kind, str(source), str(out)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out.unlink(missing_ok=True)
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "cpu": min(r["cpu"] for r in runs), "peak_rss": max(r["peak_rss"] for r in runs)}


def whole_command_rss(source: Path, out: Path) -> float:
    """Peak RSS (MiB) of ``python -m vlmkit.cli data convert``: the entry point's imports included."""
    code = ("import resource, runpy, sys; sys.argv = ['vlmkit'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('vlmkit.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    proc = subprocess.run([sys.executable, "-c", code, "data", "convert", str(source), str(out), "--image-column",
                           "dir", "--text-column", "text", "--prompt", PROMPT, "--force"],
                          capture_output=True, text=True, check=True)
    out.unlink(missing_ok=True)
    return float(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ tokenize / check
def _data_child(verb: str, records: str, model: str, out: str, workers: int) -> None:
    """One `data tokenize` / `data check --model` run in this process: time, tokens, peak RSS (self, workers)."""
    import resource

    from vlmkit.data.check import check
    from vlmkit.data.examples import tokenize_file
    from vlmkit.data.model import load_data_model

    loaded = load_data_model(model)
    started = time.perf_counter()
    if verb == "tokenize":
        result = tokenize_file(records, out, loaded, force=True, workers=workers)
        count = result.examples + result.refused
        tokens = sum(len(json.loads(line).get("input_ids", ())) for line in open(out, encoding="utf-8"))
    else:
        report = check(records, model=loaded, workers=workers)
        count, tokens = report.records, report.tokens.total
    seconds = time.perf_counter() - started
    print(json.dumps({"records": count, "tokens": tokens, "seconds": seconds, "peak_rss": _status("VmHWM"),
                      "worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def data_run(verb: str, records: Path, model: Path, out: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--data-child", verb, str(records), str(model), str(out),
                           str(workers)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{verb} --workers {workers} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_model(root: Path) -> Path:
    from vlmkit.families.llava import tiny

    return tiny.make_llava15(root / "llava-v1.5-tiny", tiny.make_clip(root / "clip"))


def make_records(csv_path: Path, out: Path, count: int) -> Path:
    from vlmkit.data.convert import convert
    from vlmkit.data.tables import TableMapping

    # captions only, no image files: `check` would stop at the missing images; text-only records are tokenised
    convert(csv_path, out, mapping=TableMapping(image_column="dir", text_column="text", prompts=(PROMPT,),
                                                placement="none"), limit=count, force=True)
    return out


# ------------------------------------------------------------------------------------ ray
def ray_tokenize(root: Path, records: Path, model_path: Path, workers: int) -> dict:
    """One process over the shards one after the other, then Ray Data over all of them; outputs compared."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlmkit.data.distributed import start_ray, tokenize_on_ray
    from vlmkit.data.examples import tokenize_file
    from vlmkit.data.model import load_data_model

    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines()]
    step = -(-len(rows) // 4)
    for k in range(4):
        pq.write_table(pa.Table.from_pylist(rows[k * step:(k + 1) * step]), shards / f"part-{k:05d}.parquet",
                       row_group_size=1024)
    del rows
    model = load_data_model(model_path)
    started = time.perf_counter()
    single = b""
    for shard in sorted(shards.glob("*.parquet")):
        tokenize_file(shard, root / "one.jsonl", model, force=True)
        single += (root / "one.jsonl").read_bytes()
    one = time.perf_counter() - started
    started = time.perf_counter()
    start_ray(None, workers)
    up = time.perf_counter() - started
    result = tokenize_on_ray(shards, root / "ray.jsonl", model, force=True, workers=workers)
    on_ray = time.perf_counter() - started
    return {"records": result.examples + result.refused, "one": one, "ray": on_ray, "ray_start": up,
            "identical": (root / "ray.jsonl").read_bytes() == single}


def download_run(root: Path, distributor: str, urls: int) -> float:
    """Seconds of `data download` of ``urls`` URLs from a local server, in a fresh process."""
    code = f"""
import functools, http.server, shutil, sys, threading, time
from pathlib import Path
root = Path({str(root)!r})
www = root / "www"
if not www.exists():
    www.mkdir()
    for p in Path({str(IMAGES)!r}).glob("*.png"):
        shutil.copyfile(p, www / p.name)
names = sorted(p.name for p in www.glob("*.png"))
quiet = type("H", (http.server.SimpleHTTPRequestHandler,), {{"log_message": lambda *a: None}})
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(www)))
threading.Thread(target=httpd.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{{httpd.server_address[1]}}"
urls = root / "urls-{distributor}.csv"
lines = (f"{{base}}/{{names[i % len(names)]}}?{{i}},caption {{i}}\\n" for i in range({urls}))
urls.write_text("url,caption\\n" + "".join(lines))
from vlmkit.data.download import download
started = time.perf_counter()
result = download(urls, root / "dl-{distributor}", prompts=("Describe.",), image_size=64, processes={CORES},
                  threads=16, quiet=True, distributor="{distributor}", shard_size={max(1, urls // 8)})
print(time.perf_counter() - started, result.downloaded, result.failed)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"download --distributor {distributor} failed:\n{proc.stderr[-3000:]}")
    seconds, ok, failed = proc.stdout.strip().splitlines()[-1].split()
    assert int(ok) == urls and int(failed) == 0, proc.stdout
    return float(seconds)


IMAGES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "images"
CORES = len(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tokenize", type=int, default=100_000, help="records for tokenize / check")
    parser.add_argument("--ray-records", type=int, default=20_000, help="records for tokenize --ray")
    parser.add_argument("--urls", type=int, default=2_000, help="URLs for download")
    parser.add_argument("--repeat", type=int, default=2, help="runs per converter and size (the fastest is kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "CSV", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--data-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.data_child:
        return _data_child(*args.data_child[:4], int(args.data_child[4]))
    root = Path(tempfile.mkdtemp(prefix="vlmkit-bench-data-"))
    print(f"{CORES} cores; temporary files in {root}", file=sys.stderr)
    try:
        sizes = [args.rows // 10, args.rows]
        table = []
        for rows in sizes:
            source = root / f"wukong_{rows}.csv"
            make_csv(source, rows)
            for kind in CONVERTERS:
                result = run_child(kind, source, root / f"out_{kind}.json{'' if kind == 'pandas' else 'l'}",
                                   args.repeat)
                table.append((kind, rows, result))
                print(f"  {kind:<7} {rows:>9,} rows: {result['rows'] / result['seconds']:>9,.0f} rows/s, "
                      f"peak RSS {result['peak_rss']:,.0f} MiB", file=sys.stderr, flush=True)
        command_rss = whole_command_rss(root / f"wukong_{sizes[1]}.csv", root / "whole.jsonl")
        model = make_model(root)
        small = max(1, args.tokenize // 10)
        records = make_records(root / f"wukong_{sizes[1]}.csv", root / "records.jsonl", args.tokenize)
        few = make_records(root / f"wukong_{sizes[1]}.csv", root / "records_small.jsonl", small)
        data_rows = []
        for verb in ("tokenize", "check"):
            for workers in (1, CORES):
                for path, count in ((few, small), (records, args.tokenize)):
                    r = data_run(verb, path, model, root / "tokens.jsonl", workers)
                    data_rows.append((verb, workers, count, r))
                    print(f"  {verb} --workers {workers} {count:,}: {r['records'] / r['seconds']:,.0f} records/s",
                          file=sys.stderr, flush=True)
        ray_records = make_records(root / f"wukong_{sizes[1]}.csv", root / "records_ray.jsonl", args.ray_records)
        ray_row = ray_tokenize(root, ray_records, model, CORES)
        print(f"  tokenize --ray: {ray_row}", file=sys.stderr, flush=True)
        downloads = {d: download_run(root, d, args.urls) for d in ("multiprocessing", "ray")}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print("\n| converter | rows | rows/s | rows per CPU-s | RSS after imports | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, rows, r in table:
        print(f"| {NAMES[kind]} | {rows:,} | {r['rows'] / r['seconds']:,.0f} | {r['rows'] / r['cpu']:,.0f} | "
              f"{r['rss_after_imports']:,.0f} MiB | {r['peak_rss']:,.0f} MiB |")
    by = {(k, n): r for k, n, r in table}
    big = sizes[1]
    vs = {peer: (by[peer, big]["seconds"] / by["vlmkit", big]["seconds"],
                 by[peer, big]["cpu"] / by["vlmkit", big]["cpu"]) for peer in ("pandas", "plain")}
    print(f"\nat {big:,} rows, vlmkit data convert is {vs['pandas'][0]:.1f}x the pandas loop by the clock, "
          f"{vs['pandas'][1]:.1f}x in CPU time (target >= 10x), and {vs['plain'][0]:.2f}x the plain loop by the "
          f"clock, {vs['plain'][1]:.2f}x in CPU time (target >= 1x); peak RSS {by['vlmkit', big]['peak_rss']:,.0f} "
          f"MiB (target <= 100 MiB); the whole `python -m vlmkit.cli data convert` command: {command_rss:,.0f} MiB")

    print("\n| command (tiny LLaVA-1.5, original LLaMA tokenizer) | workers | records | records/s | tokens/s "
          "| peak RSS: main / largest worker |")
    print("|---|---:|---:|---:|---:|---:|")
    for verb, workers, count, r in data_rows:
        name = "data tokenize" if verb == "tokenize" else "data check --model"
        worker_rss = f"{r['worker_rss']:,.0f} MiB" if workers > 1 else "—"
        print(f"| {name} | {workers} | {count:,} | {r['records'] / r['seconds']:,.0f} | "
              f"{r['tokens'] / r['seconds']:,.0f} | {r['peak_rss']:,.0f} MiB / {worker_rss} |")

    print(f"\n| data tokenize, {ray_row['records']:,} records in 4 Parquet shards | seconds | records/s |")
    print("|---|---:|---:|")
    print(f"| one process, shard after shard | {ray_row['one']:.1f} | {ray_row['records'] / ray_row['one']:,.0f} |")
    print(f"| --ray, local cluster of {CORES} CPUs (start {ray_row['ray_start']:.1f} s included) | "
          f"{ray_row['ray']:.1f} | {ray_row['records'] / ray_row['ray']:,.0f} |")
    print(f"output byte-identical: {ray_row['identical']}")

    print(f"\n| data download, {args.urls:,} URLs from 127.0.0.1, {CORES} processes, shards of "
          f"{max(1, args.urls // 8):,} | seconds | URLs/s |")
    print("|---|---:|---:|")
    for name, seconds in downloads.items():
        print(f"| --distributor {name} | {seconds:.1f} | {args.urls / seconds:,.0f} |")


if __name__ == "__main__":
    main()
