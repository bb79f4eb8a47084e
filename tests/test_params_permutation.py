"""Params arithmetic and Permutation / PermutationSpec, error paths included."""

import pytest
import torch

from reference.params import (
    check_compatible,
    check_finite,
    combine,
    combine_batch,
    distance,
    flatten,
    lerp,
    stack,
    to,
    unflatten,
    unstack,
)
from reference.permutation import Permutation, PermutationSpec


def _point(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(n, generator=g, dtype=torch.float64),
        "steps": torch.tensor(seed + 7),  # an integer buffer like num_batches_tracked
    }


def test_combine_weights_floats_and_keeps_integer_buffers():
    a, b, c = _point(0), _point(1), _point(2)
    out = combine([0.5, 0.25, 0.25], [a, b, c])
    torch.testing.assert_close(out["w"], 0.5 * a["w"] + 0.25 * b["w"] + 0.25 * c["w"])
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 7  # from the first point, not averaged
    with pytest.raises(ValueError, match="integer buffer 'steps' differs"):
        combine([0.5, 0.5], [a, b], int_policy="equal")
    with pytest.raises(ValueError, match="unknown int_policy"):
        combine([0.5, 0.5], [a, b], int_policy="mean")
    no_ints = {k: v for k, v in a.items() if k != "steps"}
    with pytest.raises(ValueError, match="unknown int_policy"):  # refused even without integer buffers
        combine([1.0], [no_ints], int_policy="mean")
    with pytest.raises(ValueError, match="expected 2 coefficients"):
        combine([1.0], [a, b])


def test_combine_does_not_mutate_inputs():
    a, b = _point(0), _point(1)
    before = {k: v.clone() for k, v in a.items()}
    combine([2.0, -1.0], [a, b])
    for k in a:
        assert torch.equal(a[k], before[k])


def test_lerp_endpoints_and_combine_batch_rows():
    a, b = _point(0), _point(1)
    for k in ("w", "b"):
        torch.testing.assert_close(lerp(a, b, 0.0)[k], a[k])
        torch.testing.assert_close(lerp(a, b, 1.0)[k], b[k])
    coeffs = torch.tensor([[1.0, 0.0], [0.3, 0.7], [-1.0, 2.0]], dtype=torch.float64)
    batch = combine_batch(coeffs, [a, b])
    for j in range(3):
        row = combine(coeffs[j], [a, b])
        torch.testing.assert_close(batch["w"][j], row["w"])
        assert int(batch["steps"][j]) == int(a["steps"])
    with pytest.raises(ValueError, match=r"coeffs must be \[K, 2\]"):
        combine_batch(torch.ones(3), [a, b])


def test_mismatched_keys_and_shapes_name_the_key():
    a = _point(0)
    with pytest.raises(ValueError, match=r"missing keys \['b'\]"):
        check_compatible(a, {"w": a["w"], "steps": a["steps"]})
    with pytest.raises(ValueError, match="key 'w': shape"):
        combine([0.5, 0.5], [a, {**a, "w": torch.zeros(5, 3, dtype=torch.float64)}])
    with pytest.raises(ValueError, match="key 'steps': dtype"):
        check_compatible(a, {**a, "steps": torch.tensor(1.0)})


