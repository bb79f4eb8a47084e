"""Meta-tests of the strategies: they do generate what the properties need to be able to fail.

A property over networks without BatchNorm cannot catch unpermuted running statistics; one without
ResNets cannot catch a split residual stream. ``hypothesis.find`` (first hit, no shrinking, fixed
seed) shows each feature is generated; ``@given`` tests check invariants of every draw.
"""

from __future__ import annotations

import math
from random import Random

import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from invariants import strategies as S
from reference.params import is_float
from reference.permutation import Permutation


def _find(strategy, condition, max_examples: int = 500):
    cfg = settings(max_examples=max_examples, database=None, phases=[Phase.generate], deadline=None)
    return find(strategy, condition, settings=cfg, random=Random(0))


def _is_residual(case: S.ModelCase) -> bool:
    """Some group acts on the output axis of two or more weight matrices / kernels (an addition)."""
    weights = {k for k, v in case.params.items() if k.endswith("weight") and v.ndim >= 2}
    return any(sum(1 for k, ax in members if ax == 0 and k in weights) >= 2 for members in case.spec.groups.values())


def _restricted_blocks(case: S.ModelCase) -> bool:
    """A GroupNorm constraint that bites: 1 < block < group size."""
    return any(1 < b < case.spec.sizes[g] for g, b in case.spec.blocks.items())


def test_generates_batchnorm() -> None:
    case = _find(S.model_cases(), lambda c: any(k.endswith("running_var") for k in c.params))
    assert any(k.endswith("num_batches_tracked") for k in case.params)


def test_generates_residual_nets() -> None:
    case = _find(S.model_cases(), _is_residual)
    assert case.model.config["name"] == "resnet"


def test_resnet_cases_are_residual() -> None:
    assert _is_residual(_find(S.model_cases(families=["resnet"]), lambda c: True))


def test_generates_uneven_widths() -> None:
    _find(S.archs(["mlp"]), lambda a: len(set(a.config["widths"])) > 1)
    _find(S.archs(["vgg"]), lambda a: len({c for c in a.config["channels"] if c != "M"}) > 1)


def test_generates_groupnorm_blocks() -> None:
    case = _find(S.model_cases(), _restricted_blocks)
    assert case.model.config["norm"] == "group"


def test_generates_bias_free_layers() -> None:
    case = _find(S.model_cases(families=["mlp"]), lambda c: not c.model.config["bias"])
    assert not any(k.endswith("bias") for k in case.params)
    _find(S.archs(["vgg"]), lambda a: not a.config["bias"])
    _find(S.archs(["cnn1d"]), lambda a: not a.config["bias"])


@pytest.mark.parametrize("depth", [1, 5])
def test_generates_mlp_depths(depth: int) -> None:
    _find(S.archs(["mlp"]), lambda a: len(a.config["widths"]) == depth)


@pytest.mark.parametrize("family", ["vgg", "resnet", "cnn1d"])
@pytest.mark.parametrize("norm", S.NORMS)
def test_generates_every_norm(family: str, norm: str | None) -> None:
    _find(S.archs([family]), lambda a: a.config["norm"] == norm)


@pytest.mark.parametrize("family", ["vgg", "resnet"])
@pytest.mark.parametrize("dims", [1, 2])
def test_generates_both_dims(family: str, dims: int) -> None:
    _find(S.archs([family]), lambda a: a.config["dims"] == dims)


def test_generates_pools_and_mnist1d_layout() -> None:
    _find(S.archs(["vgg"]), lambda a: "M" in a.config["channels"])
    _find(S.archs(["cnn1d"]), lambda a: len(a.input_shape) == 1)


@given(case=S.model_cases())
def test_batchnorm_buffers_are_off_their_initial_values(case: S.ModelCase) -> None:
    """running_mean ≠ 0, running_var > 0 and ≠ 1 (so eval mode sees them), counters ≥ 1."""
    for k, v in case.params.items():
        if k.endswith("running_mean"):
            assert bool((v != 0).all()), k
        elif k.endswith("running_var"):
            assert bool((v > 0).all()) and bool((v != 1).all()), k
        elif k.endswith("num_batches_tracked"):
            assert int(v) >= 1
    assert all(bool(torch.isfinite(v).all()) for v in case.params.values() if is_float(v))


