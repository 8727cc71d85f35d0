"""``vlmkit data check``: every record validated before a GPU hour is spent on it.

Each problem has a code, a severity and a fix (:data:`PROBLEMS`). Errors are records the
training would use wrongly or fail on; warnings are records it would use, but probably not
as meant, among them the records the original trains on in its own way (``tokenize.QUIRKS``:
vlmkit trains them the same way; each message says how; ``strict`` makes them errors). Without
a model the record's turns are read as a chat template reads them. With a model, every record
is also tokenised by the training's own preprocessing (``tokenize.tokenize``) to count its
tokens (image features included) and to find the records whose labels would all be masked.

Example:
    >>> report = check("wukong.jsonl", image_folder="images")
    >>> report.errors, report.problems["missing_image"].count
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ImageError
from .convert import open_records
from .files import RecordWriter
from .formats import get_format
from .pool import chunked, ordered_map
from .records import ASSISTANT, IMAGE_TOKEN, USER, Record
from .tokenize import QUIRKS, RecordError, structure, tokenize

if TYPE_CHECKING:  # the model and the image reader import torch: `vlmkit.data` imports this module eagerly
    from .model import DataModel

EXAMPLES = 20  # records named per problem in the report (all of them in JSON for all_masked)
IMAGE_CACHE = 100_000


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    what: str
    fix: str


PROBLEMS: dict[str, Problem] = {
    "missing_image": Problem("error", "image file missing",
                             "fix the path or --image-folder; `vlmkit data download` turns URLs into files"),
    "unreadable_image": Problem("error", "image cannot be decoded", "re-download or re-export it, or drop the record"),
    "truncated_image": Problem("error", "image data truncated or corrupt", "re-download it, or drop the record"),
    "image_too_large": Problem("error", "image above the pixel limit", "downscale it, or raise --max-pixels"),
    "image_count": Problem("error", "<image> in several turns for one image, or placeholders that do not match "
                           "the images", "one '<image>' per image, in the question that shows it"),
    "roles": Problem("error", "roles the original fails on: not alternating human/gpt after the first human turn, "
                     "or neither human nor gpt", "alternate human and gpt; drop stray turns"),
    "unanswered": Problem("error", "last turn is the human's (nothing to train on after it)",
                          "end every conversation with the answer"),
    "empty_turn": Problem("error", "empty turn", "fill in or drop the turn (an empty answer breaks the masking)"),
    "untrainable": Problem("error", "training would mask every label or fail",
                           "see the message; fix the record or drop it (--fix)"),
    "duplicate_id": Problem("warning", "duplicate id", "make ids unique (--id-column / --id-from-file at convert)"),
    "duplicate_pair": Problem("warning", "duplicate (image, text) pair: trained twice", "drop the copy (--fix does)"),
    "multi_image": Problem("warning", "several images in one record: the original LLaVA training takes one",
                           "split the record, or train with a multi-image recipe"),
    "system_ignored": Problem("warning", "per-record system prompt: LLaVA's training ignores it",
                              "fold it into the first question if it matters"),
    "truncated": Problem("warning", "longer than --max-length: the end is cut off",
                         "raise --max-length or shorten the record"),
    # tokenize.QUIRKS: trained as the original trains them; --strict makes them errors
    "leading_gpt": Problem("warning", "starts with a gpt turn: the original drops it",
                           "start with the human's turn, or drop the first turn"),
    "image_in_answer": Problem("warning", "<image> inside an answer: the original moves it to the front of that answer",
                               "move it to the question"),
    "image_unplaced": Problem("warning", "image without an <image> placeholder: the original trains the text only",
                              "put '<image>\\n' before the first question"),
    "image_merged": Problem("warning", "several <image> in one turn for one image: the original keeps one",
                            "one '<image>' per image"),
    "text_placeholder": Problem("warning", "<image> in a record without an image",
                                "remove it, or give the record its image"),
    "roles_ignored": Problem("warning", "plain template: roles ignored, turn 2 is the caption whoever speaks it",
                             "a human turn with <image>, then the gpt caption"),
}
# ImageError messages of runtime.images.load_image -> problem code (first match wins).
IMAGE_CODES = (("no such file", "missing_image"), ("more than the limit", "image_too_large"),
               ("huge image", "image_too_large"), ("truncated or corrupt", "truncated_image"))


@dataclass
class Tally:
    """How many records have one problem, and the first few of them."""

    count: int = 0
    examples: list[dict] = field(default_factory=list)


@dataclass
class TokenStats:
    """Token lengths (image features included) of the records the model's template accepts."""

    template: str
    max_length: int
    max_length_from: str
    image_tokens: int | None
    edges: list[int]
    histogram: list[int]
    count: int = 0
    total: int = 0
    minimum: int | None = None
    maximum: int = 0
    over_max_length: int = 0
    unknown_length: int = 0  # anyres records whose image could not be measured
    all_masked: list[str] = field(default_factory=list)

    def add(self, length: int) -> None:
        self.count += 1
        self.total += length
        self.minimum = length if self.minimum is None else min(self.minimum, length)
        self.maximum = max(self.maximum, length)
        self.over_max_length += length > self.max_length
        bucket = sum(1 for edge in self.edges[1:] if length >= edge)
        self.histogram[bucket] += 1

    def to_dict(self) -> dict:
        bins = [{"from": lo, "to": hi - 1 if hi else None, "count": n}
                for lo, hi, n in zip(self.edges, [*self.edges[1:], None], self.histogram)]
        return {"template": self.template, "max_length": self.max_length, "max_length_from": self.max_length_from,
                "image_tokens": self.image_tokens, "records": self.count, "min": self.minimum,
                "mean": round(self.total / self.count, 1) if self.count else None, "max": self.maximum if self.count
                else None, "histogram": bins, "over_max_length": self.over_max_length,
                "unknown_length": self.unknown_length, "all_masked": self.all_masked}