def test_stack_unstack_flatten_unflatten_roundtrip():
    pts = [_point(s) for s in range(3)]
    st = stack(pts)
    assert st["w"].shape == (3, 4, 3)
    back = unstack(st)
    for p, q in zip(pts, back, strict=True):
        for k in p:
            assert torch.equal(p[k], q[k])
    v = flatten(pts[0])
    assert v.shape == (4 * 3 + 4,)
    r = unflatten(v * 2, pts[0])
    torch.testing.assert_close(r["w"], pts[0]["w"] * 2)
    assert torch.equal(r["steps"], pts[0]["steps"])
    with pytest.raises(ValueError, match="does not match 16 parameters"):
        unflatten(torch.zeros(3), pts[0])
    with pytest.raises(ValueError, match="one leading size"):
        unstack({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="non-empty dict"):
        unstack({})


def test_distance_and_finite_check_and_to():
    a, b = _point(0), _point(1)
    ref = torch.sqrt(((a["w"] - b["w"]) ** 2).sum() + ((a["b"] - b["b"]) ** 2).sum())
    assert distance(a, b) == pytest.approx(float(ref))
    assert distance(a, a) == 0.0
    bad = {**a, "b": torch.tensor([0.0, float("nan"), 1.0, 2.0], dtype=torch.float64)}
    with pytest.raises(ValueError, match="key 'b' holds 1 non-finite"):
        check_finite(bad)
    f32 = to(a, dtype=torch.float32)
    assert f32["w"].dtype == torch.float32 and f32["steps"].dtype == torch.int64


# --- permutations ---------------------------------------------------------------------------

def _spec():
    shapes = {"l1.w": (4, 3), "l1.b": (4,), "bn.mean": (4,), "l2.w": (2, 4), "steps": ()}
    axes = {"l1.w": ("P", None), "l1.b": ("P",), "bn.mean": ("P",), "l2.w": (None, "P"), "steps": ()}
    return PermutationSpec(axes, shapes)


def test_spec_validation_errors():
    with pytest.raises(ValueError, match="group 'P' acts on axes of different sizes"):
        PermutationSpec({"a": ("P",), "b": ("P",)}, {"a": (3,), "b": (4,)})
    with pytest.raises(ValueError, match="key 'a': 2 axis entries"):
        PermutationSpec({"a": ("P", None)}, {"a": (3,)})
    with pytest.raises(ValueError, match="spec keys and shapes differ"):
        PermutationSpec({"a": ("P",)}, {"b": (3,)})
    with pytest.raises(ValueError, match="block size 2 does not divide its size 3"):
        PermutationSpec({"a": ("P",)}, {"a": (3,)}, {"P": 2})
    with pytest.raises(ValueError, match="spec does not cover the parameters"):
        PermutationSpec.from_params({"a": ("P",)}, {"a": torch.zeros(3), "b": torch.zeros(3)})
    spec = _spec()
    assert spec.sizes == {"P": 4}
    assert spec.groups["P"] == [("l1.w", 0), ("l1.b", 0), ("bn.mean", 0), ("l2.w", 1)]
    with pytest.raises(ValueError, match="key 'l1.w': shape"):
        spec.check_params({"l1.w": torch.zeros(5, 3), "l1.b": torch.zeros(4), "bn.mean": torch.zeros(4),
                           "l2.w": torch.zeros(2, 4), "steps": torch.tensor(0)})


def test_non_bijective_or_wrong_length_index_rejected():
    spec = _spec()
    with pytest.raises(ValueError, match="not a bijection"):
        Permutation({"P": torch.tensor([0, 0, 1, 2])}, spec)
    with pytest.raises(ValueError, match="length 3, the group has size 4"):
        Permutation({"P": torch.tensor([0, 1, 2])}, spec)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        Permutation({"P": torch.tensor([0, 1, 2, 4])}, spec)
    with pytest.raises(TypeError, match="integer tensor"):
        Permutation({"P": torch.tensor([0.0, 1.0, 2.0, 3.0])}, spec)
    with pytest.raises(ValueError, match="missing"):
        Permutation({}, spec)


def test_apply_semantics_and_no_mutation():
    spec = _spec()
    theta = {"l1.w": torch.arange(12.0).view(4, 3), "l1.b": torch.arange(4.0), "bn.mean": torch.arange(4.0) * 10,
             "l2.w": torch.arange(8.0).view(2, 4), "steps": torch.tensor(3)}
    before = {k: v.clone() for k, v in theta.items()}
    P = Permutation({"P": torch.tensor([2, 0, 3, 1])}, spec)
    out = P.apply(spec, theta)
    assert out["l1.b"].tolist() == [2.0, 0.0, 3.0, 1.0]  # new unit i is old unit p[i]
    assert out["bn.mean"].tolist() == [20.0, 0.0, 30.0, 10.0]
    assert out["l2.w"][0].tolist() == [2.0, 0.0, 3.0, 1.0]
    assert int(out["steps"]) == 3
    for k in theta:
        assert torch.equal(theta[k], before[k])
        assert out[k] is not theta[k]


def test_group_operations_and_persistence(tmp_path):
    spec = _spec()
    P, Q = Permutation.random(spec, 1), Permutation.random(spec, 2)
    theta = {k: torch.randn(s) if k != "steps" else torch.tensor(1) for k, s in spec.shapes.items()}
    lhs = (P @ Q).apply(spec, theta)
    rhs = P.apply(spec, Q.apply(spec, theta))
    assert all(torch.equal(lhs[k], rhs[k]) for k in theta)
    assert (P @ P.inverse()).is_identity() and (P.inverse() @ P) == Permutation.identity(spec)
    P.save(tmp_path / "p.pt")
    assert Permutation.load(tmp_path / "p.pt", spec) == P
    assert Permutation.from_json(P.to_json(), spec) == P
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt"):
        Permutation.load(tmp_path / "junk.pt")


def test_block_constrained_groups():
    spec = PermutationSpec({"w": ("P", None)}, {"w": (6, 2)}, {"P": 3})
    p = Permutation.random(spec, 0)
    blocks = p["P"].view(2, 3) // 3
    assert bool((blocks == blocks[:, :1]).all())
    with pytest.raises(ValueError, match="does not map blocks"):
        Permutation({"P": torch.tensor([0, 1, 3, 2, 4, 5])}, spec)


def test_spec_canonical_form_ignores_group_names():
    a = PermutationSpec({"x": ("A", None), "y": (None, "A")}, {"x": (2, 3), "y": (4, 2)})
    b = PermutationSpec({"x": ("Z", None), "y": (None, "Z")}, {"x": (2, 3), "y": (4, 2)})
    c = PermutationSpec({"x": ("A", None), "y": (None, None)}, {"x": (2, 3), "y": (4, 2)})
    assert a.same_symmetry(b) and not a.same_symmetry(c)


# --- a Permutation made without a spec is checked against the spec at apply time ---------------

def _theta(spec):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) if k != "steps" else torch.tensor(1) for k, s in spec.shapes.items()}


