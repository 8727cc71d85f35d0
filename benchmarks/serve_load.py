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
``ray-1`` / ``ray-2`` (Ray Serve with 1 / 2 vlmkit workers), each behind vlmkit's front
(``vlmkit serve``), and ``vllm-alone`` / ``llama.cpp-alone``: the same engine server, started
the same way, queried directly without the front, each request being the one the front would
send it (built by the front's own backend: vLLM's OpenAI chat body, llama-server's
``/completion`` with the prompt the front renders; llama-server's own chat endpoint renders
another prompt). Every engine gets the same requests. Columns: start-up time (to ``/health``
200), peak memory of the whole process tree (PSS: shared pages counted once), and at 1 and 8
clients requests/s, generated tokens/s, p50/p99 latency, time to first token, errors, lost.
One greedy request per engine before the warm-up checks that an engine alone and behind the
front answer the same (text, prompt and answer tokens). After the table, issue 22's ratios:
vlmkit / vllm requests/s at 8 clients (>= 0.9), the front's overhead over vllm and llama.cpp
(alone / behind the front - 1, <= 5 %) at 1 and 8 clients, and vlmkit's 8 vs 1 clients and
time-to-first-token spread.

Usage:
    .venv/bin/python benchmarks/serve_load.py --size tiny
    .venv/bin/python benchmarks/serve_load.py --size 1.1b --requests 16 --max-tokens 128
    .venv/bin/python benchmarks/serve_load.py --size 1.1b --requests 16 --max-tokens 128 --unique-images
    .venv/bin/python benchmarks/serve_load.py --size tiny --engine vlmkit,vllm,llama.cpp,ray-1,ray-2
    .venv/bin/python benchmarks/serve_load.py --size tiny --engine vlmkit,vllm,vllm-alone,llama.cpp,llama.cpp-alone
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


NAN = float("nan")
STOP = "</never>"  # a stop string no answer contains: every engine runs its stop-string check


def messages(i: int, unique: bool) -> list[dict]:
    """Request ``i`` as runtime messages: what vlmkit's front turns its OpenAI body (``front_body``) into."""
    return [{"role": "user", "content": f"Question {i}: what is shown?", "images": [image(i, unique)]}]


def front_body(chat: list[dict], max_tokens: int) -> dict:
    """The streamed, greedy OpenAI chat request a client sends to ``vlmkit serve``."""
    out = []
    for m in chat:
        urls = ["data:image/png;base64," + base64.b64encode(data).decode() for data in m["images"]]
        out.append({"role": m["role"], "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls] +
                    [{"type": "text", "text": m["content"]}]})
    return {"messages": out, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": max_tokens, "stop": [STOP]}


@dataclass(frozen=True)
class Target:
    """Where a level's requests go, and how request ``i``'s runtime messages become its JSON body."""

    url: str
    payload: Callable[[list[dict]], dict]
    path: str = "/v1/chat/completions"


async def one(client: httpx.AsyncClient, target: Target, payload: dict) -> dict:
    """One streamed request: OpenAI chunks (vlmkit, vLLM) or llama-server's ``/completion`` chunks."""
    start = time.perf_counter()
    first, text, tokens, prompt, done = None, [], 0, 0, False
    try:
        async with client.stream("POST", target.url + target.path, json=payload, timeout=3600) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices")
                piece = (choices[0].get("delta") or {}).get("content") if choices else chunk.get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
                if chunk.get("usage"):
                    tokens, prompt = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
                if chunk.get("stop") is True:  # llama-server's last /completion chunk
                    tokens, prompt, done = chunk.get("tokens_predicted", 0), chunk.get("tokens_evaluated", 0), True
            return {"status": 200 if done else "lost", "latency": time.perf_counter() - start,
                    "ttft": (first or time.perf_counter()) - start, "tokens": tokens, "prompt_tokens": prompt,
                    "text": "".join(text)}
    except httpx.HTTPError:
        return {"status": "lost"}


def percentile(values: list[float], q: float) -> float:
    """The median for ``q`` 0.5, else the ``q``-th of the sorted ``values`` (nan when nothing was answered)."""
    if not values:
        return NAN
    return statistics.median(values) if q == 0.5 else values[min(len(values) - 1, int(q * len(values)))]


async def level(target: Target, clients: int, requests: list[int], unique: bool) -> dict:
    payloads = [target.payload(messages(i, unique)) for i in requests]  # built before the clock starts
    results = []

    async def worker(client):
        while payloads:
            results.append(await one(client, target, payloads.pop()))

    start = time.perf_counter()
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok)
    return {"clients": clients, "rps": len(ok) / wall, "tps": sum(r["tokens"] for r in ok) / wall,
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "ttft": percentile(ttfts, 0.5), "ttft99": percentile(ttfts, 0.99),
            "errors": sum(1 for r in results if r["status"] not in (200, "lost")),
            "lost": sum(1 for r in results if r["status"] == "lost") + len(requests) - len(results)}


