"""Properties of simplexes (Benton et al. 2021) and ensembles (Garipov et al. 2018).

- the vertices of a simplex are its points at the corners of Δ^{k−1}: Σⱼ (eᵢ)ⱼ θⱼ = θᵢ exactly;
- Dirichlet(1) draws, and draws from a simplicial complex, lie on the probability simplex;
- the simplex volume Vol = √det G / (k − 1)! is invariant to relabelling the vertices and to a common
  permutation P of all vertices (P reindexes coordinates: an isometry of parameter space);
- an ensemble of K identical members is that member (every metric).

Points come from ``invariants.strategies.point_sets`` (every zoo family, BatchNorm statistics and
integer buffers included; float64), permutations from ``Permutation.random`` with the hand-written
spec ``reference.specs.spec_for``.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.support import assert_params_equal
from reference.ensembles import ensemble_table
from reference.params import distance, flatten
from reference.permutation import Permutation
from reference.simplex import Simplex, SimplicialComplex, sample_dirichlet, simplex_log_volume, simplex_volume

_n_vertices = st.integers(2, 5)


def _unstack(stacked: dict, i: int) -> dict:
    return {k: v[i] for k, v in stacked.items()}


def _hadamard_bound(points: list[dict]) -> float:
    """Π‖θᵢ − θ₀‖ / (k − 1)! ≥ Vol (Hadamard's inequality on G): the scale of volume rounding errors."""
    f = [flatten(p) for p in points]
    return math.prod(float((fi - f[0]).norm()) for fi in f[1:]) / math.factorial(len(f) - 1)


def _assert_same_volume(got: float, ref: float, points: list[dict], what: str) -> None:
    """Equal to 1e-9 relative, or to 1e-6 of the Hadamard bound for (nearly) degenerate simplexes,
    whose √det G is dominated by rounding in det G."""
    tol = max(1e-9 * abs(ref), 1e-6 * _hadamard_bound(points))
    assert abs(got - ref) <= tol, f"{what}: volume {got!r} vs {ref!r} (tolerance {tol:.3g})"


@given(ps=S.point_sets(n=_n_vertices))
def test_simplex_vertices_are_its_corner_points(ps: S.PointSet) -> None:
    """Benton et al. 2021, simplex φ(λ) = Σⱼ λⱼ θⱼ: φ(eᵢ) = θᵢ exactly for every vertex (float and
    integer entries; the integer buffers of every point come from θ₀, so only θ₀'s are compared)."""
    k = len(ps.points)
    simplex = Simplex(tuple(ps.points))
    corners = simplex.points(torch.eye(k, dtype=torch.float64))
    for i, theta in enumerate(ps.points):
        got = _unstack(corners, i)
        float_only = {kk: v for kk, v in got.items() if v.is_floating_point()}
        assert_params_equal(float_only, {kk: theta[kk] for kk in float_only}, f"φ(e_{i}) vs θ_{i}")
    ints = {kk: v for kk, v in _unstack(corners, 0).items() if not v.is_floating_point()}
    assert_params_equal(ints, {kk: ps.points[0][kk] for kk in ints}, "integer buffers of φ(e_0)")
    cx = SimplicialComplex(tuple(ps.points), (tuple(range(k)),))
    for kk, v in cx.points(torch.eye(k, dtype=torch.float64)).items():
        assert torch.equal(v, corners[kk]), kk


@given(n=st.integers(0, 64), k=st.integers(1, 8), seed=S.seeds)
def test_dirichlet_samples_lie_on_the_simplex(n: int, k: int, seed: int) -> None:
    """λ ∼ Dirichlet(1, …, 1) (Benton et al. 2021's uniform simplex sampling): λ ≥ 0, Σλ = 1; the
    same seed gives the same draws."""
    lam = sample_dirichlet(n, k, seed)
    assert lam.shape == (n, k) and lam.dtype == torch.float64
    assert bool((lam >= 0).all()) and bool((lam <= 1).all())
    assert bool(((lam.sum(1) - 1).abs() <= 1e-12).all())
    assert torch.equal(lam, sample_dirichlet(n, k, torch.Generator().manual_seed(seed)))


@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    n=st.integers(1, 32),
    seed=S.seeds,
)
def test_complex_samples_lie_on_one_simplex(sizes: list[int], n: int, seed: int) -> None:
    """Sampling a simplicial complex (Benton et al. 2021: a simplex, then a point uniformly in it):
    every coefficient row is on Δ and supported on the vertices of one of the complex's simplices."""
    g = torch.Generator().manual_seed(seed)
    n_vertices = max(sizes) + 2
    simplices = tuple(tuple(sorted(torch.randperm(n_vertices, generator=g)[:s].tolist())) for s in sizes)
    vertices = tuple({"w": torch.full((3,), float(i), dtype=torch.float64)} for i in range(n_vertices))
    c = SimplicialComplex(vertices, simplices).sample_coefficients(n, seed)
    assert bool((c >= 0).all()) and bool(((c.sum(1) - 1).abs() <= 1e-12).all())
    for row in c:
        support = set((row > 0).nonzero().squeeze(1).tolist())
        assert any(support <= set(s) for s in simplices), (support, simplices)


