"""Properties of the Sinkhorn relaxation and of Git Re-Basin's straight-through estimator.

``sinkhorn(L, iters)`` (Sinkhorn 1964, in the log domain as Mena et al. 2018, Eq. (2)) alternately
normalises rows and columns of exp(L). Theorems checked here: after every iteration the columns
sum to 1 (the column step comes last); the iteration commutes with permuting rows and columns; the
limit is doubly stochastic. The convergence rate is the Birkhoff contraction ratio
tanh(Δ/4)² per iteration (Franklin & Lorenz 1989), Δ the projective diameter of exp(L): for
entries of L with spread ≲ 4σ it is fast at σ ≤ 2 (3,000 draws of n ≤ 10, σ ≤ 2: every one within
1e-10 after ≤ 2,000 iterations), while one 2×2 draw with σ = 2.6 was still 2e-4 off after 2,000,
so the doubly-stochastic property draws σ ≤ 2.

``sinkhorn_matching`` and ``ste_matching`` return a ``Permutation``: it must be valid for the spec
(every group, the right size, a bijection, blocks of GroupNorm groups mapped onto blocks) on
every architecture of the zoo. Planted recovery by ``sinkhorn_matching`` (θ vs P(θ) → P⁻¹) is
measured, not a theorem: 0 misses in 400 one-group draws (``_one_group_archs`` of
props_matching.py) and in 300 draws of ``archs(["vgg", "resnet", "cnn1d"], wide=True)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.props_matching import _one_group_archs, _permuted_copy
from reference.matching import (
    midpoint_loss,
    sinkhorn,
    sinkhorn_matching,
    ste_matching,
    weight_matching_objective,
)
from reference.permutation import Permutation, PermutationSpec


def _assert_valid(perm: Permutation, spec: PermutationSpec) -> None:
    """A bijection per group of the spec, of the group's size, mapping blocks onto blocks."""
    assert set(perm.keys()) == set(spec.sizes), f"groups {sorted(perm.keys())} vs {sorted(spec.sizes)}"
    for g, n in spec.sizes.items():
        idx = perm[g]
        assert idx.dtype == torch.long and idx.shape == (n,), f"group {g!r}: {idx.dtype} {tuple(idx.shape)}"
        assert torch.equal(torch.sort(idx).values, torch.arange(n)), f"group {g!r}: not a bijection {idx}"
        b = spec.block(g)
        if b > 1:
            blocks = idx.view(-1, b) // b
            assert bool((blocks == blocks[:, :1]).all()), f"group {g!r}: blocks of {b} not kept together: {idx}"


@st.composite
def _log_alphas(draw: st.DrawFn, max_sigma: float) -> torch.Tensor:
    """σ · N(0, 1) matrices, n ∈ [1, 10], optionally a batch of 1–3 (float64)."""
    n = draw(st.integers(1, 10))
    batch = draw(st.sampled_from([(), (1,), (2,), (3,)]))
    sigma = draw(st.floats(0.0, max_sigma))
    g = torch.Generator().manual_seed(draw(S.seeds))
    return sigma * torch.randn(*batch, n, n, generator=g, dtype=torch.float64)


@given(L=_log_alphas(max_sigma=2.0))
def test_sinkhorn_is_doubly_stochastic(L: torch.Tensor) -> None:
    """Sinkhorn 1964: exp(L) scales to a unique doubly-stochastic diag(u) exp(L) diag(v); the
    log-domain iteration reaches it (rows and columns sum to 1 within 1e-6; σ ≤ 2, see docstring)."""
    M = sinkhorn(L, 2000, tol=1e-10)
    assert M.shape == L.shape and bool((M >= 0).all())
    row = float((M.sum(-1) - 1).abs().max())
    col = float((M.sum(-2) - 1).abs().max())
    assert row < 1e-6 and col < 1e-6, f"row sums off by {row}, column sums by {col}"


@given(
    L=st.integers(1, 6).flatmap(
        lambda n: st.lists(
            st.lists(st.floats(-50, 50, allow_nan=False), min_size=n, max_size=n), min_size=n, max_size=n
        )
    ),
    iters=st.integers(1, 20),
)
def test_sinkhorn_columns_sum_to_one_after_every_iteration(L: list[list[float]], iters: int) -> None:
    """The column normalisation X ← X − logsumexp_i X (last step of each iteration) makes every
    column of exp(X) sum to 1 for any finite L and any number of iterations (exact up to rounding)."""
    M = sinkhorn(torch.tensor(L, dtype=torch.float64), iters)
    assert bool(torch.isfinite(M).all())
    err = float((M.sum(0) - 1).abs().max())
    assert err < 1e-12 * M.shape[0] + 1e-13, f"column sums off by {err}"


@given(L=_log_alphas(max_sigma=5.0), p_seed=S.perm_seeds, iters=st.integers(1, 30))
def test_sinkhorn_is_permutation_equivariant(L: torch.Tensor, p_seed: int, iters: int) -> None:
    """Row and column normalisations commute with reindexing rows and columns:
    sinkhorn(L[p][:, q]) = sinkhorn(L)[p][:, q] after any number of iterations (to rounding)."""
    n = L.shape[-1]
    g = torch.Generator().manual_seed(p_seed)
    p, q = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
    lhs = sinkhorn(L[..., p, :][..., :, q], iters)
    rhs = sinkhorn(L, iters)[..., p, :][..., :, q]
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


