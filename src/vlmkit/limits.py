"""The ranges a user-given number must lie in: one table, read by the CLI, the Python API and the server.

The command line uses ``Limit.arg`` as an argparse ``type=`` (a usage error naming the flag, before
anything is loaded or bound: ``--port 99999`` was once passed on to the socket layer), the
Python API calls ``Limit.check`` (a ``ConfigError`` naming the argument), and the server's request
schema takes its bounds from ``Limit.schema`` (pydantic ``ge`` / ``gt`` / ``le``). Temperature stops at
2, as in the OpenAI API the server speaks, so that a value works in every entry point or in none.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Limit:
    """``low <= value <= high`` (``low < value`` when ``low_open``); ``high`` None means no upper bound."""

    name: str
    kind: type  # int or float
    low: float
    high: float | None = None
    low_open: bool = False
    unit: str = ""

    def describe(self) -> str:
        low = f"greater than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        high = f" and at most {self.high:g}" if self.high is not None else ""
        return f"must be {low}{high}{self.unit}"

    def problem(self, value) -> str | None:
        """Why ``value`` is refused, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.kind is int and not float(value).is_integer()):
            return f"must be {'an integer' if self.kind is int else 'a number'}"
        if not math.isfinite(value) or (value <= self.low if self.low_open else value < self.low) or (
                self.high is not None and value > self.high):
            return self.describe()
        return None

    def check(self, value, *, field: str | None = None):
        """``value`` as ``kind``; a ``ConfigError`` naming ``field`` (default: the limit's name) when out of range."""
        problem = self.problem(value)
        if problem:
            raise ConfigError(f"{field or self.name}={value!r} is out of range: {problem}",
                              hint=f"{self.name} {self.describe()}")
        return self.kind(value)

    def arg(self, text: str):
        """argparse ``type=``: parse and check one command-line value."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}")
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {problem}")
        return value

    def schema(self) -> dict:
        """pydantic ``Field`` bounds."""
        bounds = {"gt" if self.low_open else "ge": self.low}
        if self.high is not None:
            bounds["le"] = self.high
        return bounds


# Integers stop at int64's ends, as OpenAI's and vLLM's do, whatever a library is later asked (torch's
# seed overflows past 2**64): every number has both bounds, which the server's schema publishes.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

MAX_NEW_TOKENS = Limit("max_new_tokens", int, 1, INT64_MAX)
SEED = Limit("seed", int, INT64_MIN, INT64_MAX)
TEMPERATURE = Limit("temperature", float, 0, 2)  # 0 = greedy
TOP_P = Limit("top_p", float, 0, 1, low_open=True)
MAX_SHARD_SIZE = Limit("max_shard_size", int, 1, unit=" byte(s)")

PORT = Limit("port", int, 1, 65535)  # 0 would let the system pick one nobody was told


def integer(low: int, high: int | None = None):
    """argparse ``type=`` for a whole-number flag in ``[low, high]``."""
    return Limit("value", int, low, high).arg


def number(low: float, high: float | None = None, *, low_open: bool = False):
    """argparse ``type=`` for a finite number flag ``>= low`` (``> low`` when ``low_open``)."""
    return Limit("value", float, low, high, low_open=low_open).arg