@dataclass
class Report:
    """The result of :func:`check`."""

    path: Path
    format: str
    records: int = 0
    errors: int = 0  # records with at least one error
    warnings: int = 0  # records with warnings only
    problems: dict[str, Tally] = field(default_factory=dict)
    tokens: TokenStats | None = None
    fixed: dict | None = None
    seconds: float = 0.0
    strict: bool = False  # the records the original trains on in its own way (tokenize.QUIRKS) are errors

    def severity(self, code: str) -> str:
        return "error" if self.strict and code in QUIRKS else PROBLEMS[code].severity

    @property
    def ok(self) -> int:
        return self.records - self.errors - self.warnings

    def failed(self, strict: bool = False) -> bool:
        return bool(self.errors or (strict and self.warnings))

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "records": self.records, "ok": self.ok,
                "errors": self.errors, "warnings": self.warnings,
                "problems": {code: {"severity": self.severity(code), "what": PROBLEMS[code].what,
                                    "fix": PROBLEMS[code].fix, "count": t.count, "examples": t.examples}
                             for code, t in self.problems.items()},
                "tokens": self.tokens.to_dict() if self.tokens else None, "fixed": self.fixed,
                "seconds": round(self.seconds, 3)}


class _Context:
    """State that spans records: seen ids and pairs, the image cache, the model."""

    def __init__(self, image_folder: Path | None, max_pixels: int | None, model: DataModel | None):
        self.image_folder, self.max_pixels, self.model = image_folder, max_pixels, model
        self.ids: dict[str, str] = {}
        self.pairs: dict[bytes, str] = {}
        self.images: OrderedDict[str, tuple[str | None, str, tuple[int, int] | None]] = OrderedDict()

    def image(self, name: str) -> tuple[str | None, str, tuple[int, int] | None]:
        """(problem code or None, message, (width, height)) of one image, cached."""
        if name in self.images:
            self.images.move_to_end(name)
            return self.images[name]
        result = self._inspect(name)
        self.images[name] = result
        if len(self.images) > IMAGE_CACHE:
            self.images.popitem(last=False)
        return result

    def _inspect(self, name: str):
        if "://" in name:
            return "missing_image", f"{name} is a URL, not a file", None
        path = Path(name) if Path(name).is_absolute() or self.image_folder is None else self.image_folder / name
        if not path.is_file():
            return "missing_image", f"{path}: no such file", None
        from ..runtime.images import DEFAULT_MAX_PIXELS, load_image

        try:
            size = load_image(path, max_pixels=self.max_pixels or DEFAULT_MAX_PIXELS).size
        except ImageError as e:
            code = next((c for text, c in IMAGE_CODES if text in e.message), "unreadable_image")
            return code, e.message, None
        return None, "", size