@given(
    case=st.builds(S.build_case, S.archs(), st.sampled_from(["normal", "default", "sgd"]), S.seeds),
    other_seed=S.seeds,
    seed=st.integers(0, 100),
)
def test_sinkhorn_matching_returns_valid_permutation(case: S.ModelCase, other_seed: int, seed: int) -> None:
    """sinkhorn_matching's rounding (solve_lap of each soft matrix, block-constrained for
    GroupNorm groups) yields a valid Permutation of the spec; its objective is the weight-matching
    objective J(P) of Ainsworth et al. 2023, Eq. (3); every soft matrix is column-stochastic."""
    other = S.weights(case.model, S.Arch(case.model.config, tuple(case.x.shape[1:])), "default", other_seed)
    b = {k: v.to(case.params[k].dtype) if v.is_floating_point() else v for k, v in other.items()}
    r = sinkhorn_matching(case.spec, case.params, b, seed=seed, iters=50)
    _assert_valid(r.perm, case.spec)
    assert r.objective == pytest.approx(weight_matching_objective(case.spec, case.params, b, r.perm), rel=1e-12)
    assert all(math.isfinite(h) for h in r.history) and len(r.history) == 1 + len(r.taus)
    for g, M in r.soft.items():
        assert float((M.sum(0) - 1).abs().max()) < 1e-9, f"group {g!r}: columns do not sum to 1"


@given(args=_permuted_copy(S.archs()), log2c=st.integers(-3, 3), which=st.sampled_from(["a", "b"]))
def test_sinkhorn_matching_is_scale_invariant(args, log2c: int, which: str) -> None:
    """The temperature is relative to the spread σ_g of each S_g, so rescaling θ_a or θ_b by c > 0
    leaves every update exp(S_g / (τσ_g)) unchanged: the same permutation, objective and history ×c.
    Exact (bitwise) for c a power of two, whose products and square roots float64 rounds exactly."""
    case, P = args
    a, b = case.params, P.apply(case.spec, case.params)
    c = 2.0**log2c
    r = sinkhorn_matching(case.spec, a, b, iters=30)
    if which == "a":
        rc = sinkhorn_matching(case.spec, {k: v * c if v.is_floating_point() else v for k, v in a.items()}, b, iters=30)
    else:
        rc = sinkhorn_matching(case.spec, a, {k: v * c if v.is_floating_point() else v for k, v in b.items()}, iters=30)
    assert rc.perm == r.perm
    assert rc.objective == r.objective * c
    assert rc.history == tuple(h * c for h in r.history)


@given(args=_permuted_copy(_one_group_archs()), seed=st.integers(0, 100))
def test_sinkhorn_matching_recovers_inverse_one_group(args, seed: int) -> None:
    """Planted alignment (measured, see the module docstring): for one permutation group in general
    position, sinkhorn_matching(θ, P(θ)) = P⁻¹, the unique maximiser of Eq. (3) of Ainsworth et al."""
    case, P = args
    r = sinkhorn_matching(case.spec, case.params, P.apply(case.spec, case.params), seed=seed)
    assert r.perm == P.inverse(), f"misaligned units per group: {(r.perm @ P).num_moved()}"


@given(
    case=st.builds(S.build_case, S.archs(), st.sampled_from(["default", "sgd"]), S.seeds),
    other_seed=S.seeds,
    data_seed=S.seeds,
    batch_size=st.integers(2, 4),  # 6 examples: minibatches of ≥ 2 (BatchNorm trains on batches)
    steps=st.integers(1, 3),
    train_mode=st.booleans(),
)
def test_ste_returns_valid_permutation(
    case: S.ModelCase, other_seed: int, data_seed: int, batch_size: int, steps: int, train_mode: bool
) -> None:
    """Ainsworth et al. 2023, Algorithm 2: every STE candidate is a weight-matching projection, so
    the result is a valid Permutation of the spec; it is the candidate of least midpoint loss
    (recomputed here), one minibatch loss is recorded per step, and the inputs are left untouched."""
    arch = S.Arch(case.model.config, tuple(case.x.shape[1:]))
    b = {
        k: v.to(case.params[k].dtype) if v.is_floating_point() else v
        for k, v in S.weights(case.model, arch, "default", other_seed).items()
    }
    a0 = {k: v.clone() for k, v in case.params.items()}
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(6, *arch.input_shape, generator=g, dtype=case.x.dtype)
    y = torch.randint(0, arch.config["num_classes"], (6,), generator=g)
    r = ste_matching(
        case.model, case.spec, case.params, b, x, y,
        steps=steps, lr=0.05, batch_size=batch_size, seed=data_seed, train_mode=train_mode,
    )  # fmt: skip
    _assert_valid(r.perm, case.spec)
    for P in r.candidates:
        _assert_valid(P, case.spec)
    assert len(r.step_losses) == steps and all(math.isfinite(v) for v in r.step_losses)
    assert r.eval_steps[0] == 0 and r.eval_steps[-1] == steps and len(r.history) == len(r.eval_steps)
    assert r.objective == min(r.history)
    case.model.train(train_mode)
    again = midpoint_loss(case.model, case.params, r.perm.apply(case.spec, b), {}, x, y, 4096)
    assert again == pytest.approx(r.objective, rel=1e-9, abs=1e-12)
    for k in a0:
        assert torch.equal(case.params[k], a0[k]), f"params_a[{k!r}] modified"
