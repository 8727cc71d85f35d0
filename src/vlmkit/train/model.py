"""Building, loading and reading back a model under training, with or without ZeRO-3.

The family builds its model (its ``training`` capability) with these: under ZeRO-3 the model is
built partitioned (``deepspeed.zero.Init``) and every tensor is loaded inside
``GatheredParameters(..., modifier_rank=0)``: loading a partial checkpoint into partitioned
parameters is what fails with "size mismatch ... torch.Size([0])" in LLaVA issue #1619. The
outputs and checkpoints read the parameters back the same way (``gathered``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

Reader = Callable[[], torch.Tensor]  # reads one tensor when called: weights are in memory once, in the model


def zero_init(zero3: dict | None):
    """The context a model is built in: partitioned at construction under ZeRO-3, else nothing."""
    if zero3 is None:
        return contextlib.nullcontext()
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    deepspeed.init_distributed()  # wraps the process group the Trainer's arguments opened (CPU: gloo)
    # the Trainer's copy, with the "auto" batch values filled in from its arguments
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config() or zero3)


def gathered_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape (a ZeRO-3 partition's own shape is [0])."""
    return tuple(getattr(param, "ds_shape", param.shape))


def load(model: nn.Module, state: dict[str, Reader], *, partitioned: bool) -> None:
    """Read each tensor into its parameter; under ZeRO-3 one module at a time inside ``GatheredParameters``,
    read by rank 0 only (it scatters the partitions)."""
    params = dict(model.named_parameters())
    if not partitioned:
        with torch.no_grad():
            for name, read in state.items():
                params[name].copy_(read())
        return
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    for prefix, module in model.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
        own = [(n, p) for n, p in own if n in state]
        if not own:
            continue
        # #1619: a partitioned parameter is torch.Size([0]) until gathered; rank 0's copy is scattered on exit
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    for name, p in own:
                        p.copy_(state[name]())


def gathered(params: list[tuple[str, nn.Parameter]]):
    """``(name, cpu tensor)`` for each parameter, gathered from the ZeRO-3 partitions when there are some."""
    for name, param in params:
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                tensor = param.data.detach().cpu().clone()
        else:
            tensor = param.detach().cpu().clone()
        yield name, tensor