@given(ps=S.point_sets(n=_n_vertices), data=st.data())
def test_volume_is_invariant_to_vertex_relabelling(ps: S.PointSet, data: st.DataObject) -> None:
    """Vol(θ_{π(0)}, …, θ_{π(k−1)}) = Vol(θ₀, …, θ_{k−1}) for every relabelling π: Eq. (V) of
    reference/simplex.py (Benton et al. 2021's Cayley–Menger volume) depends on the vertex set only,
    although G is built on another origin vertex."""
    order = data.draw(st.permutations(range(len(ps.points))))
    relabelled = [ps.points[i] for i in order]
    ref = float(simplex_volume(ps.points))
    _assert_same_volume(float(simplex_volume(relabelled)), ref, ps.points, f"relabelled {order}")
    if ref > 1e-3 * _hadamard_bound(ps.points):  # well-conditioned: log-volumes agree too
        lv, lv_ref = float(simplex_log_volume(relabelled)), float(simplex_log_volume(ps.points))
        assert abs(lv - lv_ref) <= 1e-8, (lv, lv_ref)


@given(ps=S.point_sets(n=_n_vertices), seed=S.perm_seeds)
def test_volume_is_invariant_to_a_common_permutation(ps: S.PointSet, seed: int) -> None:
    """A permutation P of hidden units reindexes parameter coordinates (Ainsworth et al. 2023, §2), so
    it is an isometry: ‖P(θᵢ) − P(θⱼ)‖ = ‖θᵢ − θⱼ‖ and Vol(P(θ₀), …, P(θ_{k−1})) = Vol(θ₀, …, θ_{k−1})
    (Benton et al. 2021's simplexes and their volume regulariser are well defined on permutation
    classes)."""
    perm = Permutation.random(ps.spec, seed)
    permuted = [perm.apply(ps.spec, p) for p in ps.points]
    for i in range(len(ps.points)):
        for j in range(i + 1, len(ps.points)):
            d, dp = distance(ps.points[i], ps.points[j]), distance(permuted[i], permuted[j])
            assert abs(d - dp) <= 1e-12 * max(d, 1.0), (i, j, d, dp)
    ref = float(simplex_volume(ps.points))
    _assert_same_volume(float(simplex_volume(permuted)), ref, ps.points, "common permutation")


def _well_separated(probs: torch.Tensor, n_bins: int = 15, gap: float = 1e-9) -> bool:
    """No near ties that rounding could flip: a row's top two probabilities, two values of a column
    (AUROC ranks them), or a confidence and an ECE bin edge differ by more than ``gap``."""
    top2 = probs.topk(2, dim=1).values if probs.shape[1] > 1 else None
    if top2 is not None and bool(((top2[:, 0] - top2[:, 1]) <= gap).any()):
        return False
    col = probs.sort(dim=0).values
    if probs.shape[0] > 1 and bool(((col[1:] - col[:-1]) <= gap).any()):
        return False
    edge = probs.max(1).values * n_bins
    return not bool(((edge - edge.round()).abs() <= gap).any())


@given(
    k=st.integers(1, 5),
    n=st.integers(4, 40),
    c=st.integers(2, 6),
    scale=st.floats(0.1, 20.0),
    seed=S.seeds,
)
def test_ensemble_of_identical_members_equals_the_member(k: int, n: int, c: int, scale: float, seed: int) -> None:
    """p̄ = (1/K) Σₖ pₖ (Garipov et al. 2018, FGE; Lakshminarayanan et al. 2017) with p₁ = … = p_K = p
    is p: NLL, accuracy, error, ECE and AUROC of the ensemble equal the member's, and so do the
    members' mean metrics, to 1e-12.

    The computed mean of K equal float64 numbers can differ from them by an ulp, and accuracy, ECE and
    AUROC are discontinuous at ties (argmax, bin edges, ranks): examples with near ties (within 1e-9)
    are excluded (``assume``); the thorough profile found such a case (logits × 2e-16, all p ≈ 1/3,
    where the ensemble's accuracy was 0.25 against the member's 0.75)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    assume(_well_separated(probs))
    y = torch.randint(0, c, (n,), generator=g)
    y[:2] = torch.tensor([0, 1])  # AUROC needs two classes
    table = ensemble_table(probs.expand(k, n, c), y)
    member = table["members"][0]
    assert table["ensemble"]["members"] == k
    for name, value in member.items():
        assert abs(table["ensemble"][name] - value) <= 1e-12, (name, table["ensemble"][name], value)
        assert abs(table["member_mean"][name] - value) <= 1e-12, (name, table["member_mean"][name], value)
