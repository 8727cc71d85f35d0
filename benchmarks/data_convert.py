"""Benchmark: `vlmkit data convert` against the handbook's pandas loop, and `vlmkit data tokenize` speed.

1. A synthetic Wukong-like CSV (columns ``dir``, ``text``: image paths and Chinese captions of 8-40
   characters) of ``--rows`` rows (default 1,000,000) and a 10x smaller one.
2. Each converter runs in its own process on both files, so that peak RSS is its own:
   - vlmkit: ``vlmkit.data.convert`` (CSV -> LLaVA JSONL, row by row);
   - the handbook: ``pd.read_csv``, ``iterrows`` building the records into a list, one ``json.dump``
     of the whole list (``ensure_ascii=False``, no indent: the fastest form of that loop).
   Reported: rows/s of the conversion (imports excluded) by the wall clock and per CPU-second (the machine
   may be shared: CPU time is what contention does not inflate), RSS after the imports, peak RSS; each run
   is repeated ``--repeat`` times and the fastest kept.
3. ``data tokenize`` records/s (llava_v1 / mistral_instruct, Wukong records with an image) for the tiny
   LLaVA-1.5 (original: the slow LLaMA SentencePiece tokenizer, real 32,000-token vocabulary), its
   transformers conversion (fast tokenizer) and the tiny LLaVA-NeXT-Mistral (Mistral's real tokenizer).

Run: ``.venv/bin/python benchmarks/data_convert.py`` (``--rows 100000`` for a quick look). Temporary
files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
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
    from vlmkit.data.convert import convert
    from vlmkit.data.tables import TableMapping

    mapping = TableMapping(image_column="dir", text_column="text", prompts=(PROMPT,))
    return convert(source, out, mapping=mapping, force=True).count


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


def _imports(kind: str) -> None:
    if kind == "vlmkit":
        import vlmkit.data.convert  # noqa: F401  (as `vlmkit data convert` does: torch comes with `vlmkit`)
    else:
        import pandas  # noqa: F401


def child(kind: str, source: str, out: str) -> None:
    _imports(kind)
    before = _status("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    rows = {"vlmkit": _run_vlmkit, "pandas": _run_pandas}[kind](source, out)
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


def tokenize_speed(root: Path, csv_path: Path, count: int) -> list[tuple[str, str, float, float]]:
    from vlmkit.cli import main
    from vlmkit.data.convert import convert
    from vlmkit.data.examples import tokenize_file
    from vlmkit.data.model import load_data_model
    from vlmkit.data.tables import TableMapping
    from vlmkit.families.llava import tiny

    records = root / "records.jsonl"
    convert(csv_path, records, mapping=TableMapping(image_column="dir", text_column="text", prompts=(PROMPT,)),
            limit=count, force=True)
    clip = tiny.make_clip(root / "clip")
    v15 = tiny.make_llava15(root / "llava-v1.5-tiny", clip)
    with contextlib.redirect_stdout(sys.stderr):
        if main(["convert", str(v15), str(root / "llava-v1.5-tiny-hf"), "--quiet"]) != 0:
            raise SystemExit("conversion of the tiny model failed")
    nxt = tiny.make_llava_next(root / "llava-v1.6-mistral-tiny", clip)
    rows = []
    for label, path, tokenizer in [
            ("tiny LLaVA-1.5, original", v15, "LLaMA SentencePiece 32k, slow (4.37 rules)"),
            ("tiny LLaVA-1.5, converted", root / "llava-v1.5-tiny-hf", "LLaMA 32k, transformers fast"),
            ("tiny LLaVA-NeXT-Mistral, original", nxt, "Mistral SentencePiece 32k, slow")]:
        model = load_data_model(path)
        out = root / "tokens.jsonl"
        result = tokenize_file(records, out, model, image_folder=root, force=True)
        assert result.refused == 0, f"{label}: {result.refused} records refused"
        tokens = sum(len(json.loads(line)["input_ids"]) for line in out.read_text().splitlines())
        rows.append((f"{label} ({model.template})", tokenizer, result.records_per_second, tokens / result.seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tokenize", type=int, default=5000, help="records for the tokenize measurement")
    parser.add_argument("--repeat", type=int, default=2, help="runs per converter and size (the fastest is kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "CSV", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    root = Path(tempfile.mkdtemp(prefix="vlmkit-bench-data-"))
    try:
        sizes = [args.rows // 10, args.rows]
        table = []
        for rows in sizes:
            source = root / f"wukong_{rows}.csv"
            make_csv(source, rows)
            for kind in ("vlmkit", "pandas"):
                result = run_child(kind, source, root / f"out_{kind}.json{'l' if kind == 'vlmkit' else ''}",
                                   args.repeat)
                table.append((kind, rows, result))
                print(f"  {kind:<7} {rows:>9,} rows: {result['rows'] / result['seconds']:>9,.0f} rows/s, "
                      f"peak RSS {result['peak_rss']:,.0f} MiB", file=sys.stderr, flush=True)
        speed = root / f"wukong_{sizes[0]}.csv"
        tokenize_rows = tokenize_speed(root, speed, args.tokenize)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| converter | rows | rows/s | rows per CPU-s | RSS after imports | peak RSS | peak - imports |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, rows, r in table:
        name = "vlmkit data convert (streaming)" if kind == "vlmkit" else "handbook pandas loop (list + json.dump)"
        print(f"| {name} | {rows:,} | {r['rows'] / r['seconds']:,.0f} | {r['rows'] / r['cpu']:,.0f} | "
              f"{r['rss_after_imports']:,.0f} MiB | {r['peak_rss']:,.0f} MiB | "
              f"{r['peak_rss'] - r['rss_after_imports']:,.0f} MiB |")
    by = {(k, n): r for k, n, r in table}
    big, small = sizes[1], sizes[0]
    wall = by["pandas", big]["seconds"] / by["vlmkit", big]["seconds"]
    cpu = by["pandas", big]["cpu"] / by["vlmkit", big]["cpu"]
    growth = by["vlmkit", big]["peak_rss"] / by["vlmkit", small]["peak_rss"] - 1
    print(f"\nspeed-up at {big:,} rows: {wall:.1f}x by the clock, {cpu:.1f}x in CPU time (target >= 3x); "
          f"vlmkit peak RSS {small:,} -> {big:,} rows: {growth:+.1%} (target within 10 %)")
    print(f"\n| data tokenize ({args.tokenize:,} Wukong records) | tokenizer | records/s | tokens/s |")
    print("|---|---|---:|---:|")
    for label, tokenizer, rps, tps in tokenize_rows:
        print(f"| {label} | {tokenizer} | {rps:,.0f} | {tps:,.0f} |")


if __name__ == "__main__":
    main()
