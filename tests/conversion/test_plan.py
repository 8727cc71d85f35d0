from pathlib import Path

import pytest

from vlmkit.conversion import Custom, compile_plan, drop, fuse, rename, transform, transpose
from vlmkit.errors import PlanError
from vlmkit.tensors import TensorInfo


def info(name, shape, dtype="F32"):
    n = 4 if dtype == "F32" else 2
    for d in shape:
        n *= d
    return TensorInfo(name, tuple(shape), dtype, n, Path("src.safetensors"))


SOURCES = [info("l.0.q", (4, 8)), info("l.0.k", (4, 8)), info("l.0.v", (4, 8)), info("l.1.q", (4, 8)),
           info("l.1.k", (4, 8)), info("l.1.v", (4, 8)), info("emb", (10, 8), "BF16"), info("ids", (3,), "I64"),
           info("rotary.inv_freq", (4,))]
RULES = [drop("rotary.inv_freq", why="recomputed at load"),
         fuse(["l.{i}.q", "l.{i}.k", "l.{i}.v"], "layers.{i}.qkv", dim=0),
         transpose("emb", "embed_t"),
         rename("{rest:path}", "other.{rest:path}")]


def test_plan_is_explicit_before_any_data():
    plan = compile_plan(RULES, SOURCES, dtype="F16")
    by_target = {t.name: t for t in plan.targets}
    assert by_target["layers.0.qkv"].shape == (12, 8) and by_target["layers.0.qkv"].dtype == "F16"
    assert [s.name for s in plan.steps[0].sources] == ["l.0.q", "l.0.k", "l.0.v"]
    assert by_target["embed_t"].shape == (8, 10) and by_target["embed_t"].dtype == "F16"
    assert by_target["other.ids"].dtype == "I64"  # integers are never cast
    assert [(d.source.name, d.why) for d in plan.drops] == [("rotary.inv_freq", "recomputed at load")]
    text = plan.render()
    assert "concat(dim=0)" in text and "dropped: recomputed at load" in text


def test_every_problem_is_reported_at_once():
    sources = [s for s in SOURCES if s.name != "l.1.v"] + [info("stray.tensor", (2,))]
    rules = RULES[:3]  # no catch-all: 'ids' and 'stray.tensor' are unclaimed
    with pytest.raises(PlanError) as e:
        compile_plan(rules, sources)
    problems = e.value.problems
    assert any("'l.1.v'" in p and "but not" in p for p in problems)
    assert any("no rule claims source tensor 'ids'" in p for p in problems)
    assert any("no rule claims source tensor 'stray.tensor'" in p for p in problems)
    assert "nothing was read or written" in str(e.value)


def test_duplicate_targets_and_expected_shapes():
    rules = [rename("a", "t"), rename("b", "t")]
    with pytest.raises(PlanError, match="'t' is produced twice"):
        compile_plan(rules, [info("a", (2,)), info("b", (2,))])
    with pytest.raises(PlanError) as e:
        compile_plan([rename("{x:path}", "{x:path}")], [info("a", (2,)), info("b", (3,))],
                     expected={"a": (2,), "b": (4,), "c": (1,)})
    text = "\n".join(e.value.problems)
    assert "'b' would be [3] but the target model expects [4]" in text
    assert "expected target 'c' [1] is not produced" in text


def test_fuse_refuses_mixed_dtypes_and_bad_shapes():
    with pytest.raises(PlanError, match="mix dtypes"):
        compile_plan([fuse(["a", "b"], "ab")], [info("a", (2,)), info("b", (2,), "BF16")])
    with pytest.raises(PlanError, match="cannot concatenate"):
        compile_plan([fuse(["a", "b"], "ab", dim=0)], [info("a", (2, 3)), info("b", (2, 4))])


def test_an_op_that_takes_mixed_float_dtypes_writes_the_first_sources():
    """A LoRA merge: a float16 weight with float32 factors is the usual case, not a mix-up."""
    add = Custom("add", lambda t: [t[0].float() + t[1].float()], lambda s: [s[0]], n_in=2, mixed_dtypes=True)
    rules = [transform(["w", "d"], "out", add)]
    sources = [info("w", (2,), "F16"), info("d", (2,), "F32")]
    assert compile_plan(rules, sources).targets[0].dtype == "F16"
    assert compile_plan(rules, sources, dtype="BF16").targets[0].dtype == "BF16"
    with pytest.raises(PlanError, match="mix dtypes"):  # floats only
        compile_plan(rules, [info("w", (2,), "F16"), info("d", (2,), "I64")])
