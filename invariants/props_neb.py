"""Properties of the nudged elastic band of ``reference/neb.py`` (Draxler et al. 2018, "Essentially No
Barriers in Neural Network Energy Landscape", arXiv:1803.00885, §2–3; Henkelman & Jónsson 2000,
"Improved tangent estimate in the nudged elastic band method", J. Chem. Phys. 113, 9978).

A chain is M pivots p₀ = θ_start, …, p_{M−1} = θ_end (flat coordinates [M, D], float64 here). The
nudged force on an interior pivot is F_i = −(g_i − (g_i·τ̂_i)τ̂_i) + k(‖p_{i+1} − p_i‖ − ‖p_i − p_{i−1}‖)τ̂_i.
Checked on random chains (scales 1e-3 … 1e3, 2–8 pivots, 1–12 coordinates):

- the improved tangent has unit norm, and is the upwind difference on a monotone stretch;
- the loss gradient enters the force only perpendicular to the tangent: F·τ̂ is the spring term alone
  (zero with ``spring_k = inf``), and F + g is parallel to τ̂;
- with zero loss gradient, relaxing under the spring force alone equalises the pivot spacing of a
  chain on a line, endpoints fixed;
- ``redistribute`` keeps the endpoints bit for bit and spaces a straight chain equally;
- ``insert_pivots`` never removes or moves a pivot and keeps the endpoints; the new pivots lie on
  their segments; ``insertion_points`` picks at most ``max_insert`` distinct segments above threshold;
- the chain's coefficients are a partition of unity, exact at the pivots, so a path's endpoints are
  exactly the two minima (``NEBPath.points_at``, ``grid``, and ``neb`` itself on a small network).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from reference.barrier import barrier
from reference.neb import (
    NEBConfig,
    NEBPath,
    improved_tangents,
    insert_pivots,
    insertion_points,
    interp_coeffs,
    neb,
    nudged_forces,
    redistribute,
)
from reference.params import unstack
from reference.train import TrainConfig

# ---------------------------------------------------------------------------------------------
# strategies


class Chain(NamedTuple):
    chain: Tensor  # [M, D] float64
    losses: Tensor  # [M]
    grads: Tensor  # [M − 2, D]
    scale: float


@st.composite
def chains(draw: st.DrawFn, min_pivots: int = 3, max_pivots: int = 8) -> Chain:
    M = draw(st.integers(min_pivots, max_pivots))
    D = draw(st.integers(1, 12))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    chain = scale * torch.randn(M, D, generator=g, dtype=torch.float64)
    losses = torch.randn(M, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # ties: plateaus of equal loss
        losses = losses.round()
    grads = torch.randn(M - 2, D, generator=g, dtype=torch.float64) / scale
    return Chain(chain, losses, grads, scale)


@st.composite
def line_chains(draw: st.DrawFn) -> Chain:
    """Pivots on the segment from a to b, at random increasing positions (uneven spacing)."""
    M = draw(st.integers(3, 8))
    D = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    a, b = scale * torch.randn(2, D, generator=g, dtype=torch.float64)
    if float((a - b).norm()) < 1e-3 * scale:
        b = a + scale
    gaps = 0.2 + torch.rand(M - 1, generator=g, dtype=torch.float64)
    s = torch.cat([torch.zeros(1, dtype=torch.float64), gaps.cumsum(0) / gaps.sum()])
    s[-1] = 1.0
    chain = (1 - s)[:, None] * a + s[:, None] * b
    chain[-1] = b
    return Chain(chain, torch.zeros(M, dtype=torch.float64), torch.zeros(M - 2, D, dtype=torch.float64), scale)


def _close(a: Tensor, b: Tensor, scale: float, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# tangents and forces


@given(chains())
def test_tangent_is_unit_and_upwind(c: Chain) -> None:
    """‖τ̂_i‖ = 1 (pivots in general position), and τ̂_i ∝ p_{i+1} − p_i where L_{i+1} > L_i > L_{i−1},
    ∝ p_i − p_{i−1} where L_{i+1} < L_i < L_{i−1} (Henkelman & Jónsson 2000, Eq. 8–9)."""
    tau = improved_tangents(c.chain, c.losses)
    _close(tau.norm(dim=1), torch.ones(c.chain.shape[0] - 2, dtype=torch.float64), 1.0)
    L = c.losses
    for i in range(1, c.chain.shape[0] - 1):
        if L[i + 1] > L[i] > L[i - 1]:
            d = c.chain[i + 1] - c.chain[i]
        elif L[i + 1] < L[i] < L[i - 1]:
            d = c.chain[i] - c.chain[i - 1]
        else:
            continue
        _close(tau[i - 1], d / d.norm(), 1.0)


@given(chains(), st.sampled_from([math.inf, 0.5, 10.0]))
def test_loss_gradient_enters_only_perpendicular(c: Chain, k: float) -> None:
    """F_i·τ̂_i = k(‖p_{i+1} − p_i‖ − ‖p_i − p_{i−1}‖) (0 for k = ∞) and (F_i + g_i) ∥ τ̂_i: the loss
    gradient has no component along the tangent in the nudged force (Draxler et al. 2018, Eq. 4–6)."""
    tau = improved_tangents(c.chain, c.losses)
    F = nudged_forces(c.grads, c.chain, tau, k)
    d = (c.chain[1:] - c.chain[:-1]).norm(dim=1)
    spring = torch.zeros_like(d[1:]) if math.isinf(k) else k * (d[1:] - d[:-1])
    fscale = float(c.grads.abs().max()) + (0.0 if math.isinf(k) else k * c.scale)
    _close((F * tau).sum(1), spring, fscale)
    rest = F + c.grads
    _close(rest - (rest * tau).sum(1, keepdim=True) * tau, torch.zeros_like(rest), fscale)


@given(line_chains(), st.sampled_from([0.5, 2.0, 10.0]))
def test_spring_relaxation_equalises_spacing(c: Chain, k: float) -> None:
    """With g ≡ 0 the force is the spring term k(‖τ⁺‖ − ‖τ⁻‖)τ̂ alone: steps p_i ← p_i + η F_i (ηk = ¼)
    on a chain along a line converge to equal spacing ‖τ⁺‖ = ‖τ⁻‖ (the NEB springs' purpose,
    Jónsson et al. 1998), with the endpoints fixed."""
    chain = c.chain.clone()
    eta = 0.25 / k
    for _ in range(1500):
        tau = improved_tangents(chain, c.losses)
        F = nudged_forces(c.grads, chain, tau, k)
        chain[1:-1] = chain[1:-1] + eta * F
    d = (chain[1:] - chain[:-1]).norm(dim=1)
    _close(d, torch.full_like(d, float(d.mean())), c.scale, rtol=1e-6)
    assert torch.equal(chain[0], c.chain[0]) and torch.equal(chain[-1], c.chain[-1])


@given(line_chains(), st.integers(2, 9))
def test_redistribute_spaces_a_line_equally(c: Chain, n: int) -> None:
    """``redistribute`` (the k = ∞ step of AutoNEB's ``distribute_by_weights``) puts n points at equal arc
    length on the chain: on a line, equal distances; the endpoints are kept bit for bit."""
    out = redistribute(c.chain, n)
    assert out.shape == (n, c.chain.shape[1])
    assert torch.equal(out[0], c.chain[0]) and torch.equal(out[-1], c.chain[-1])
    d = (out[1:] - out[:-1]).norm(dim=1)
    _close(d, torch.full_like(d, float((c.chain[-1] - c.chain[0]).norm()) / (n - 1)), c.scale)


# ---------------------------------------------------------------------------------------------
# insertion


@given(chains(min_pivots=2), st.data())
def test_insertion_keeps_every_pivot(c: Chain, data: st.DataObject) -> None:
    """AutoNEB's refinement only adds pivots: the old chain is a subsequence of the new one, in order,
    with the same endpoints; each new pivot is (1 − α)p_s + αp_{s+1} on its segment."""
    M = c.chain.shape[0]
    segs = data.draw(st.lists(st.integers(0, M - 2), unique=True, max_size=M - 1))
    alphas = data.draw(st.lists(st.floats(0.01, 0.99), min_size=len(segs), max_size=len(segs)))
    new = insert_pivots(c.chain, list(zip(segs, alphas, strict=True)))
    assert new.shape[0] == M + len(segs)
    assert torch.equal(new[0], c.chain[0]) and torch.equal(new[-1], c.chain[-1])
    j = 0
    for i in range(M):
        assert torch.equal(new[j], c.chain[i])
        j += 1
        if i in segs:
            a = alphas[segs.index(i)]
            _close(new[j], (1 - a) * c.chain[i] + a * c.chain[i + 1], c.scale)
            j += 1
    assert j == new.shape[0]


@given(chains(min_pivots=2), st.integers(1, 6), st.integers(0, 4), st.floats(0.0, 1.0))
def test_insertion_points_pick_distinct_segments_above_threshold(c: Chain, S: int, cap: int, thr: float) -> None:
    """At most ``max_insert`` segments, one pivot each, every score (L(α) − chord) / (max L − min L) above
    the threshold, at one of the evaluated α (the authors' ``FillHighest``)."""
    M = c.chain.shape[0]
    alphas = torch.arange(1, S + 1, dtype=torch.float64) / (S + 1)
    g = torch.Generator().manual_seed(M * 31 + S)
    sub = 2 * torch.rand(M - 1, S, generator=g, dtype=torch.float64)
    picked = insertion_points(c.losses, sub, alphas, thr, cap)
    assert len(picked) <= cap
    assert len({s for s, _, _ in picked}) == len(picked)
    rng = float(c.losses.max() - c.losses.min()) + 1e-12
    for s, a, score in picked:
        j = int(torch.argmin((alphas - a).abs()))
        assert abs(float(alphas[j]) - a) < 1e-12
        want = (float(sub[s, j]) - ((1 - a) * float(c.losses[s]) + a * float(c.losses[s + 1]))) / rng
        assert math.isclose(score, want, rel_tol=1e-9, abs_tol=1e-9) and score > thr


# ---------------------------------------------------------------------------------------------
# the path: coefficients, endpoints, grid


@given(chains(min_pivots=2), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_chain_coefficients_partition_of_unity(c: Chain, t: list[float]) -> None:
    """The piecewise-linear chain's coefficients are hat functions on the knots: cᵢ(t) ≥ 0, Σᵢ cᵢ(t) = 1,
    and c(t_i) = e_i at every knot (the chain passes through its pivots)."""
    path = NEBPath({"w": c.chain}, ("w",))
    knots = path.knots("arc")
    coeffs = interp_coeffs(knots, torch.tensor(t, dtype=torch.float64))
    assert bool((coeffs >= 0).all())
    _close(coeffs.sum(1), torch.ones(len(t), dtype=torch.float64), 1.0, rtol=1e-14)
    at = path.points_at(knots)["w"]
    distinct = torch.cat([torch.tensor([True]), knots[1:] > knots[:-1]])
    _close(at[distinct], c.chain[distinct], c.scale, rtol=1e-12)


@given(chains(min_pivots=2), st.integers(0, 5), st.sampled_from(["arc", "uniform"]))
def test_path_endpoints_are_the_minima(c: Chain, sub: int, param: str) -> None:
    """φ(0) = θ_start and φ(1) = θ_end exactly (floating and integer entries), on ``points_at`` and on
    ``grid``, whose t runs strictly from 0 to 1 and is accepted by ``reference.barrier.barrier``."""
    M = c.chain.shape[0]
    pivots = {"w": c.chain, "count": torch.arange(M)}
    path = NEBPath(pivots, ("w",))
    ends = unstack(path.points_at([0.0, 1.0], param))
    assert torch.equal(ends[0]["w"], c.chain[0]) and torch.equal(ends[1]["w"], c.chain[-1])
    t, pts = path.grid(sub, param)
    assert t.shape[0] == (M - 1) * (sub + 1) + 1 == pts["w"].shape[0]
    assert torch.equal(pts["w"][0], c.chain[0]) and torch.equal(pts["w"][-1], c.chain[-1])
    assert bool((pts["count"] == 0).all())  # integer buffers from the start point
    assert bool((t[1:] > t[:-1]).all())
    b = barrier(torch.zeros_like(t), t)
    assert b.value == 0.0


@given(st.integers(0, 2**31 - 1), st.sampled_from([math.inf, 1.0]), st.integers(1, 3))
def test_neb_keeps_the_endpoints(seed: int, k: float, cycles: int) -> None:
    """The relaxed chain of ``neb`` starts and ends at the given minima, bit for bit, keeps or grows its
    number of pivots (AutoNEB only inserts), and leaves its arguments unmodified."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    a = {kk: torch.randn(v.shape, generator=g, dtype=torch.float64) for kk, v in model.state_dict().items()}
    b = {kk: torch.randn(v.shape, generator=g, dtype=torch.float64) for kk, v in model.state_dict().items()}
    a0, b0 = {kk: v.clone() for kk, v in a.items()}, {kk: v.clone() for kk, v in b.items()}
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (24,), generator=g)
    cfg = NEBConfig(init_pivots=2, cycles=cycles, max_pivots=4, sub_points=3, insert_threshold=0.0,
                    train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, optimizer="adam"), spring_k=k)
    path = neb(model, a, b, x, y, cfg=cfg, seed=seed, progress=False)
    for kk in a:
        assert torch.equal(path.pivots[kk][0], a[kk]) and torch.equal(path.pivots[kk][-1], b[kk])
        assert torch.equal(a[kk], a0[kk]) and torch.equal(b[kk], b0[kk])
    sizes = [h["interior_pivots"] for h in path.history]
    assert sizes == sorted(sizes) and sizes[0] == 2 and path.n_pivots - 2 == sizes[-1] <= 4
