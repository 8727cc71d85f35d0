"""LAVIS's Q-Former models are told apart by the keys a checkpoint holds, not by the order families are asked in.

BLIP-2 OPT / Flan-T5 (``blip2``), InstructBLIP (``instructblip``: its Flan-T5 has ``t5_proj`` too) and the stage-1
retrieval model (``blip2_retrieval``), and FLAVA beside them: every tiny checkpoint of every variant each family
walks, and BLIP-2's full state dicts, is claimed by exactly one family's ``recognise``.
"""

from __future__ import annotations

import pytest

from vlmkit import families
from vlmkit.families.blip2 import tiny as blip2_tiny
from vlmkit.tensors.safe_pickle import peek_state_dict

LAVIS_SIDE = ("blip2", "instructblip", "blip2_retrieval", "flava")
CASES = [(name, variant) for name in LAVIS_SIDE for variant in families.load(name).variants()]


def claimed_by(path) -> list[str]:
    config = families.read_config(path)
    return [family.NAME for family in families.families() if family.recognise(path, config) is not None]


@pytest.mark.parametrize("name, variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_each_tiny_checkpoint_is_claimed_by_its_family_alone(name, variant, tmp_path):
    path = families.load(name).make_tiny(tmp_path, variant)
    assert claimed_by(path) == [name]
    assert families.find(path).name == name


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_a_blip2_full_state_dict_is_blip2_s_alone(lm, tmp_path):
    """``original_model.state_dict()`` of Blip2OPT / Blip2T5: no word embeddings in the Q-Former (set to None)."""
    path = blip2_tiny.make_full(tmp_path / f"blip2_{lm}_full.pth", lm)
    assert claimed_by(path) == ["blip2"]


def test_blip2_lm_kind_refuses_an_instructblip_flan_t5(tmp_path):
    """Both carry t5_proj; the InstructBLIP Q-Former keeps its word embeddings (it reads the instruction) and has no
    stage-1 Qformer.cls head, so BLIP-2's own reading of the keys leaves it to InstructBLIP."""
    from vlmkit.families.blip2.checkpoint import lm_kind
    from vlmkit.families.instructblip.checkpoint import lm_of

    release = families.load("instructblip").make_tiny(tmp_path, "t5")
    names = peek_state_dict(release)
    assert "t5_proj.weight" in names and "Qformer.bert.embeddings.word_embeddings.weight" in names
    assert lm_kind(names) is None
    assert lm_of(names).name == "t5"
    blip2_release = peek_state_dict(blip2_tiny.make_release(tmp_path / "blip2_pretrained_flant5xl.pth", "t5"))
    assert lm_kind(blip2_release).name == "t5" and lm_of(blip2_release) is None
