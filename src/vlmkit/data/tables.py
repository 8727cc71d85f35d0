"""Image-caption tables (the handbook's Wukong CSV, LAION / CC3M url + caption lists) as LLaVA records.

Each row becomes one single-turn record: the instruction (a fixed prompt, or one of a
list chosen per row with a seeded generator, as LLaVA's captioning pre-training data
does) with ``<image>`` placed before or after it, and the caption as the answer.

Example:
    >>> mapping = TableMapping(image_column="dir", text_column="text", prompts=("为该图片生成标注。",))
    >>> to_record = mapping.bind(["dir", "text"], "wukong_test.csv")
    >>> to_record("wukong_test.csv:2", {"dir": "a.jpg", "text": "一只猫"}, 0).turns[0].text
    '<image>\\n为该图片生成标注。'
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .records import ASSISTANT, IMAGE_TOKEN, USER, DataError, Record, Turn

# Column names tried, in order, when none is given (Wukong's test CSV: dir/text; its release, LAION, CC3M: url/caption).
IMAGE_COLUMNS = ("image", "dir", "path", "file", "filename", "image_path", "url", "URL")
TEXT_COLUMNS = ("text", "caption", "TEXT", "CAPTION", "sentence", "title")
_FIELD = re.compile(r"\{([^{}]+)\}")


def _before(prompt: str) -> str:
    return f"{IMAGE_TOKEN}\n{prompt}"


def _after(prompt: str) -> str:
    return f"{prompt}\n{IMAGE_TOKEN}"


# Where <image> goes relative to the instruction. LLaVA-1.5's own data has both; its training code moves
# it to the front anyway (preprocess_multimodal), other trainers (LLaMA-Factory, ms-swift) keep it where it is.
PLACEMENTS: dict[str, Callable[[str], str]] = {"before": _before, "after": _after, "none": lambda p: p}


@dataclass(frozen=True)
class TableMapping:
    """How the columns of a table become a record.

    Attributes:
        image_column / text_column: the image path (or URL) and the caption; None = guess from common names.
        id_column: the record id; else the image file's stem with ``id_from_file``, else the row number.
        prompts: instructions; one is chosen per row (seeded) when there are several. A prompt that
            already holds ``<image>`` is used as is.
        placement: "before" (``<image>\\nprompt``), "after" (``prompt\\n<image>``), "random" (either,
            seeded) or "none" (text only, no image placeholder).
        image_template: the image path built from the row, e.g. ``"images/{dir}"`` (``{row}`` = row number);
            default: the image column's value. Relative paths are relative to the training's image folder.
        image_folder: absolute paths under this folder are written relative to it.
        keep_columns: other columns copied into the record as they are.
        seed: seed of the prompt / placement choice (same seed, same data -> same records).
    """

    image_column: str | None = None
    text_column: str | None = None
    id_column: str | None = None
    id_from_file: bool = False
    prompts: tuple[str, ...] = ()
    placement: str = "before"
    image_template: str | None = None
    image_folder: Path | None = None
    keep_columns: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if not self.prompts:
            raise DataError("a table needs the instruction its captions answer",
                            hint="pass --prompt TEXT (e.g. --prompt '为该图片生成标注。') or --prompts FILE")
        if self.placement not in (*PLACEMENTS, "random"):
            raise DataError(f"--image-placement {self.placement!r} is unknown",
                            hint=f"use one of: {', '.join([*PLACEMENTS, 'random'])}")

    def bind(self, columns: Sequence[str], source: str) -> Callable[[str, dict, int], Record]:
        """Check the mapping against a table's columns and return ``(where, row, index) -> Record``.

        Raises:
            DataError: a named column is missing, or no column fits where none was named.
        """
        columns = list(columns)
        image = self.image_column or _guess(columns, IMAGE_COLUMNS)
        text = self.text_column or _guess(columns, TEXT_COLUMNS)
        fields = [image, text, self.id_column, *self.keep_columns]
        if self.image_template:
            fields += [f for f in _FIELD.findall(self.image_template) if f != "row"]
        missing = [c for c in fields if c is not None and c not in columns]
        if text is None:
            missing.append("(caption: --text-column)")
        if image is None and self.placement != "none" and not self.image_template:
            missing.append("(image: --image-column)")
        if missing:
            raise DataError(f"{source}: no column {', '.join(missing)}; the columns are {', '.join(columns)}",
                            hint="name them with --image-column / --text-column / --id-column")
        rng = random.Random(self.seed)
        prompts, placement = list(self.prompts), self.placement
        template, folder, keep = self.image_template, self.image_folder, self.keep_columns
        id_column, id_from_file = self.id_column, self.id_from_file
        # each prompt with <image> placed, made once (this runs per row: millions of times)
        placed = {(p, place): p if place == "none" or IMAGE_TOKEN in p else PLACEMENTS[place](p)
                  for p in prompts for place in PLACEMENTS}
        one = prompts[0] if len(prompts) == 1 else None

        def to_record(where: str, row: dict, index: int) -> Record:
            prompt = one if one is not None else rng.choice(prompts)
            place = placement if placement != "random" else ("before" if rng.random() < 0.5 else "after")
            images = []
            if place != "none":
                path = _fill(template, row, index) if template else str(row[image] or "")
                images = [_relative(path, folder) if folder is not None else path] if path else []
            record_id = (str(row[id_column]) if id_column else
                         PurePosixPath(images[0]).stem if id_from_file and images else f"{index:09d}")
            caption = row[text]
            turns = [Turn(USER, placed[prompt, place]), Turn(ASSISTANT, "" if caption is None else str(caption))]
            return Record(record_id, images, turns, None, {c: row[c] for c in keep} if keep else {}, where)

        return to_record


def _guess(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in columns), None)


def _fill(template: str, row: dict, index: int) -> str:
    return _FIELD.sub(lambda m: str(index) if m.group(1) == "row" else str(row[m.group(1)]), template)


def _relative(path: str, folder: Path | None) -> str:
    if folder is None or "://" in path:
        return path
    p = Path(path)
    if p.is_absolute():
        try:
            return p.relative_to(folder.resolve()).as_posix()
        except ValueError:
            return path
    return path


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Prompts from a file: a JSON list of strings, or one prompt per line (blank lines skipped)."""
    import json

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"--prompts {path}: cannot read ({e.strerror})") from None
    if text.lstrip().startswith("["):
        prompts = json.loads(text)
        if not all(isinstance(p, str) for p in prompts):
            raise DataError(f"--prompts {path}: the JSON list must hold strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"--prompts {path}: no prompts in the file", hint="one prompt per line")
    return tuple(p.replace("\\n", "\n") for p in prompts)
