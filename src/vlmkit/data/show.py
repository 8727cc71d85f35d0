"""``--show``: a training example as text, with the spans the loss is taken on highlighted.

Trained spans are green on a terminal, and wrapped in ``⟦ ⟧`` otherwise (pipes, logs, tests);
masked spans are dimmed on a terminal and plain otherwise. ``<image>`` stands for the -200
placeholder, with the number of features the model puts there when known.
"""

from __future__ import annotations

import re

from ..runtime.tokens import IMAGE_TOKEN_INDEX
from .encoders import Encoder
from .tokenize import IGNORE_INDEX, Example

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
STYLES = {True: ("\x1b[1;32m", "\x1b[0m", "\x1b[2m", "\x1b[0m"), False: ("⟦", "⟧", "", "")}


def _text(pieces: list[str]) -> str:
    """SentencePiece pieces as text: "▁" is a space, runs of byte pieces are UTF-8."""
    out, pending = [], bytearray()
    for piece in pieces:
        m = _BYTE.match(piece)
        if m:
            pending.append(int(m.group(1), 16))
            continue
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
        out.append(piece.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n"))
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


def highlight(example: Example, encoder: Encoder, *, color: bool = False) -> str:
    """``example`` as one block of text: a header line, then the prompt with its trained spans marked."""
    on, off, dim_on, dim_off = STYLES[color]
    pieces = encoder.pieces(example.input_ids)
    if example.image_tokens:
        pieces = [f"<image×{example.image_tokens}>" if t == IMAGE_TOKEN_INDEX else p
                  for t, p in zip(example.input_ids, pieces)]
    chunks, run, trained = [], [], None
    for piece, label in zip(pieces, example.labels):
        flag = label != IGNORE_INDEX
        if flag != trained and run:
            chunks.append((trained, run))
            run = []
        trained = flag
        run.append(piece)
    if run:
        chunks.append((trained, run))
    body = "".join(f"{on}{_text(r)}{off}" if t else f"{dim_on}{_text(r)}{dim_off}" for t, r in chunks)
    cut = f", cut from {example.length}" if example.length > len(example.input_ids) else ""
    return (f"── {example.id}: {len(example.input_ids)} ids{cut}, {example.trained} trained ──\n{body}")
