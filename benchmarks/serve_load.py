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

Targets (issue 9): at 8 clients >= 3x the throughput of 1 client; one request through the
server <= 1.1x the in-process latency; 0 lost.

Usage:
    .venv/bin/python benchmarks/serve_load.py --size tiny
    .venv/bin/python benchmarks/serve_load.py --size 1.1b --requests 16 --max-tokens 128
    .venv/bin/python benchmarks/serve_load.py --size 1.1b --requests 16 --max-tokens 128 --unique-images
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import shutil
import socket
import statistics
import subprocess
import sys
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
            "stream": True, "temperature": 0, "max_tokens": max_tokens, "stop": ["</never>"]}


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    start = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=payload, timeout=3600) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code}
            done = False
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line and first is None:
                    first = time.perf_counter()
                if line == "data: [DONE]":
                    done = True
            return {"status": 200 if done else "lost", "latency": time.perf_counter() - start,
                    "ttft": (first or time.perf_counter()) - start}
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
    return {"clients": clients, "rps": len(ok) / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "ttft": statistics.median(r["ttft"] for r in ok),
            "errors": sum(1 for r in results if r["status"] not in (200, "lost")),
            "lost": sum(1 for r in results if r["status"] == "lost") + len(requests) - len(results)}


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
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    folder = build(args.workdir, SIZES["quick" if args.size == "tiny" else "1.1b"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.workdir / "server.log"
    load = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    server = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", str(folder), "--port", str(port),
                               "--max-batch-size", "8", "--max-queue", "256", "--request-timeout", "7200",
                               "--max-tokens", str(args.max_tokens), *load], stdout=subprocess.DEVNULL,
                              stderr=log.open("w"))
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                sys.exit("the server did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
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
        server.terminate()
        server.wait(30)
    shutil.rmtree(args.workdir, ignore_errors=True)

    images = "an image of its own each" if unique else "about 4 photos"
    print(f"\nmodel: {args.size} ({args.dtype or 'float32'}, {args.device}); {args.requests} streamed image questions "
          f"per level ({images}), max_tokens {args.max_tokens}, greedy, --max-batch-size 8")
    print("| clients | requests/s | p50 latency (s) | p99 latency (s) | time to first token p50 (s) | errors | lost |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ttft']:.2f} | "
              f"{r['errors']} | {r['lost']} |")
    speedup = rows[2]["rps"] / rows[0]["rps"]
    overhead = served / in_process
    lost = sum(r["lost"] for r in rows)
    print(f"\nthroughput at 8 clients = {speedup:.2f} x 1 client (target >= 3); one request through the server = "
          f"{overhead:.2f} x in-process chat ({served:.2f} s vs {in_process:.2f} s; target <= 1.1); lost: {lost}")
    print(f"targets: {'met' if speedup >= 3 and overhead <= 1.1 and lost == 0 else 'NOT met'}")


if __name__ == "__main__":
    main()