# --engine name -> `vlmkit serve` flags (None: the engine's own server, without the front), and which form of the
# model it serves ("hf" folder or "gguf" pair)
ALONE = "-alone"
ENGINES = {
    "vlmkit": ([], "hf"),
    "vllm": (["--engine", "vllm"], "hf"),
    "vllm" + ALONE: (None, "hf"),
    "llama.cpp": (["--engine", "llama.cpp"], "gguf"),
    "llama.cpp" + ALONE: (None, "gguf"),
    "ray-1": (["--replicas", "1"], "hf"),
    "ray-2": (["--replicas", "2"], "hf"),
}
ROUTES = {"vllm": "/v1/chat/completions", "llama.cpp": "/completion"}  # what the front's backend streams from
CHECK = 999  # the request whose answer is compared between an engine alone and behind the front


@dataclass(frozen=True)
class Running:
    """A started server: its process (for memory), where requests go, seconds to ready, how to stop it."""

    pid: int
    target: Target
    startup: float
    stop: Callable[[], None]


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


def start_front(name: str, model: Path, max_tokens: int, workdir: Path) -> Running:
    """``vlmkit serve MODEL`` with ``name``'s flags; a client's OpenAI chat requests."""
    server, url, startup = serve(model, ENGINES[name][0], max_tokens, workdir / f"{name}.log")
    return Running(server.pid, Target(url, lambda chat: front_body(chat, max_tokens)), startup, lambda: stop(server))


def start_alone(engine: str, model: Path, max_tokens: int) -> Running:
    """``engine``'s own server started as ``vlmkit serve MODEL --engine ENGINE`` starts it (the same command line
    and limits), without the front; each request is the one the front's backend would send it."""
    from types import SimpleNamespace

    from vlmkit.errors import VlmkitError
    from vlmkit.options import LoadOptions
    from vlmkit.runtime.generation import SamplingParams
    from vlmkit.serve import engines
    from vlmkit.serve.app import ServeSettings

    module = importlib.import_module(f"vlmkit.serve.engines.{engines.ENGINES[engine]}")
    settings = ServeSettings(model_name=model.name, max_batch_size=8, max_queue=256, request_timeout=7200,
                             max_tokens=max_tokens)  # serve()'s flags
    args = SimpleNamespace(model=str(model), data_parallel_size=1, mmproj=None, rpc=None)  # serve()'s defaults
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop=(STOP,))  # front_body, as read
    begin = time.perf_counter()
    process = None
    try:
        process, backend = module.start_from_args(args, settings, LoadOptions())
        process.wait_ready(module.START_TIMEOUT)
        startup = time.perf_counter() - begin
        if engine == "llama.cpp":  # the front asks llama-server for its media marker before its first request
            backend.marker = httpx.get(process.url + "/props", timeout=10).json()["media_marker"]
    except VlmkitError as e:
        if process is not None:
            process.stop()
        sys.exit(f"{engine} alone did not start: {e}")

    def halt():
        process.stop()
        shutil.rmtree(process.log.parent, ignore_errors=True)

    return Running(process.process.pid, Target(process.url, lambda chat: backend.body(chat, params), ROUTES[engine]),
                   startup, halt)