def test_apply_refuses_a_specless_permutation_of_the_wrong_length(tmp_path):
    spec = _spec()  # group P of size 4
    short = Permutation({"P": torch.tensor([2, 0, 1])})  # a bijection of range(3), no spec to check it
    with pytest.raises(ValueError, match="group 'P': permutation has length 3, the group has size 4"):
        short.apply(spec, _theta(spec))
    with pytest.raises(ValueError, match="length 3, the group has size 4"):
        short(spec, _theta(spec))
    long = Permutation({"P": torch.tensor([4, 0, 1, 2, 3])})
    with pytest.raises(ValueError, match="length 5, the group has size 4"):
        long.apply(spec, _theta(spec))
    # the same through persistence without a spec
    short.save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="length 3, the group has size 4"):
        Permutation.load(tmp_path / "p.pt").apply(spec, _theta(spec))
    with pytest.raises(ValueError, match="length 3, the group has size 4"):
        Permutation.from_json(short.to_json()).apply(spec, _theta(spec))
    with pytest.raises(ValueError, match="lacks groups"):
        Permutation({"Q": torch.tensor([1, 0, 2, 3])}).apply(spec, _theta(spec))
    # a fitting specless permutation applies exactly as the one made with the spec
    ok = Permutation({"P": torch.tensor([2, 0, 3, 1])})
    ref = Permutation({"P": torch.tensor([2, 0, 3, 1])}, spec)
    theta = _theta(spec)
    out, want = ok.apply(spec, theta), ref.apply(spec, theta)
    assert all(torch.equal(out[k], want[k]) for k in theta)


def test_apply_refuses_a_specless_permutation_breaking_groupnorm_blocks(tmp_path):
    spec = PermutationSpec({"w": ("P", None)}, {"w": (6, 2)}, {"P": 3})
    breaks = Permutation({"P": torch.tensor([0, 1, 3, 2, 4, 5])})  # swaps units across the two blocks
    w = {"w": torch.arange(12.0).view(6, 2)}
    with pytest.raises(ValueError, match="does not map blocks of 3 channels onto blocks"):
        breaks.apply(spec, w)
    breaks.save(tmp_path / "b.pt")
    with pytest.raises(ValueError, match="does not map blocks"):
        Permutation.load(tmp_path / "b.pt").apply(spec, w)
    with pytest.raises(ValueError, match="does not map blocks"):
        Permutation.from_json(breaks.to_json()).apply(spec, w)
    with pytest.raises(ValueError, match="does not map blocks"):
        breaks.check_fits(spec)
    blockwise = Permutation({"P": torch.tensor([5, 3, 4, 1, 0, 2])})  # block 1 -> 0, block 0 -> 1
    assert blockwise.apply(spec, w)["w"][:, 0].tolist() == [10.0, 6.0, 8.0, 2.0, 0.0, 4.0]


def test_from_json_refuses_non_integer_entries():
    spec = _spec()
    with pytest.raises(ValueError, match=r"group 'P': permutation entries must be integers, got 0.5"):
        Permutation.from_json('{"P": [0.5, 1, 2, 3]}')
    with pytest.raises(ValueError, match="must be integers, got 1.0"):
        Permutation.from_json('{"P": [0, 1.0, 2, 3]}', spec)
    with pytest.raises(ValueError, match="must be integers, got True"):
        Permutation.from_json('{"P": [0, true, 2, 3]}')
    with pytest.raises(ValueError, match="must be integers, got '1'"):
        Permutation.from_json('{"P": [0, "1", 2, 3]}')
    with pytest.raises(ValueError, match="must be a list of integers"):
        Permutation.from_json('{"P": 3}')
    with pytest.raises(ValueError, match="is an object"):
        Permutation.from_json("[0, 1, 2]")
    assert Permutation.from_json('{"P": [3, 2, 1, 0]}', spec)["P"].tolist() == [3, 2, 1, 0]


def test_random_generator_argument():
    spec = _spec()
    assert Permutation.random(spec, 5) == Permutation.random(spec, torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    a = Permutation.random(spec)  # None: torch's global generator, as before
    torch.manual_seed(123)
    assert Permutation.random(spec) == a
    with pytest.raises(TypeError, match="generator must be"):
        Permutation.random(spec, True)
    with pytest.raises(ValueError, match="generator must be"):
        Permutation.random(spec, 1.5)


def test_spec_block_sizes_and_batch_dims_are_integers():
    with pytest.raises(ValueError, match="block size of group 'P' must be an integer >= 1, got 0"):
        PermutationSpec({"a": ("P",)}, {"a": (4,)}, {"P": 0})
    with pytest.raises(TypeError, match="block size of group 'P' must be an integer"):
        PermutationSpec({"a": ("P",)}, {"a": (4,)}, {"P": 2.0})
    spec = _spec()
    with pytest.raises(ValueError, match="batch_dims must be an integer >= 0"):
        Permutation.identity(spec).apply(spec, _theta(spec), batch_dims=-1)
    with pytest.raises(TypeError, match="batch_dims must be an integer"):
        check_compatible(_point(0), _point(1), batch_dims=True)
