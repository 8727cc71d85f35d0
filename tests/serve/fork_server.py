"""Starts ``vlmkit serve`` processes for the tests by forking one that has already imported what serve imports.

A fresh ``python -m vlmkit.cli serve`` spends ~6 CPU-seconds importing torch, transformers' model code
and FastAPI before it loads a tiny model in one; the tests start a dozen servers on a 2-core machine.
A fork of this process starts with the imports done and runs the same ``vlmkit.cli.main(["serve", ...])``
that ``python -m vlmkit.cli`` runs, in its own main thread (uvicorn's signal handlers included), with the
environment and output file it is given. Nothing here runs a torch operation (forking after torch's
import is what DataLoader workers do).

Protocol (``tests/serve/conftest.py``): one JSON line per server on stdin, ``{"argv", "env", "log"}``; the
answer is one line, the child's pid. The child's exit status goes nowhere: the kernel reaps it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import torch  # noqa: F401 - the imports every server needs, done once
import transformers.modeling_utils  # noqa: F401 - what every model class imports (~3 CPU-seconds)
import transformers.processing_utils  # noqa: F401
import uvicorn  # noqa: F401

import vlmkit.cli
import vlmkit.runtime.model  # noqa: F401
import vlmkit.serve.app  # noqa: F401


def child(argv: list[str], env: dict, log: str) -> None:
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.environ.clear()
    os.environ.update(env)
    code = 1
    try:
        code = vlmkit.cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - shown in the log the test prints
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(request["argv"], request["env"], request["log"])
        print(pid, flush=True)


if __name__ == "__main__":
    main()