async def answer(target: Target) -> dict:
    """Request ``CHECK`` alone on a fresh server (greedy): the answer compared between engines."""
    async with httpx.AsyncClient() as client:
        return await one(client, target, target.payload(messages(CHECK, False)))


def same_answer(alone: dict, front: dict) -> bool:
    """An engine alone and behind the front gave the same answer: text (the front drops one leading space, as
    vlmkit's runtime does), prompt tokens and answer tokens."""
    from vlmkit.serve.engines.openai_backend import LeadingSpace

    return (alone.get("status") == front.get("status") == 200 and LeadingSpace()(alone["text"]) == front["text"]
            and (alone["prompt_tokens"], alone["tokens"]) == (front["prompt_tokens"], front["tokens"]))


def ratio(a: float, b: float) -> float:
    return a / b if b else NAN


def verdicts(levels: dict[str, list[dict]], answers: dict[str, dict]) -> list[str]:
    """Issue 22's lines for the engines of a run: each ratio, its target, met or MISSED.

    Args:
        levels: engine name -> its two levels (1 and 8 clients), as ``level`` returns them.
        answers: engine name -> its ``CHECK`` answer, as ``one`` returns it.
    """
    mark = lambda ok: "met" if ok else "MISSED"  # noqa: E731 (nan compares false: MISSED)
    lines = []
    for engine in ("vllm", "llama.cpp"):
        alone = engine + ALONE
        if engine in answers and alone in answers:
            a, f = answers[alone], answers[engine]
            same = same_answer(a, f)
            lines.append(f"{engine} alone and behind the front, request {CHECK}: "
                         f"{'the same answer' if same else 'DIFFERENT answers'} (prompt {a.get('prompt_tokens')} / "
                         f"{f.get('prompt_tokens')} tokens, answer {a.get('tokens')} / {f.get('tokens')} tokens, "
                         f"text {'equal' if same or a.get('text') == f.get('text') else 'different'})")
    if "vlmkit" in answers and "vllm" in answers:
        v, f = answers["vlmkit"], answers["vllm"]
        same = v.get("status") == f.get("status") == 200 and v["text"] == f["text"]
        lines.append(f"vlmkit and vllm behind the front, request {CHECK}: prompt {v.get('prompt_tokens')} / "
                     f"{f.get('prompt_tokens')} tokens, answer {'the same' if same else 'different'}")
    if "vlmkit" in levels and "vllm" in levels:
        r = ratio(levels["vlmkit"][1]["rps"], levels["vllm"][1]["rps"])
        lines.append(f"vlmkit / vllm requests/s at 8 clients = {r:.2f} (target >= 0.9): {mark(r >= 0.9)}")
    for engine in ("vllm", "llama.cpp"):
        alone = engine + ALONE
        if engine not in levels or alone not in levels:
            continue
        comparable = same_answer(answers[alone], answers[engine]) if engine in answers and alone in answers else True
        for by_alone, by_front in zip(levels[alone], levels[engine]):
            overhead = ratio(by_alone["rps"], by_front["rps"]) - 1
            clients = by_front["clients"]
            lines.append(f"front over {engine} at {clients} client{'s' * (clients > 1)}: {by_alone['rps']:.2f} "
                         f"requests/s alone, {by_front['rps']:.2f} behind the front: overhead {overhead:+.1%} "
                         f"(target <= 5 %): "
                         f"{mark(overhead <= 0.05) if comparable else 'not comparable (different answers)'}")
    if "vlmkit" in levels:
        one_client, eight = levels["vlmkit"]
        speedup, spread = ratio(eight["rps"], one_client["rps"]), ratio(eight["ttft99"], eight["ttft"])
        lines.append(f"vlmkit at 8 clients = {speedup:.2f} x 1 client (target >= 3.5): {mark(speedup >= 3.5)}")
        lines.append(f"vlmkit time to first token at 8 clients: p99 = {spread:.2f} x p50 (target <= 2): "
                     f"{mark(spread <= 2)}")
    lost = sum(r["lost"] for rows in levels.values() for r in rows)
    lines.append(f"lost: {lost} (target 0): {mark(lost == 0)}")
    return lines