@given(arch=S.archs(), seed=S.seeds)
def test_weight_scales(arch: S.Arch, seed: int) -> None:
    """small = 0.1 × default and large = 10 × default on the trainable parameters; heavy moves away
    from the default; every kind is finite; the same seed gives the same point (determinism)."""
    model = arch.build()
    trainable = [n for n, _ in model.named_parameters()]
    d = S.weights(model, arch, "default", seed)
    assert all(torch.equal(d[k], S.weights(model, arch, "default", seed)[k]) for k in d)
    small, large = S.weights(model, arch, "small", seed), S.weights(model, arch, "large", seed)
    for k in trainable:
        torch.testing.assert_close(small[k], 0.1 * d[k])
        torch.testing.assert_close(large[k], 10.0 * d[k])
    heavy = S.weights(model, arch, "heavy", seed)
    assert any(not torch.equal(heavy[k], d[k]) for k in trainable)
    for kind in ("sgd", "heavy"):  # (sgd can stand still: a net whose ReLUs are all dead has no gradient)
        p = S.weights(model, arch, kind, seed)
        assert all(bool(torch.isfinite(p[k]).all()) for k in trainable), kind


def test_sgd_weights_move() -> None:
    """ "trained-like" points do move away from their initialisation (a few SGD steps)."""

    def moved(arch: S.Arch) -> bool:
        model = arch.build()
        d, p = S.weights(model, arch, "default", 0), S.weights(model, arch, "sgd", 0)
        return all(not torch.equal(p[n], d[n]) for n, _ in model.named_parameters())

    for family in S.ARCH_FAMILIES:
        _find(S.archs([family]), moved)


def test_generates_every_weight_kind() -> None:
    for kind in S.WEIGHT_KINDS:
        _find(S.model_cases(), lambda c, kind=kind: c.weights.startswith(kind + "("))


def test_generates_both_dtypes() -> None:
    strat = S.model_cases(dtype=st.sampled_from([torch.float32, torch.float64]))
    for dt in (torch.float32, torch.float64):
        _find(strat, lambda c, dt=dt: c.x.dtype == dt and all(v.dtype == dt for v in c.params.values() if is_float(v)))


@given(case=S.model_cases(), seed=S.perm_seeds)
def test_random_permutations_fit_the_spec(case: S.ModelCase, seed: int) -> None:
    """Permutation.random(spec, seed) is a valid element (sizes, GroupNorm blocks) and seeded."""
    P = Permutation.random(case.spec, seed)
    Permutation(P.to_dict(), case.spec)
    assert P == Permutation.random(case.spec, seed)


def test_generates_non_identity_permutations() -> None:
    @st.composite
    def spec_and_perm(draw):
        case = draw(S.model_cases())
        return case, draw(S.permutations(case.spec))

    case, P = _find(spec_and_perm(), lambda cp: all(n > 0 for n in cp[1].num_moved().values()))
    assert not P.is_identity()


@given(n=st.integers(1, 6), data=st.data())
def test_coefficient_families(n: int, data: st.DataObject) -> None:
    """convex: kᵢ ≥ 0, Σ = 1; affine: Σ = 1; arbitrary: finite; barycentric points lie in the simplex."""
    for fam in S.COEFF_FAMILIES:
        c = data.draw(S.coefficients(n, fam))
        assert c.family == fam and len(c.values) == n and all(math.isfinite(v) for v in c.values)
        if fam in ("convex", "affine"):
            assert math.fsum(c.values) == pytest.approx(1.0, abs=1e-9)
        if fam == "convex":
            assert all(v >= 0 for v in c.values)
    lam = data.draw(S.barycentric(n))
    assert all(v >= 0 for v in lam) and math.fsum(lam) == pytest.approx(1.0, abs=1e-12)


def test_generates_non_convex_coefficients() -> None:
    _find(S.coefficients(3, "affine"), lambda c: min(c.values) < 0)
    _find(S.coefficients(3, "arbitrary"), lambda c: abs(math.fsum(c.values) - 1) > 0.5)
    _find(S.barycentric(3), lambda lam: max(lam) > 0.9)  # near a corner
    _find(S.barycentric(3), lambda lam: min(lam) > 0.2)  # inside


@given(curve=S.value_curves())
def test_value_curves_are_valid_grids(curve: S.ValueCurve) -> None:
    t = curve.t
    assert float(t[0]) == 0.0 and float(t[-1]) == 1.0 and bool((t[1:] > t[:-1]).all())
    assert curve.values.shape == t.shape


def test_generates_non_uniform_grids() -> None:
    _find(
        S.value_curves(),
        lambda c: len(c.t) > 3 and not torch.allclose(c.t, torch.linspace(0, 1, len(c.t), dtype=c.t.dtype)),
    )
