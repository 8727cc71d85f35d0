"""argparse ``type=`` functions for numeric flags: a value out of range is refused while parsing.

argparse then prints the usage and ``error: argument --port: 99999 is out of range: use 1 to 65535``
and exits with 2, before anything is loaded or bound (``--port 99999`` used to be passed on to the
socket layer, which listened on some other port).

Example:
    >>> parser.add_argument("--port", type=PORT, default=8000)
    >>> parser.add_argument("--request-timeout", type=number(above=0), default=300.0)
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _range(low, high, above) -> str:
    if above is not None:
        return f"above {above}" + (f" and at most {high}" if high is not None else "")
    if high is None:
        return f"{low} or more"
    return f"{low} to {high}" if low is not None else f"at most {high}"


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[low, high]`` (either end open when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {_range(low, high, None)}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, *, above: float | None = None
           ) -> Callable[[str], float]:
    """A finite number in ``[low, high]``, or ``> above`` (nan and inf are refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if (not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
                or (above is not None and value <= above)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {_range(low, high, above)}")
        return value

    parse.__name__ = "number"
    return parse


PORT = integer(1, 65535)  # 0 would let the system pick one nobody was told