def _structure(record: Record, template: str | None) -> list[tuple[str, str]]:
    """Problems visible in the record alone (``template``: the model's, None without a model: a chat template)."""
    found = [("image_count" if code == "images" else code, message) for code, message in structure(record, template)]
    turns = record.turns
    if turns and not any(code == "roles" for code, _ in found) and turns[-1].role != ASSISTANT \
            and template != "plain":
        found.append(("unanswered", f"{len(turns)} turns, the last one the human's"))
    # a question may be the bare <image>; so may plain's turn 1, whoever speaks it (plain replaces it by <image>)
    empty = [j + 1 for j, t in enumerate(turns) if not t.text.replace(IMAGE_TOKEN, "").strip()
             and not (IMAGE_TOKEN in t.text and (t.role == USER or template == "plain" and j == 0))]
    if empty:
        found.append(("empty_turn", f"turn {empty[0]} is empty" + (f" (and {len(empty) - 1} more)" if len(empty) > 1
                                                                   else "")))
    if len(record.images) > 1:
        if record.placeholders() != len(record.images):
            found.append(("image_count", f"{record.placeholders()} <image> placeholder(s) for {len(record.images)} "
                                         "images"))
        found.append(("multi_image", f"{len(record.images)} images"))
    if record.system is not None:
        found.append(("system_ignored", f"system prompt {record.system[:40]!r}"))
    return found


def _duplicates(record: Record, ctx: _Context) -> list[tuple[str, str]]:
    found = []
    first = ctx.ids.setdefault(record.id, record.where)
    if first != record.where:
        found.append(("duplicate_id", f"id {record.id!r} also at {first}"))
    digest = hashlib.blake2b("\x00".join([*record.images, "\x01", *(t.text for t in record.turns)]).encode(),
                             digest_size=16).digest()
    earlier = ctx.pairs.setdefault(digest, record.id)
    if earlier != record.id:
        found.append(("duplicate_pair", f"same images and text as record {earlier!r}"))
    return found


def _measure(model: DataModel, chunk: list[tuple[Record, list, list, bool]]) -> list[tuple | None]:
    """What the tokenizer says of each record of ``chunk`` that it is asked about: ``("length", expanded length
    or None)`` or ``("refused", code, reason)``; run here or in a worker of ``pool.ordered_map``."""
    outcomes = []
    for record, sizes, _, ask in chunk:
        if not ask:
            outcomes.append(None)
            continue
        per_image = model.image_tokens(sizes[0]) if record.images and sizes and sizes[0] else model.fixed_image_tokens
        try:
            example = tokenize(record, model.template, model.encoder, max_length=model.max_length,
                               image_tokens=per_image)
        except RecordError as e:
            outcomes.append(("refused", e.code, e.reason))
            continue
        outcomes.append(("length", example.expanded_length))
    return outcomes


def _tokens(record: Record, outcome: tuple, model: DataModel, stats: TokenStats) -> list[tuple[str, str]]:
    if outcome[0] == "refused":
        if outcome[1] in ("mismatch", "masked", "unk", "unrenderable", "unsupported"):
            stats.all_masked.append(record.id)
        return [("untrainable", outcome[2])]
    length = outcome[1]
    if length is None:
        stats.unknown_length += 1
        return []
    stats.add(length)
    if length > model.max_length:
        return [("truncated", f"{length} tokens with image features, --max-length {model.max_length}")]
    return []


