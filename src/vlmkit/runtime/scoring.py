"""Scoring models: one image against texts -> a score per text (image-text matching), loaded once.

A family whose form can ``score`` (``families.can(found, "score")``) returns a ``Scorer`` from its
``score(found, options)`` capability. ``vlmkit score`` / ``api.score`` load one for one call;
``vlmkit serve`` loads one for the server's life and answers ``POST /v1/score`` with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from .. import families
from ..options import LoadOptions
from ..tensors import resolve


class Scorer(ABC):
    """A loaded image-text scoring model."""

    @abstractmethod
    def score(self, image, texts: list[str]) -> list[dict]:
        """``[{"text", "itm", "itc"}, ...]``, one per text: ``image`` (a decoded RGB PIL image) against each text.

        ``itm``: the probability that the text matches; ``itc``: the contrastive similarity.
        """


def is_scoring_model(found: families.Found | None) -> bool:
    """Whether ``found`` is a scoring model: it scores and does not chat (``vlmkit serve`` answers /v1/score)."""
    return families.can(found, "score") and not families.can(found, "chat_backend")


def load_scorer(path: str | Path, *, options: LoadOptions | None = None, **load_options) -> Scorer:
    """A scoring model from ``path`` (a family form that can score), or a ConfigError saying what it is."""
    options = options or LoadOptions(**load_options)
    found = families.require(resolve(path), "score")
    return found.family.score(found, options)
