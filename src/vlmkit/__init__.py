"""vlmkit: convert, verify, run, serve and fine-tune vision-language models.

The Python API (``vlmkit.inspect``, ``vlmkit.convert``, ``vlmkit.verify``, ``vlmkit.load``) is what the
``vlmkit`` command calls.
"""

__version__ = "0.1.0"

from .api import convert, inspect, load, verify  # noqa: E402
from .errors import VlmkitError  # noqa: E402

__all__ = ["__version__", "convert", "inspect", "load", "verify", "VlmkitError"]
