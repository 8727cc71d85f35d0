"""Serving under load: requests/s, p50/p99 latency and time to first token at 1, 4 and 8 clients.

Starts ``vlmkit serve`` (a real uvicorn process on a loopback port) on a synthetic LLaVA —
``--size 1.1b``: the model of ``chat_latency.py`` (TinyLlama-1.1B-shaped language model +
CLIP-L/336-shaped tower, float32 CPU); ``--size tiny``: the test model, for a quick run —
and sends a fixed number of streamed image questions per concurrency level with asyncio +
httpx2. Every request is accounted for: answered, refused (4xx/5xx, counted as errors) or
lost (no answer at all). Also measures one request through the server against the same
``chat`` call in-process (each on an image neither has seen: a cold request both ways).

The questions are about four photos (after one warm-up request each), so requests share
the image's positions through the server's prefix cache, as users asking about the same
images do; ``--unique-images`` gives every request an image of its own (one pixel
changed), the case where nothing is shared and every prompt is read whole.

Targets (issues 9 and 22): at 8 clients >= 3.5x the throughput of 1 client, and a p99 time
to first token <= 2x its p50; one request through the server <= 1.1x the in-process latency;
0 lost.

``--engine`` (issue 10) compares engines in one run, on the same model and requests, in one
table: ``vlmkit`` (the runtime, in process), ``vllm`` (vLLM on the same converted folder),
``llama.cpp`` (llama-server on its GGUF pair, f16, written by ``vlmkit convert --to gguf``),
``ray-1`` / ``ray-2`` (Ray Serve with 1 / 2 vlmkit workers): start-up time (to ``/health``
200), peak memory of the whole process tree (PSS: shared pages counted once), and at 1 and 8
clients requests/s, generated tokens/s, p50/p99 latency, time to first token, errors, lost.

Usage:
    .venv/bin/python benchmarks/serve_load.py --size tiny
    .venv/bin/python benchmarks/serve_load.py --size 1.1b --requests 16 --max-tokens 128
    .venv/bin/python benchmarks/serve_load.py --size 1.1b --requests 16 --max-tokens 128 --unique-images
    .venv/bin/python benchmarks/serve_load.py --size tiny --engine vlmkit,vllm,llama.cpp,ray-1,ray-2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
from PIL import Image

import vlmkit
from chat_latency import SIZES, build

PHOTOS = sorted((Path(vlmkit.__file__).parent / "assets" / "images").glob("*.png"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image(i: int, unique: bool) -> bytes:
    """Photo ``i % 4``; with ``unique``, one pixel set from ``i`` so that no two requests share an image."""
    photo = PHOTOS[i % len(PHOTOS)]
    if not unique:
        return photo.read_bytes()
    picture = Image.open(photo).convert("RGB")
    picture.putpixel((0, 0), (i % 256, i // 256 % 256, 7))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def body(i: int, max_tokens: int, unique: bool) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image(i, unique)).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": f"Question {i}: what is shown?"}]}],
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": max_tokens,
            "stop": ["</never>"]}


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    start = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=payload, timeout=3600) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code}
            done, tokens = False, 0
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line and first is None:
                    first = time.perf_counter()
                if line.startswith("data: {") and '"completion_tokens"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                if line == "data: [DONE]":
                    done = True
            return {"status": 200 if done else "lost", "latency": time.perf_counter() - start,
                    "ttft": (first or time.perf_counter()) - start, "tokens": tokens}
    except httpx.HTTPError:
        return {"status": "lost"}


async def level(url: str, clients: int, requests: list[int], max_tokens: int, unique: bool) -> dict:
    queue = list(requests)
    results = []

    async def worker(client):
        while queue:
            results.append(await one(client, url, body(queue.pop(), max_tokens, unique)))

    start = time.perf_counter()
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok)
    return {"clients": clients, "rps": len(ok) / wall, "tps": sum(r["tokens"] for r in ok) / wall,
            "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "ttft": statistics.median(ttfts), "ttft99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "errors": sum(1 for r in results if r["status"] not in (200, "lost")),
            "lost": sum(1 for r in results if r["status"] == "lost") + len(requests) - len(results)}


# --engine name -> `vlmkit serve` flags, and which form of the model it serves ("hf" folder or "gguf" pair)
ENGINES = {
    "vlmkit": ([], "hf"),
    "vllm": (["--engine", "vllm"], "hf"),
    "llama.cpp": (["--engine", "llama.cpp"], "gguf"),
    "ray-1": (["--replicas", "1"], "hf"),
    "ray-2": (["--replicas", "2"], "hf"),
}


class Memory:
    """Peak PSS of a process tree (shared pages counted once), sampled every second."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil

        while not self.stop.wait(1.0):
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak / 2**30


