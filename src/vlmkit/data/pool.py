"""Records tokenised on every core, in input order, with a bounded number of records in flight.

The tokenizer is what ``vlmkit data tokenize`` and ``data check --model`` spend their time in (the
original's preprocessing tokenises each record several times: the prompt, then each round on its
own), one record at a time. :func:`ordered_map` hands chunks of records to a process pool whose
workers each load the model's tokenizer once (from ``DataModel.spec``), and yields the results in
the order of the input, keeping at most ``WINDOW`` chunks per worker in flight: the output is the
single-process output, and RSS stays flat however long the file is.

Example:
    >>> for chunk, lines in ordered_map(encode_examples, model, chunked(records), workers=4):
    ...     out.write_encoded(text for text, _ in lines)
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .model import DataModel

CHUNK = 128  # records per task: enough to make pickling cheap beside tokenising, few enough to keep all cores busy
WINDOW = 4  # tasks in flight per worker
T = TypeVar("T")
R = TypeVar("R")

_model: DataModel | None = None  # a worker's own model, loaded once by _load


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def chunked(items: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _load(spec: tuple) -> None:
    global _model
    from .model import load_data_model

    path, options, max_length = spec
    _model = load_data_model(path, options, max_length=max_length)


def _call(fn: Callable, chunk: list) -> object:
    return fn(_model, chunk)


def ordered_map(fn: Callable[[DataModel | None, list[T]], R], model: DataModel | None, chunks: Iterable[list[T]], *,
                workers: int) -> Iterator[tuple[list[T], R]]:
    """``(chunk, fn(model, chunk))`` for each chunk, in order.

    Args:
        fn: a module-level function (or a ``functools.partial`` of one): the workers unpickle it.
        model: the model; each worker loads its own from ``model.spec``. None: no model, this process.
        chunks: the input, read as the workers need it (see :func:`chunked`).
        workers: processes; 1, a model built by hand (no ``spec``) or an input of one chunk: this process.
    """
    chunks = iter(chunks)
    head = list(itertools.islice(chunks, 2))
    if workers <= 1 or model is None or model.spec is None or len(head) < 2:
        for chunk in itertools.chain(head, chunks):
            yield chunk, fn(model, chunk)
        return
    # spawn, not fork: the parent may hold torch's and the Rust tokenizers' threads, which a fork does not copy
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_load, initargs=(model.spec,)) as pool:
        pending: deque = deque()
        for chunk in itertools.chain(head, chunks):
            pending.append((chunk, pool.submit(_call, fn, chunk)))
            if len(pending) >= workers * WINDOW:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
