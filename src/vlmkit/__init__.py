"""vlmkit: convert, verify, run, serve and fine-tune vision-language models.

The Python API (``vlmkit.inspect``, ``vlmkit.convert``, ``vlmkit.verify``, ``vlmkit.load``) is what the
``vlmkit`` command calls.
"""

from ._version import __version__
from .errors import VlmkitError

__all__ = ["__version__", "convert", "inspect", "load", "verify", "VlmkitError"]


def __getattr__(name: str):
    # The API functions are imported on first use: `import vlmkit` (and `vlmkit --help`) stays free of torch.
    if name in ("convert", "inspect", "load", "verify"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