def serve(model: Path, flags: list[str], max_tokens: int, log: Path) -> tuple[subprocess.Popen, str, float]:
    """``vlmkit serve MODEL FLAGS`` on a free port: (process, url, seconds until /health said 200)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", str(model), "--port", str(port),
                               "--max-batch-size", "8", "--max-queue", "256", "--request-timeout", "7200",
                               "--max-tokens", str(max_tokens), *flags], stdout=subprocess.DEVNULL,
                              stderr=log.open("w"), start_new_session=True)
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            sys.exit(f"vlmkit serve {' '.join(flags)} did not start:\n" + log.read_text()[-3000:])
        time.sleep(0.25)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM (vlmkit stops its engine or its Ray), then SIGKILL for whatever of its session is left."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def build_forms(work: Path, sizes) -> tuple[Path, Path]:
    """The same synthetic LLaVA as a transformers folder and as a GGUF pair (f16), both from its original."""
    from vlmkit.cli import main as vlmkit_main
    from vlmkit.families.llava import tiny

    original = tiny.make_llava15(work / "llava-v1.5", tiny.make_clip(work / "clip", sizes), sizes, shards=4)
    folder, gguf = work / "llava-hf", work / "gguf"
    vlmkit.convert(original, folder)
    if vlmkit_main(["convert", str(original), str(gguf), "--to", "gguf", "--quiet"]) != 0:
        sys.exit("converting the model to GGUF failed")
    shutil.rmtree(original)
    return folder, gguf


def compare(folder: Path, gguf: Path, engines: list[str], args) -> None:
    """Each engine in turn on the same model and requests; one table."""
    rows, first = [], 0
    for name in engines:
        flags, form = ENGINES[name]
        server, url, startup = serve(gguf if form == "gguf" else folder, flags, args.max_tokens,
                                     args.workdir / f"{name}.log")
        memory = Memory(server.pid)
        try:
            asyncio.run(level(url, 1, list(range(len(PHOTOS))), args.max_tokens, False))  # warm-up, not counted
            levels = []
            for clients in (1, 8):
                first += 1000
                levels.append(asyncio.run(level(url, clients, list(range(first, first + args.requests)),
                                                args.max_tokens, args.unique_images)))
        finally:
            peak = memory.done()
            stop(server)
        rows.append((name, startup, peak, levels))
        print(f"{name}: done", file=sys.stderr, flush=True)
    images = "an image of its own each" if args.unique_images else "about 4 photos"
    print(f"\nmodel: {args.size} LLaVA-1.5 (vlmkit's transformers folder; its GGUF pair, f16, for llama.cpp); "
          f"{args.requests} streamed image questions per level ({images}), max_tokens {args.max_tokens}, greedy; "
          f"--max-batch-size 8; {os.cpu_count()} CPU cores")
    print("| engine | start-up (s) | peak memory (GiB) | clients | requests/s | tokens/s | p50 latency (s) | "
          "p99 latency (s) | time to first token p50 (s) | time to first token p99 (s) | errors | lost |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, startup, peak, levels in rows:
        for i, r in enumerate(levels):
            head = f"| {name} | {startup:.1f} | {peak:.2f} |" if i == 0 else "| | | |"
            print(f"{head} {r['clients']} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                  f"{r['ttft']:.2f} | {r['ttft99']:.2f} | {r['errors']} | {r['lost']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "1.1b"], default="tiny")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--unique-images", action="store_true", help="an image of its own for every request")
    parser.add_argument("--pairs", type=int, default=3, help="cold requests, server and in-process in turns")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    parser.add_argument("--dtype", help="float32 (default), float16 or bfloat16")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-serve"))
    parser.add_argument("--engine", default="vlmkit",
                        help=f"comma-separated, compared in one table at 1 and 8 clients: {', '.join(ENGINES)} "
                             "(default: vlmkit alone, the issue-9 run with 1/4/8 clients and its targets)")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"--engine: unknown {unknown}; choose from {', '.join(ENGINES)}")
    if engines != ["vlmkit"] and (args.device != "cpu" or args.dtype):
        parser.error("--device and --dtype apply to the vlmkit run alone; engines run the model as stored, on the CPU")
    shutil.rmtree(args.workdir, ignore_errors=True)
    sizes = SIZES["quick" if args.size == "tiny" else "1.1b"]
    if engines != ["vlmkit"]:
        try:
            compare(*build_forms(args.workdir, sizes), engines, args)
        finally:
            shutil.rmtree(args.workdir, ignore_errors=True)
        return
    folder = build(args.workdir, sizes)
    load = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    server, url, _ = serve(folder, load, args.max_tokens, args.workdir / "server.log")
    try:
        unique, first = args.unique_images, 0
        asyncio.run(level(url, 1, list(range(len(PHOTOS))), args.max_tokens, unique))  # warm-up, not counted
        rows = []
        for clients in (1, 4, 8):
            first += 1000  # request numbers (and with --unique-images, images) never repeat
            rows.append(asyncio.run(level(url, clients, list(range(first, first + args.requests)), args.max_tokens,
                                          unique)))
        # one cold request (an image neither has seen) through the server and in-process, in turns, so that both
        # meet the same machine (the server idles while the in-process call runs)
        model = vlmkit.load(folder, device=args.device, dtype=args.dtype)
        model.chat("warm-up", max_new_tokens=2)
        served_times, local_times = [], []
        for i in range(900_001, 900_001 + args.pairs):
            served_times.append(asyncio.run(level(url, 1, [i], args.max_tokens, True))["p50"])
            messages = [{"role": "user", "content": f"Question {i}: what is shown?", "images": [image(i, True)]}]
            start = time.perf_counter()
            model.chat(messages, temperature=0, max_new_tokens=args.max_tokens, stop=["</never>"])
            local_times.append(time.perf_counter() - start)
        served, in_process = statistics.median(served_times), statistics.median(local_times)
    finally:
        stop(server)
    shutil.rmtree(args.workdir, ignore_errors=True)

    images = "an image of its own each" if unique else "about 4 photos"
    print(f"\nmodel: {args.size} ({args.dtype or 'float32'}, {args.device}); {args.requests} streamed image questions "
          f"per level ({images}), max_tokens {args.max_tokens}, greedy, --max-batch-size 8")
    print("| clients | requests/s | p50 latency (s) | p99 latency (s) | time to first token p50 (s) | "
          "time to first token p99 (s) | errors | lost |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ttft']:.2f} | "
              f"{r['ttft99']:.2f} | {r['errors']} | {r['lost']} |")
    speedup = rows[2]["rps"] / rows[0]["rps"]
    overhead = served / in_process
    lost = sum(r["lost"] for r in rows)
    ttft_spread = rows[2]["ttft99"] / rows[2]["ttft"]
    print(f"\nthroughput at 8 clients = {speedup:.2f} x 1 client (target >= 3.5); time to first token at 8 clients: "
          f"p99 = {ttft_spread:.2f} x p50 (target <= 2); one request through the server = {overhead:.2f} x "
          f"in-process chat ({served:.2f} s vs {in_process:.2f} s; target <= 1.1); lost: {lost}")
    met = speedup >= 3.5 and ttft_spread <= 2 and overhead <= 1.1 and lost == 0
    print(f"targets: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