def compare(folder: Path, gguf: Path, engines: list[str], args) -> None:
    """Each engine in turn on the same model and requests; one table, then issue 22's ratios."""
    rows, answers = [], {}
    for name in engines:
        model = gguf if ENGINES[name][1] == "gguf" else folder
        running = (start_alone(name.removesuffix(ALONE), model, args.max_tokens) if name.endswith(ALONE)
                   else start_front(name, model, args.max_tokens, args.workdir))
        memory = Memory(running.pid)
        try:
            answers[name] = asyncio.run(answer(running.target))  # before anything is cached
            asyncio.run(level(running.target, 1, list(range(len(PHOTOS))), False))  # warm-up, not counted
            levels = []
            for first, clients in ((1000, 1), (2000, 8)):  # every engine gets the same requests
                levels.append(asyncio.run(level(running.target, clients, list(range(first, first + args.requests)),
                                                args.unique_images)))
        finally:
            peak = memory.done()
            running.stop()
        rows.append((name, running.startup, peak, levels))
        print(f"{name}: done", file=sys.stderr, flush=True)
    images = "an image of its own each" if args.unique_images else "about 4 photos"
    print(f"\nmodel: {args.size} LLaVA-1.5 (vlmkit's transformers folder; its GGUF pair, f16, for llama.cpp); "
          f"{args.requests} streamed image questions per level ({images}), max_tokens {args.max_tokens}, greedy; "
          f"--max-batch-size 8; {os.cpu_count()} CPU cores; -alone: the engine's own server without vlmkit's front")
    print("| engine | start-up (s) | peak memory (GiB) | clients | requests/s | tokens/s | p50 latency (s) | "
          "p99 latency (s) | time to first token p50 (s) | time to first token p99 (s) | errors | lost |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, startup, peak, levels in rows:
        for i, r in enumerate(levels):
            head = f"| {name} | {startup:.1f} | {peak:.2f} |" if i == 0 else "| | | |"
            print(f"{head} {r['clients']} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                  f"{r['ttft']:.2f} | {r['ttft99']:.2f} | {r['errors']} | {r['lost']} |")
    print()
    for line in verdicts({name: levels for name, _, _, levels in rows}, answers):
        print(line)


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
        parser.error("--device and --dtype apply to the default run (--engine vlmkit); engines run the model as "
                     "stored, on the CPU")
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
    target = Target(url, lambda chat: front_body(chat, args.max_tokens))
    try:
        unique, first = args.unique_images, 0
        asyncio.run(level(target, 1, list(range(len(PHOTOS))), unique))  # warm-up, not counted
        rows = []
        for clients in (1, 4, 8):
            first += 1000  # request numbers (and with --unique-images, images) never repeat
            rows.append(asyncio.run(level(target, clients, list(range(first, first + args.requests)), unique)))
        # one cold request (an image neither has seen) through the server and in-process, in turns, so that both
        # meet the same machine (the server idles while the in-process call runs)
        model = vlmkit.load(folder, device=args.device, dtype=args.dtype)
        model.chat("warm-up", max_new_tokens=2)
        served_times, local_times = [], []
        for i in range(900_001, 900_001 + args.pairs):
            served_times.append(asyncio.run(level(target, 1, [i], True))["p50"])
            start = time.perf_counter()
            model.chat(messages(i, True), temperature=0, max_new_tokens=args.max_tokens, stop=[STOP])
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
