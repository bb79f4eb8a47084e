"""Properties of reference/permuted_simplex.py (the permuted-simplex research note, ``sources/000``).

- The simplex barrier (Eq. SB) is a property of the *set* of vertices: relabelling the vertices
  (permuting their order) leaves it unchanged — the barycentric grid is symmetric under permuting
  coordinates, so the same points are evaluated.
- Property 1 of the note: Σ λᵢ P(vᵢ) and Σ λᵢ vᵢ compute the same function for a common permutation
  P, so the barrier (every point's loss) is invariant under a common permutation of all vertices.
- The grid estimate is monotone under refinement: grid(r) ⊂ grid(2r), so B_2r ≥ B_r.
- Every alignment method keeps the vertices' functions, vertex by vertex: Pᵢ(θᵢ) computes θᵢ's
  function (the note's permutation symmetry), P₁ = id, and the aligned simplex's points keep their
  functions under one more common relabelling (Property 1 on the algorithm's output).
- Gluing identifies exactly the permutation-equivalent vertices: simplexes built from a few distinct
  models, each vertex relabelled by its own random permutation, glue into classes that are the
  models, and each map takes the class representative to the vertex.

Losses are compared at float32 precision (``evaluate_points`` reduces the cross-entropy in float32)
relative to the loss scale; the parameter maps exactly. BatchNorm nets are evaluated with
``correction="bn_reset"`` (statistics recomputed at every point on the example inputs).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.support import assert_same_function, forward
from reference.bn import has_batchnorm
from reference.permutation import Permutation
from reference.permuted_simplex import align_simplex, glue, simplex_barrier
from reference.simplex import sample_dirichlet


def _labels(ps: S.PointSet, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ps.model.config["num_classes"], (ps.x.shape[0],), generator=g)


def _sb(ps: S.PointSet, vertices, y, resolution: int = 4):
    kw = {"correction": "bn_reset", "x_stats": ps.x} if has_batchnorm(ps.model) else {}
    return simplex_barrier(ps.model, vertices, ps.x, y, method="grid", resolution=resolution, edge_grid=5, **kw)


def _tol(*bs) -> float:
    return 2e-5 * (1.0 + max(max(abs(v) for v in b.vertex_loss) + abs(b.value) for b in bs))


@given(ps=S.point_sets(n=3), order=st.permutations([0, 1, 2]), seed=S.seeds)
def test_simplex_barrier_invariant_to_relabelling_vertices(ps: S.PointSet, order, seed: int) -> None:
    """Eq. (SB) over the symmetric grid: B(v_σ(1), v_σ(2), v_σ(3)) = B(v₁, v₂, v₃)."""
    y = _labels(ps, seed)
    b0 = _sb(ps, ps.points, y)
    b1 = _sb(ps, [ps.points[i] for i in order], y)
    assert b1.value == pytest.approx(b0.value, abs=_tol(b0, b1))
    assert b1.centroid_loss == pytest.approx(b0.centroid_loss, abs=_tol(b0, b1))
    inv = {new: old for new, old in enumerate(order)}
    for (i, j), v in b1.edge_barriers.items():
        key = tuple(sorted((inv[i], inv[j])))
        assert v == pytest.approx(b0.edge_barriers[key], abs=_tol(b0, b1)), (i, j)


@given(ps=S.point_sets(n=3), perm_seed=S.perm_seeds, seed=S.seeds)
def test_simplex_barrier_invariant_to_a_common_permutation(ps: S.PointSet, perm_seed: int, seed: int) -> None:
    """The note's Property 1: Σ λᵢ P(vᵢ) computes Σ λᵢ vᵢ's function, so B(P(v₁), …) = B(v₁, …)."""
    y = _labels(ps, seed)
    p = Permutation.random(ps.spec, perm_seed)
    b0 = _sb(ps, ps.points, y)
    b1 = _sb(ps, [p.apply(ps.spec, v) for v in ps.points], y)
    assert b1.value == pytest.approx(b0.value, abs=_tol(b0, b1))
    assert b1.mean_loss == pytest.approx(b0.mean_loss, abs=_tol(b0, b1))
    assert b1.max_edge == pytest.approx(b0.max_edge, abs=_tol(b0, b1))


@given(ps=S.point_sets(n=st.integers(2, 3), families=("mlp", "vgg", "cnn1d")), r=st.integers(1, 3), seed=S.seeds)
def test_grid_barrier_monotone_under_refinement(ps: S.PointSet, r: int, seed: int) -> None:
    """grid(r) ⊂ grid(2r) (k/r = 2k/2r exactly), so the grid estimate of the max can only grow; and
    B ≥ 0 because the vertices are grid points with gap 0."""
    y = _labels(ps, seed)
    coarse = _sb(ps, ps.points, y, r)
    fine = _sb(ps, ps.points, y, 2 * r)
    assert coarse.value >= -_tol(coarse)
    assert fine.value >= coarse.value - _tol(coarse, fine)


@given(
    ps=S.point_sets(n=3, families=("mlp", "vgg", "cnn1d")),
    method=st.sampled_from(["identity", "star", "mergemany", "universe", "interior"]),
    perm_seed=S.perm_seeds,
    lam_seed=S.seeds,
    train=st.booleans(),
)
def test_alignment_keeps_every_vertex_function(ps: S.PointSet, method: str, perm_seed: int, lam_seed: int,
                                               train: bool) -> None:
    """Every method returns Pᵢ(θᵢ) with f(Pᵢ(θᵢ), x) = f(θᵢ, x) (train and eval mode) and P₁ = id; a further
    common relabelling Q keeps the aligned simplex's points' functions: f(Σ λᵢ Q(vᵢ)) = f(Σ λᵢ vᵢ)."""
    y = _labels(ps, lam_seed)
    kw = {"model": ps.model, "x": ps.x, "y": y, "steps": 3, "lr": 0.1, "batch_size": ps.x.shape[0], "eval_lams": 2,
          "train_mode": has_batchnorm(ps.model)} if method == "interior" else {}
    out = align_simplex(ps.spec, ps.points, method, **kw)
    assert out.perms[0].is_identity()
    for i, (v, theta) in enumerate(zip(out.vertices, ps.points, strict=True)):
        assert_same_function(forward(ps.model, v, ps.x, train), forward(ps.model, theta, ps.x, train), f"vertex {i}")
    q = Permutation.random(ps.spec, perm_seed)
    lam = sample_dirichlet(2, 3, torch.Generator().manual_seed(lam_seed))
    pts = out.points(lam)
    qpts = align_simplex(ps.spec, [q.apply(ps.spec, v) for v in out.vertices], "identity").points(lam)
    for k in range(2):
        a = {kk: v[k] for kk, v in pts.items()}
        b = {kk: v[k] for kk, v in qpts.items()}
        assert_same_function(forward(ps.model, b, ps.x, train), forward(ps.model, a, ps.x, train), f"point {k}")


@given(
    ps=S.point_sets(n=st.integers(2, 4), kinds=("normal", "default", "sgd")),
    data=st.data(),
)
def test_glue_identifies_exactly_the_equivalent_vertices(ps: S.PointSet, data) -> None:
    """Simplexes over subsets of distinct models, every vertex relabelled by its own permutation:
    the glued classes are the models (numbered by first appearance), and maps[j][v] takes the class
    representative to the vertex exactly."""
    m = len(ps.points)
    # hypothesis may draw one model twice: equal models are one class
    same = [next(j for j in range(m) if all(torch.equal(ps.points[i][k], ps.points[j][k]) for k in ps.points[i]))
            for i in range(m)]
    distinct = sorted(set(same))
    assume(len(distinct) >= 2)
    n_simplices = data.draw(st.integers(1, 3))
    subsets = [data.draw(st.lists(st.sampled_from(distinct), min_size=2, max_size=len(distinct), unique=True))
               for _ in range(n_simplices)]
    sims = [[Permutation.random(ps.spec, data.draw(S.perm_seeds)).apply(ps.spec, ps.points[i]) for i in sub]
            for sub in subsets]
    cx = glue(ps.spec, sims)
    first: dict[int, int] = {}
    for sub in subsets:
        for i in sub:
            first.setdefault(i, len(first))
    assert cx.classes == tuple(tuple(first[i] for i in sub) for sub in subsets)
    reps = {}
    for j, cl in enumerate(cx.classes):
        for v, c in enumerate(cl):
            reps.setdefault(c, sims[j][v])
            mapped = cx.maps[j][v].apply(ps.spec, reps[c])
            for k in mapped:
                torch.testing.assert_close(mapped[k], sims[j][v][k], rtol=1e-5, atol=1e-7)
