"""``conversion.lora_merge``: the one LoRA merge (conversion, training, merge-lora), against peft's own."""

import pytest
import torch
from torch import nn

from vlmkit.conversion import lora_merge


def _peft_merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, r: int, alpha: int) -> torch.Tensor:
    """The weight peft's ``merge_and_unload`` leaves: the original builder's merge (``load_pretrained_model``)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype))
    with torch.no_grad():
        model.q_proj.weight.copy_(weight)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"]))
    result = set_peft_model_state_dict(peft_model, {"base_model.model.q_proj.lora_A.weight": a,
                                                    "base_model.model.q_proj.lora_B.weight": b})
    assert not result.unexpected_keys
    return peft_model.merge_and_unload().q_proj.weight.detach()


@pytest.mark.parametrize("base_dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_lora_merge_is_peft_merge_and_unload(base_dtype, adapter_dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 16, generator=g).to(base_dtype)
    a = (torch.randn(4, 16, generator=g) * 0.1).to(adapter_dtype)
    b = (torch.randn(12, 4, generator=g) * 0.1).to(adapter_dtype)  # trained: not zero
    op = lora_merge(8 / 4)
    assert op.shapes([(12, 16), (4, 16), (12, 4)]) == [(12, 16)]
    [merged] = op([weight, a, b])
    assert merged.dtype == torch.float32  # rounded once, by whoever writes it (the engine's target dtype)
    assert torch.equal(merged.to(base_dtype), _peft_merged(weight, a, b, r=4, alpha=8))


def test_lora_merge_refuses_factors_of_another_weight():
    with pytest.raises(ValueError, match="do not fit the weight"):
        lora_merge(1.0).shapes([(12, 16), (4, 8), (12, 4)])
