"""Start-up time of the ``vlmkit`` command: process start to exit, median of 5 runs.

Each command runs as the ``vlmkit`` console script does (``from vlmkit.cli import main``), in a
fresh interpreter, against ``python -c pass`` (the interpreter alone) as the floor. One untimed
run first warms the page cache. The safetensors file ``inspect`` reads is written here with
safetensors' own writer (inspect reads headers only, so its size does not matter). CPU time
(user + system) is printed too: on a loaded machine it moves less than wall time.

Targets (issue 18): ``vlmkit --help`` under 1 s, ``vlmkit inspect`` of a safetensors file under 2 s.

Usage:
    .venv/bin/python benchmarks/startup.py
    .venv/bin/python benchmarks/startup.py --pythonpath OTHER_CHECKOUT/src   # time another vlmkit
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 5
ENTRY = "import sys; from vlmkit.cli import main; sys.exit(main())"


def seconds(argv: list[str], env: dict) -> tuple[float, float]:
    """Median wall time of ``argv`` from process start to exit, and median CPU time (user + system)."""
    subprocess.run(argv, env=env, capture_output=True, check=True)  # warm-up, not counted
    walls, cpus = [], []
    for _ in range(RUNS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pythonpath", help="put this folder first on PYTHONPATH (another checkout's src/)")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.pythonpath, env.get("PYTHONPATH")) if p)

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        subprocess.run([sys.executable, "-c", "import torch; from safetensors.torch import save_file; "
                        f"save_file({{f'layers.{{i}}.weight': torch.zeros(64, 64) for i in range(32)}}, {str(weights)!r})"],
                       check=True)
        py = sys.executable
        rows = [("python -c pass", [py, "-c", "pass"]),
                ("vlmkit --help", [py, "-c", ENTRY, "--help"]),
                ("vlmkit --version", [py, "-c", ENTRY, "--version"]),
                ("vlmkit inspect model.safetensors", [py, "-c", ENTRY, "inspect", str(weights)])]
        results = [(name, seconds(argv, env)) for name, argv in rows]
    floor = results[0][1][0]
    print(f"| command | wall time (s), median of {RUNS} | minus python -c pass (s) | CPU time (s) |")
    print("|---|---:|---:|---:|")
    for name, (wall, cpu) in results:
        print(f"| {name} | {wall:.2f} | {wall - floor:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
