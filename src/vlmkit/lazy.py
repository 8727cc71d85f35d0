"""Heavy libraries imported on first use, so that ``vlmkit --help`` and ``vlmkit inspect`` start fast.

A module that needs a library only inside its functions takes it from here instead of importing it
at the top; nothing at module level may read its attributes (that would import it at once).

``from ..lazy import torch`` gives a stand-in that imports torch the first time one of its
attributes is read (``torch.cat``, ``torch.Tensor``), and is then torch itself in every way that
matters to the module that holds it. Annotations need nothing (``from __future__ import annotations``).
"""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """A module imported on first attribute access; ``sys.modules`` holds it only from then on."""

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads are plain attribute reads
        return getattr(module, attr)


torch = LazyModule("torch")
numpy = LazyModule("numpy")
sentencepiece = LazyModule("sentencepiece")
sentencepiece_model_pb2 = LazyModule("sentencepiece.sentencepiece_model_pb2")
