"""Properties of reference/activations.py on every zoo model: activation matching, channel statistics, REPAIR.

Every property runs once per zoo model and normalisation (MLP without a norm and with
``norm="layer"``; VGG, ResNet and CNN1D with ``norm`` None / batch / layer / group), at the sizes
of ``archs(wide=True)``, with the hand-written spec or the traced one.

- Activation matching (Ainsworth et al. 2023, §3.1): for θ_b = P(θ_a), unit i of θ_b *is* unit
  P[i] of θ_a on every input, so corr(a_i, b_j) = 1 exactly when j = P⁻¹[i] and the per-group
  assignment returns P⁻¹ — provided no two units of θ_a are themselves perfectly correlated.
  Such ties are real, not rounding: a LayerNorm over 2 channels (or a GroupNorm block of 2 at a
  single position) outputs (z, −z), and with gains of opposite signs the two units correlate
  at +1. Collapsed representations do the same in effect: in deep bias-free nets with
  LayerNorm the units of a late layer correlate to 0.999 with each other, and the ``eps`` of the
  correlation's denominator (1e-8 against variances of ~1e-6) puts a unit's correlation with its
  own copy *below* its correlation with another unit. Where θ_a has such a tie (a unit at least as
  correlated with another unit as with itself, on θ_a's own correlation matrix) the property
  asserts only that the result is as good as P⁻¹ (the same objective, up to rounding). Measured
  (``thorough`` profile, 1,000 examples each): ties in about 2.7% of MLP-LayerNorm draws, 4.4% of VGG
  GroupNorm, 8.1% ResNet LayerNorm, 5.1% ResNet GroupNorm, 0.3% CNN1D LayerNorm.
- Channel statistics are permutation-equivariant: the statistics of P(θ) are those of θ
  reindexed, ``stats(P(θ))[m] = stats(θ)[m][P_g]`` for the producer m of group g.
- REPAIR (Jordan et al. 2023, §4) is permutation-equivariant:
  ``repair(P(θ₁), …, P(θ_N); k) = P(repair(θ₁, …, θ_N; k))`` (BatchNorm nets: the reset).

Comparisons: permutations and aligned parameters exactly; statistics and repaired parameters in
float64 at 1e-8 relative (the permuted networks sum the same terms in another order).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.support import assert_params_equal, assert_same_function, forward
from reference.activations import cross_correlations, group_producers
from reference.matching import activation_matching
from reference.merge import channel_statistics, repair
from reference.permutation import Permutation

#: every zoo model and normalisation (``reference.models``: MLP norms None / "layer", the others NORMS)
ZOO = [("mlp", None), ("mlp", "layer")] + [
    (fam, norm) for fam in ("vgg", "resnet", "cnn1d") for norm in (None, "batch", "layer", "group")
]
_IDS = [f"{fam}-{norm or 'none'}" for fam, norm in ZOO]
_WIDE = {"mlp": S.mlp_archs(max_depth=4, widths=(6, 10), inputs=(16, 20))}
_FAMILY = {
    "vgg": S.vgg_archs(widths=(6, 10), inputs=(3, 4)),
    "resnet": S.resnet_archs(bases=(4, 6), inputs=(3, 4)),
    "cnn1d": S.cnn1d_archs(widths=(6, 10), inputs=(3, 4), kernels=(3, 5)),
}


def zoo_archs(family: str, norm: str | None) -> st.SearchStrategy[S.Arch]:
    """``archs(wide=True)`` of one family with one normalisation (MLPs: ``norm`` None or "layer")."""
    if family == "mlp":
        if norm is None:
            return _WIDE["mlp"]
        return _WIDE["mlp"].map(lambda a: S.Arch({**a.config, "norm": norm}, a.input_shape))
    return _FAMILY[family].filter(lambda a: a.config["norm"] == norm)


def _x(arch: S.Arch, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *arch.input_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _case(draw: st.DrawFn, family: str, norm: str | None, kind: str = "normal") -> S.ModelCase:
    arch = draw(zoo_archs(family, norm))
    spec_kind = draw(st.sampled_from(["hand", "traced"]))
    case = S.build_case(arch, kind, draw(S.seeds), spec_kind=spec_kind)
    return case._replace(x=_x(arch, 32, draw(S.seeds)))


@st.composite
def _matching_case(draw: st.DrawFn, family: str, norm: str | None):
    case = _case(draw, family, norm)
    assert case.model.config.get("norm") == norm
    return case, Permutation.random(case.spec, draw(S.perm_seeds))


def _tied_units(case: S.ModelCase) -> list[str]:
    """Groups of θ_a holding two units whose activations correlate as well as a unit with itself."""
    producers = group_producers(case.model, case.spec)
    flat = [p for ps in producers.values() for p in ps]
    m = cross_correlations(case.model, case.params, case.params, case.x, flat)
    tied = []
    for g, ps in producers.items():
        C = sum(m[p.name].corr() for p in ps)
        off = C - torch.diag(torch.full((C.shape[0],), float("inf"), dtype=C.dtype))
        if bool((off.max(1).values >= C.diagonal() - 1e-9 * len(ps)).any()):
            tied.append(g)
    return tied


@pytest.mark.parametrize("family,norm", ZOO, ids=_IDS)
@given(data=st.data())
def test_activation_matching_recovers_inverse_on_every_zoo_model(family: str, norm: str | None, data) -> None:
    """Ainsworth et al. 2023, §3.1 (activation matching, Eq. (2)): for θ_b = P(θ_a),
    activation_matching(θ_a, θ_b) = P⁻¹ and P⁻¹(θ_b) = θ_a exactly, so f(R(θ_b), x) = f(θ_a, x);
    where θ_a has perfectly correlated units (a tie, module docstring) R is as good as P⁻¹."""
    case, P = data.draw(_matching_case(family, norm))
    pb = P.apply(case.spec, case.params)
    r = activation_matching(case.model, case.spec, case.params, pb, case.x, batch_size=13)
    aligned = r.perm.apply(case.spec, pb)
    tied = _tied_units(case)
    event("θ_a has perfectly correlated units" if tied else "no ties: R = P⁻¹ asserted")
    if not tied:
        assert r.perm == P.inverse(), f"units left misaligned per group: {(r.perm @ P).num_moved()}"
        assert_params_equal(aligned, case.params, "R(θ_b) vs θ_a")
        for train in (False, True):
            ref = forward(case.model, case.params, case.x, train)
            assert_same_function(forward(case.model, aligned, case.x, train), ref, f"f(R(θ_b)) train={train}")
    else:
        # J(P⁻¹) on (θ_a, P(θ_a)) is J(id) on (θ_a, θ_a); moments are raw sums (Σz² − (Σz)²/n), whose
        # rounding differs between the two networks' summation orders: 1e-7 relative
        same = activation_matching(case.model, case.spec, case.params, case.params, case.x, batch_size=13)
        j_inv = same.history[0]
        assert r.objective >= j_inv - 1e-7 * max(1.0, abs(j_inv)), (tied, r.objective, j_inv)
    # the identity's objective is at most the optimum, the optimum at most one per unit and producer
    assert r.history[0] <= r.objective + 1e-9 * max(1.0, abs(r.objective))
    bound = sum(len(ps) * case.spec.sizes[g] for g, ps in group_producers(case.model, case.spec).items())
    assert r.objective <= bound + 1e-9 * bound


@st.composite
def _repair_case(draw: st.DrawFn, family: str, norm: str | None):
    kind = draw(st.sampled_from(["default", "normal"]))
    case = _case(draw, family, norm, kind)
    other = S.weights(case.model, S.Arch(case.model.config, tuple(case.x.shape[1:])), kind, draw(S.seeds))
    other = {k: v.double() if v.is_floating_point() else v for k, v in other.items()}
    lam = draw(S.barycentric(2))
    return case, other, Permutation.random(case.spec, draw(S.perm_seeds)), [lam[0], 1.0 - lam[0]]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8 * scale + 1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family,norm", ZOO, ids=_IDS)
@given(data=st.data())
def test_channel_statistics_and_repair_are_permutation_equivariant(family: str, norm: str | None, data) -> None:
    """Channel statistics: stats(P(θ))[m] = stats(θ)[m] reindexed by P_g. REPAIR (Jordan et al.
    2023, §4): repair(P(θ₁), P(θ₂); k) = P(repair(θ₁, θ₂; k)) at a convex k, float64 (1e-8), and the
    two compute the same function in eval mode."""
    case, other, P, coeffs = data.draw(_repair_case(family, norm))
    spec, model, x = case.spec, case.model, case.x
    producers = group_producers(model, spec)
    stats = channel_statistics(model, case.params, x, spec=spec, batch_size=11)
    stats_p = channel_statistics(model, P.apply(spec, case.params), x, spec=spec, batch_size=11)
    assert list(stats_p) == list(stats)
    for g, ps in producers.items():
        for p in ps:
            for i, what in enumerate(("mean", "std")):
                _close(stats_p[p.name][i], stats[p.name][i][P[g]], f"{p.name} {what}")
    ends = [case.params, other]
    rep = repair(model, ends, coeffs, x, spec=spec, batch_size=11)
    rep_p = repair(model, [P.apply(spec, e) for e in ends], coeffs, x, spec=spec, batch_size=11)
    want = P.apply(spec, rep)
    assert set(rep_p) == set(want)
    for k, v in want.items():
        if v.is_floating_point():
            _close(rep_p[k], v, k)
        else:
            assert torch.equal(rep_p[k], v), k
    ref = forward(model, rep, x, False)
    assert_same_function(forward(model, rep_p, x, False), ref, "f(repair(P(θ))) vs f(repair(θ))")