def check(path: str | os.PathLike, *, image_folder: str | os.PathLike | None = None, model: DataModel | None = None,
          max_pixels: int | None = None, source_format: str = "auto", fix: str | os.PathLike | None = None,
          fix_format: str = "llava", force: bool = False, strict: bool = False, workers: int = 1) -> Report:
    """Validate every record of ``path``.

    Args:
        path: records (LLaVA / ShareGPT / messages; JSON, JSONL or Parquet).
        image_folder: where relative image paths start (LLaVA's ``--image_folder``).
        model: with a model, token statistics and untrainable records (see ``model.load_data_model``).
        max_pixels: images above this are reported (default: the runtime's decompression-bomb limit).
        source_format: "auto" or a format of ``formats.FORMATS``.
        fix: write the records without errors and without duplicates here (never over the input).
        fix_format: the format of the cleaned copy.
        force: replace an existing ``fix`` file.
        strict: report the records the original trains on in its own way (``tokenize.QUIRKS``: a leading
            gpt turn, ``<image>`` in an answer ...) as errors, not warnings; ``fix`` then drops them too.
        workers: processes tokenising (``pool.ordered_map``); the report is the same for any number.

    Returns:
        The :class:`Report`.
    """
    started = time.perf_counter()
    stream = open_records(path, source_format=source_format)
    report = Report(Path(path), stream.format, strict=strict)
    ctx = _Context(Path(image_folder) if image_folder is not None else None, max_pixels, model)
    if model is not None:
        # powers of two below the limit, then one bin for everything over it
        edges = [0, *(2 ** k for k in range(6, 17) if 2 ** k < model.max_length), model.max_length + 1]
        report.tokens = TokenStats(model.template, model.max_length, model.max_length_from, model.fixed_image_tokens,
                                   edges, [0] * len(edges))
    writer = RecordWriter(fix, force=force, sources=(path,)) if fix is not None else None
    encode = get_format(fix_format).encode
    kept = 0

    def read() -> Iterator[tuple[Record, list, list, bool]]:
        """Each record, the sizes of its images, its problems so far, and whether to tokenise it."""
        for record in stream:
            problems = _structure(record, model.template if model is not None else None) + _duplicates(record, ctx)
            sizes = []
            for name in record.images:
                code, message, size = ctx.image(name)
                sizes.append(size)
                if code:
                    problems.append((code, message))
            yield record, sizes, problems, model is not None and not any(report.severity(c) == "error"
                                                                         for c, _ in problems)

    with writer if writer is not None else _Null():
        for chunk, outcomes in ordered_map(_measure, model, chunked(read()), workers=workers):
            for (record, _, problems, _), outcome in zip(chunk, outcomes):
                if outcome is not None:
                    problems += _tokens(record, outcome, model, report.tokens)
                _count(report, record, problems)
                if writer is not None and not any(report.severity(c) == "error" or c.startswith("duplicate")
                                                  for c, _ in problems):
                    writer.write(encode(record))
                    kept += 1
    if writer is not None:
        report.fixed = {"path": str(fix), "kept": kept, "dropped": report.records - kept}
    report.seconds = time.perf_counter() - started
    return report


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _count(report: Report, record: Record, found: list[tuple[str, str]]) -> None:
    report.records += 1
    severities = {report.severity(code) for code, _ in found}
    report.errors += "error" in severities
    report.warnings += severities == {"warning"}
    for code in dict.fromkeys(code for code, _ in found):
        tally = report.problems.setdefault(code, Tally())
        tally.count += 1
        if len(tally.examples) < EXAMPLES:
            message = "; ".join(m for c, m in found if c == code)
            tally.examples.append({"id": record.id, "where": record.where, "message": message})


# ------------------------------------------------------------------------------ rendering
def render(report: Report, *, examples: int = 3) -> str:
    """The report as text for a terminal."""
    lines = [f"{report.path}: {report.records} record(s) ({report.format}): {report.ok} ok, {report.errors} with "
             f"errors, {report.warnings} with warnings only ({report.seconds:.1f} s)"]
    order = sorted(report.problems, key=lambda c: (report.severity(c) != "error", -report.problems[c].count))
    for code in order:
        problem, tally = PROBLEMS[code], report.problems[code]
        lines.append(f"  {report.severity(code):<7} {code:<17} {tally.count:>7}  {problem.what}")
        for ex in tally.examples[:examples]:
            lines.append(f"          - record {ex['id']!r} ({ex['where']}): {ex['message']}")
        if tally.count > examples:
            lines.append(f"          ... and {tally.count - examples} more (--json lists {EXAMPLES})")
        lines.append(f"          fix: {problem.fix}")
    if report.tokens is not None:
        lines += _render_tokens(report.tokens)
    if report.fixed:
        lines.append(f"cleaned copy: {report.fixed['path']} ({report.fixed['kept']} kept, "
                     f"{report.fixed['dropped']} dropped)")
    return "\n".join(lines)


def _render_tokens(stats: TokenStats) -> list[str]:
    per_image = f"{stats.image_tokens} features per image" if stats.image_tokens else "features per image by size"
    lines = [f"tokens (template {stats.template}, {per_image}, --max-length {stats.max_length} from "
             f"{stats.max_length_from}):"]
    if not stats.count:
        lines.append("  no record could be tokenised")
    else:
        lines.append(f"  {stats.count} record(s): min {stats.minimum}, mean {stats.total / stats.count:.1f}, "
                     f"max {stats.maximum} tokens (image features included)")
        peak = max(stats.histogram) or 1
        for lo, hi, n in zip(stats.edges, [*stats.edges[1:], None], stats.histogram):
            if n:
                span = f"{lo:>6} - {hi - 1:<6}" if hi else f"{lo:>6} +      "
                lines.append(f"  {span} {'#' * max(1, round(30 * n / peak)):<30} {n}")
        lines.append(f"  over --max-length {stats.max_length}: {stats.over_max_length} (cut off at the end)")
    if stats.unknown_length:
        lines.append(f"  {stats.unknown_length} record(s) not measured (their image could not be read)")
    shown = ", ".join(repr(i) for i in stats.all_masked[:EXAMPLES])
    more = f" ... and {len(stats.all_masked) - EXAMPLES} more (see --json)" if len(stats.all_masked) > EXAMPLES else ""
    lines.append(f"  every label masked: {len(stats.all_masked)}" + (f": {shown}{more}" if shown else ""))
    return lines
