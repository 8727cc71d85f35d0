import pytest
import torch

from vlmkit.conversion import (Chunk, Concat, Pattern, Permute, Reshape, ResizeRows, Rule, drop, fuse, rename,
                            reverse, split, transform, transpose)


def test_pattern_captures_and_formats():
    p = Pattern("model.layers.{layer}.mlp.{rest:path}")
    assert p.match("model.layers.12.mlp.up_proj.weight") == {"layer": "12", "rest": "up_proj.weight"}
    assert p.match("model.layers.x.mlp.up_proj.weight") is None  # {layer} is an integer
    assert p.match("model.layers.1.mlp.") is None  # {rest:path} is non-empty
    assert p.format({"layer": "3", "rest": "w"}) == "model.layers.3.mlp.w"
    assert Pattern("a.b").match("aXb") is None  # dots are literal


def test_pattern_refuses_malformed_placeholders():
    with pytest.raises(ValueError, match="malformed"):
        Pattern("a.{layer.b")
    with pytest.raises(ValueError, match="twice"):
        Pattern("{i}.{i}")


def test_rules_are_checked_when_built():
    with pytest.raises(ValueError, match="must say why"):
        Rule((Pattern("a"),), ())
    with pytest.raises(ValueError, match="uses a name no source captures"):
        rename("a.{i}", "b.{j}")
    with pytest.raises(ValueError, match="ops produce 1 tensor"):
        transform(["a", "b"], ["c", "d"], Concat(0, 2))
    with pytest.raises(ValueError, match="expects 3 tensors, got 2"):
        transform(["a", "b"], "c", Concat(0, 3))
    with pytest.raises(Exception):
        r = rename("a", "b")
        r.ops = ()  # rules are values


@pytest.mark.parametrize("op, inputs", [
    (Concat(1, 3), [torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)]),
    (Chunk(0, 3), [torch.randn(6, 2)]),
    (Permute((1, 0)), [torch.randn(2, 5)]),
    (Permute((2, 0, 1)), [torch.randn(2, 3, 4)]),
    (Reshape((1, 6), (6,)), [torch.randn(6)]),
    (ResizeRows(4, 7), [torch.randn(4, 3)]),
])
def test_ops_predict_shapes_and_invert(op, inputs):
    out = op(inputs)
    assert [tuple(t.shape) for t in out] == op.shapes([tuple(t.shape) for t in inputs])
    back = op.inverse(out)
    assert len(back) == len(inputs) and all(torch.equal(a, b) for a, b in zip(back, inputs))


def test_resize_rows_draws_new_rows_reproducibly():
    def noisy(existing, n, generator):
        return torch.randn((n, existing.shape[1]), generator=generator)

    t = torch.randn(4, 3)
    a = ResizeRows(4, 6, noisy, seed=1)([t])[0]
    b = ResizeRows(4, 6, noisy, seed=1)([t])[0]
    c = ResizeRows(4, 6, noisy, seed=2)([t])[0]
    assert torch.equal(a, b) and not torch.equal(a[4:], c[4:]) and torch.equal(a[:4], t)


def test_op_shape_errors_are_explained():
    with pytest.raises(ValueError, match="does not split into 4 equal parts"):
        Chunk(0, 4).shapes([(6, 2)])
    with pytest.raises(ValueError, match="cannot concatenate"):
        Concat(0, 2).shapes([(2, 3), (2, 4)])
    with pytest.raises(ValueError, match="expected 5 rows"):
        ResizeRows(5, 8).shapes([(4, 2)])


def test_reverse_swaps_sides_and_inverts_ops():
    rules = [fuse(["q.{i}", "k.{i}", "v.{i}"], "qkv.{i}", dim=0), transpose("w", "wt"),
             split("ab", ["a", "b"], dim=1), drop("x", why="unused")]
    back = reverse(rules)
    assert [str(p) for p in back[0].sources] == ["qkv.{i}"] and back[0].ops == (Chunk(0, 3),)
    assert back[1].ops == (Permute((1, 0)),)
    assert back[2].ops == (Concat(1, 2),)
    assert len(back) == 3  # drops cannot run backwards
