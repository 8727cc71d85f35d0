"""torchvision beside a CPU torch, in the vLLM processes vlmkit starts (on ``PYTHONPATH``, so it runs first).

The only torchvision wheel for torch 2.13 on PyPI (0.28.0) is a CUDA build: its C++ library
needs ``libtorch_cuda.so``, so it does not load against ``torch==2.13.0+cpu`` and torchvision
registers none of its operators. Its Python parts do not need them, except
``torchvision/_meta_registrations.py``, which registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally and fails with "operator torchvision::nms does not exist".
vLLM's LLaVA imports torchvision (transformers' image processors, through pixtral).

This hook runs just before that module: when torchvision's library did not load, it defines
the schemas of those two operators, so the registration succeeds and ``import torchvision``
works. The operators still have no kernel (calling them fails, as torchvision without its
library says anyway); vLLM's LLaVA path never calls them. With a torchvision whose library
loads, the hook does nothing.
"""

from __future__ import annotations

import importlib.abc
import sys

SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIBRARIES = []  # keep the definitions alive


class _BeforeMetaRegistrations(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision._meta_registrations":
            return None
        sys.meta_path.remove(self)
        extension = sys.modules.get("torchvision.extension")
        if extension is not None and not extension._has_ops():
            import torch

            library = torch.library.Library("torchvision", "DEF")
            for schema in SCHEMAS:
                library.define(schema)
            _LIBRARIES.append(library)
        return None  # the module itself is imported as usual


sys.meta_path.insert(0, _BeforeMetaRegistrations())
