"""reference/permuted_simplex.py: simplex barriers, the alignment methods, gluing, and the target."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference.barrier import barrier, linear_path
from reference.evaluate import evaluate_points
from reference.matching import weight_matching
from reference.merge import pairwise_from_universe
from reference.models import build_model, init_params
from reference.permutation import Permutation
from reference.permuted_simplex import (
    ALIGN_METHODS,
    align_simplex,
    barycentric_grid,
    evaluate_simplex,
    glue,
    interior_alignment,
    permutation_equivalent,
    permuted_vertices,
    simplex_barrier,
)
from reference.specs import spec_for
from reference.train import TrainConfig, train_many

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task():
    """Four small MLPs trained on a random teacher's labels (enough for barriers to exist)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    teacher = torch.randn(8, 3, generator=g)
    y = (x @ teacher).argmax(1)
    model = build_model({"name": "mlp", "in_features": 8, "widths": [16, 16], "num_classes": 3, "bias": True})
    cfg = TrainConfig(epochs=15, batch_size=32, lr=1e-2, optimizer="adam")
    models = train_many(model, [init_params(model, s) for s in range(4)], x, y, cfg, list(range(4)), progress=False)
    return model, spec_for(model), models, x, y


def test_barycentric_grid() -> None:
    for n, r in [(1, 3), (2, 4), (3, 5), (4, 6)]:
        gr = barycentric_grid(n, r)
        assert gr.shape == (math.comb(r + n - 1, n - 1), n)
        torch.testing.assert_close(gr.sum(1), torch.ones(len(gr), dtype=torch.float64))
        assert bool((gr >= 0).all())
        torch.testing.assert_close(gr[:n], torch.eye(n, dtype=torch.float64))
        assert len({tuple(row) for row in (gr * r).round().long().tolist()}) == len(gr)
    with pytest.raises(ValueError, match="resolution"):
        barycentric_grid(3, 0)


def test_two_vertex_barrier_is_the_path_barrier(task) -> None:
    """n = 2: Eq. (SB) on the grid is the max-chord barrier of the straight path (same grid)."""
    model, spec, models, x, y = task
    b = simplex_barrier(model, models[:2], x, y, method="grid", resolution=10)
    t, pts = linear_path(models[0], models[1], 11)
    ref = barrier(evaluate_points(model, pts, x, y).loss, t, "max_chord")
    assert b.value == pytest.approx(ref.value, abs=1e-6)
    assert b.edge_barriers[0, 1] == pytest.approx(ref.value, abs=1e-6)
    assert b.value > 0.01  # independently trained: there is a barrier to measure


def test_barrier_of_one_function_is_zero(task) -> None:
    """Vertices that are one point: every λ gives the same loss, so every barrier is 0."""
    model, _, models, x, y = task
    b = simplex_barrier(model, [models[0]] * 3, x, y, method="adversarial", resolution=4, adversarial_steps=3)
    assert abs(b.value) < 1e-5 and b.max_edge < 1e-5
    assert b.centroid_loss == pytest.approx(b.vertex_loss[0], abs=1e-5)


def test_barrier_methods_and_summaries(task) -> None:
    model, spec, models, x, y = task
    vs = align_simplex(spec, models[:3], "star").vertices
    grid = simplex_barrier(model, vs, x, y, method="grid", resolution=6)
    adv = simplex_barrier(model, vs, x, y, method="adversarial", resolution=6, adversarial_steps=10)
    dirich = simplex_barrier(model, vs, x, y, method="dirichlet", samples=64)
    assert adv.value >= grid.value - 1e-9  # the ascent starts from the grid's best points
    assert grid.value >= 0 and dirich.value >= 0  # the vertices are candidates (gap 0)
    assert set(grid.edge_barriers) == {(0, 1), (0, 2), (1, 2)}
    assert sum(grid.lam) == pytest.approx(1.0) and len(grid.lam) == 3
    assert grid.n_points == math.comb(8, 2)
    d = grid.as_dict()
    assert d["edge_barriers"].keys() == {"0-1", "0-2", "1-2"}
    json.dumps(d)
    # the mean loss is an average of losses on the simplex: between the smallest vertex loss and the max
    assert min(grid.vertex_loss) - 1e-6 <= grid.mean_loss


def test_barrier_input_errors(task) -> None:
    model, spec, models, x, y = task
    with pytest.raises(ValueError, match="exact grid"):
        simplex_barrier(model, models + [models[0]], x, y, method="grid")
    with pytest.raises(ValueError, match="unknown barrier method"):
        simplex_barrier(model, models[:2], x, y, method="max")
    with pytest.raises(ValueError, match="at least 2"):
        simplex_barrier(model, models[:1], x, y)
    bad = {k: v.clone() for k, v in models[1].items()}
    bad["layers.0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="vertex 1"):
        simplex_barrier(model, [models[0], bad], x, y)
    with pytest.raises(ValueError, match="barycentric"):
        evaluate_simplex(model, models[:2], x, y, [[0.5, 0.6]])
    with pytest.raises(ValueError, match="unknown correction"):
        evaluate_simplex(model, models[:2], x, y, [[0.5, 0.5]], correction="bn")
    with pytest.raises(ValueError, match="x_stats"):
        evaluate_simplex(model, models[:2], x, y, [[0.5, 0.5]], correction="repair")


def test_batchnorm_needs_a_correction() -> None:
    model = build_model({"name": "vgg", "in_channels": 1, "channels": [4, 4], "num_classes": 3, "norm": "batch",
                         "dims": 1})
    x = torch.randn(16, 1, 12)
    y = torch.randint(0, 3, (16,))
    pts = [init_params(model, s) for s in range(2)]
    with pytest.raises(ValueError, match="BatchNorm"):
        evaluate_simplex(model, pts, x, y, [[0.5, 0.5]])
    ev = evaluate_simplex(model, pts, x, y, [[0.5, 0.5], [1.0, 0.0]], correction="bn_reset", x_stats=x)
    assert ev.loss.shape == (2,) and bool(torch.isfinite(ev.loss).all())


def test_repair_correction_runs_on_an_mlp(task) -> None:
    model, spec, models, x, y = task
    vs = align_simplex(spec, models[:3], "mergemany").vertices
    plain = evaluate_simplex(model, vs, x, y, [[1 / 3] * 3])
    rep = evaluate_simplex(model, vs, x, y, [[1 / 3] * 3, [1.0, 0.0, 0.0]], correction="repair", x_stats=x)
    assert bool(torch.isfinite(rep.loss).all())
    # REPAIR at a vertex is the identity (its own statistics are its target)
    assert float(rep.loss[1]) == pytest.approx(float(rep.vertex_loss[0]), abs=1e-4)
    assert plain.loss.shape == (1,)


@pytest.mark.parametrize("method", ALIGN_METHODS)
def test_every_method_anchors_theta1_and_keeps_functions(task, method) -> None:
    """P₁ = id, and vertex i = Pᵢ(θᵢ) computes θᵢ's function (property 1 of the note, vertex-wise)."""
    model, spec, models, x, y = task
    ps = align_simplex(spec, models[:3], method, model=model, x=x, y=y, steps=8, lr=0.05, batch_size=64)
    assert ps.perms[0].is_identity() and ps.method == method and ps.n == 3
    for p, v, m in zip(ps.perms, ps.vertices, models, strict=False):
        Permutation(p.to_dict(), spec)  # valid
        torch.testing.assert_close(model_out(model, v, x), model_out(model, m, x), rtol=1e-4, atol=1e-5)
    assert ps.points([[1.0, 0, 0], [0, 0.5, 0.5]])["layers.0.weight"].shape[0] == 2


def model_out(model, p, x):
    from torch.func import functional_call

    with torch.no_grad():
        return functional_call(model.eval(), p, (x,))


def test_star_is_pairwise_weight_matching_and_universe_is_anchored(task) -> None:
    model, spec, models, x, y = task
    star = align_simplex(spec, models[:3], "star")
    for i in (1, 2):
        assert star.perms[i] == weight_matching(spec, models[0], models[i]).perm
    uni = align_simplex(spec, models[:3], "universe")
    from reference.merge import universe_alignment

    us = universe_alignment(spec, models[:3], method="sync").to_universe
    for i in range(3):
        assert uni.perms[i] == pairwise_from_universe(us, 0, i)
    with pytest.raises(ValueError, match="unknown alignment"):
        align_simplex(spec, models[:3], "sinkhorn")
    with pytest.raises(ValueError, match="needs model"):
        align_simplex(spec, models[:3], "interior")
    with pytest.raises(ValueError, match="init must be"):
        align_simplex(spec, models[:3], "interior", model=model, x=x, y=y, init="interior")
    with pytest.raises(ValueError, match="at least 2 models"):
        align_simplex(spec, models[:1], "star")
    other = build_model({"name": "mlp", "in_features": 8, "widths": [16, 8], "num_classes": 3, "bias": True})
    with pytest.raises(ValueError):
        align_simplex(spec, [models[0], init_params(other, 0)], "star")


def test_interior_never_worse_than_its_start_and_deterministic(task) -> None:
    model, spec, models, x, y = task
    start = align_simplex(spec, models[:3], "star").perms
    kw = dict(init=start, steps=24, lr=0.1, batch_size=64, eval_every=6, eval_lams=8, seed=3)
    r = interior_alignment(model, spec, models[:3], x, y, **kw)
    assert r.score <= r.history[0] + 1e-12
    assert r.score == min(r.history)
    assert r.eval_steps == (0, 6, 12, 18, 24) and len(r.step_losses) == 24
    assert r.perms[0].is_identity()
    assert r.changed[0] == 0
    r2 = interior_alignment(model, spec, models[:3], x, y, **kw)
    assert r2.history == r.history and all(a == b for a, b in zip(r.perms, r2.perms, strict=True))
    with pytest.raises(ValueError, match="identity"):
        interior_alignment(model, spec, models[:3], x, y, init=[start[1], start[0], start[2]], steps=1)
    with pytest.raises(ValueError, match="lr"):
        interior_alignment(model, spec, models[:3], x, y, init=start, steps=1, lr=float("nan"))
    with pytest.raises(ValueError, match="3 models"):
        interior_alignment(model, spec, models[:3], x, y, init=start[:2], steps=1)


def test_interior_lowers_the_expected_loss_on_a_real_task(task) -> None:
    """On trained nets the search finds permutations with a lower expected interior loss than star."""
    model, spec, models, x, y = task
    start = align_simplex(spec, models[:3], "star").perms
    r = interior_alignment(model, spec, models[:3], x, y, init=start, steps=80, lr=0.1, batch_size=64,
                           eval_every=10, eval_lams=16)
    assert r.score < r.history[0]
    assert max(r.changed) > 0


def test_permutation_equivalence(task) -> None:
    _, spec, models, _, _ = task
    q = Permutation.random(spec, 5)
    p = permutation_equivalent(spec, models[0], q.apply(spec, models[0]))
    assert p is not None
    torch.testing.assert_close(p.apply(spec, q.apply(spec, models[0])), models[0])
    assert permutation_equivalent(spec, models[0], models[1]) is None
    with pytest.raises(ValueError, match="different keys"):
        permutation_equivalent(spec, models[0], {k: v for k, v in models[1].items() if k != "layers.0.bias"})


def test_glue_complex_and_sampling(task) -> None:
    model, spec, models, x, _ = task
    r = [Permutation.random(spec, s) for s in range(6)]
    s1 = [r[0].apply(spec, models[0]), r[1].apply(spec, models[1]), r[2].apply(spec, models[2])]
    s2 = [r[3].apply(spec, models[2]), r[4].apply(spec, models[3]), r[5].apply(spec, models[0])]
    cx = glue(spec, [s1, s2])
    assert cx.classes == ((0, 1, 2), (2, 3, 0))
    assert cx.n_classes == 4
    assert set(cx.shared()) == {0, 2}
    for j, s in enumerate((s1, s2)):
        for v, vert in enumerate(s):
            rep = [s1, s2][cx.occurrences()[cx.classes[j][v]][0][0]][cx.occurrences()[cx.classes[j][v]][0][1]]
            torch.testing.assert_close(cx.maps[j][v].apply(spec, rep), vert)
    assert max(cx.function_gap(model, x).values()) < 1e-5
    js, lams, pts = cx.sample(10, 0)
    assert js.shape == (10,) and lams.shape == (10, 3) and pts["layers.0.weight"].shape[0] == 10
    torch.testing.assert_close(lams.sum(1), torch.ones(10, dtype=torch.float64))
    js_u, _, _ = cx.sample(10, 0, weighting="uniform")
    assert js_u.shape == (10,)
    with pytest.raises(ValueError, match="weighting"):
        cx.sample(3, 0, weighting="area")
    with pytest.raises(ValueError, match="degenerate simplex"):
        glue(spec, [[models[0], r[0].apply(spec, models[0])]])
    with pytest.raises(ValueError, match="no simplexes"):
        glue(spec, [])
    mixed = glue(spec, [s1, s2[:2]])
    with pytest.raises(ValueError, match="one dimension"):
        mixed.sample(2, 0)


def test_permuted_vertices_checks_lengths(task) -> None:
    _, spec, models, _, _ = task
    with pytest.raises(ValueError, match="2 permutations for 3 models"):
        permuted_vertices(spec, models[:3], [Permutation.identity(spec)] * 2)


def test_target_quick_runs(tmp_path) -> None:
    """The quick target end to end: tables, figures, claims with measured numbers."""
    out = tmp_path / "out"
    env_cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "repro", "run", "permuted-simplex", "--quick", "--no-progress", "--out", str(out),
         "--cache-dir", str(env_cache)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = out / "permuted-simplex"
    for name in ("simplex_barrier", "property2", "ensembles", "low_loss_n", "repair"):
        assert (d / f"{name}.csv").is_file() and (d / f"{name}.md").is_file()
    assert (d / "simplex_barrier.png").is_file() and (d / "ternary.png").is_file()
    summary = json.loads((d / "summary.json").read_text())
    ids = {c["id"] for c in summary["claims"]}
    assert {"property-2", "joint-beats-star", "interior-improves", "glue-exact", "complex-ensemble"} <= ids
    glue_claim = next(c for c in summary["claims"] if c["id"] == "glue-exact")
    assert glue_claim["held"], glue_claim
    # the job cache is the runner's: <cache-dir>/jobs/<target>/, one record per job (3 cells + 4 main-cell parts)
    assert len(list((env_cache / "jobs" / "permuted-simplex").glob("*.json"))) == 3 + 4
    assert not (d / ".jobs").exists()


def test_interior_with_a_dirichlet_concentration_is_seeded(task) -> None:
    model, spec, models, x, y = task
    start = align_simplex(spec, models[:3], "star").perms
    kw = dict(init=start, steps=6, lr=0.1, batch_size=64, eval_every=3, eval_lams=4, seed=1, concentration=0.5)
    a = interior_alignment(model, spec, models[:3], x, y, **kw)
    b = interior_alignment(model, spec, models[:3], x, y, **kw)
    assert a.step_losses == b.step_losses
    with pytest.raises(ValueError, match="concentration"):
        interior_alignment(model, spec, models[:3], x, y, **{**kw, "concentration": 0.0})


@pytest.mark.gpu
def test_simplex_barrier_and_interior_on_cuda(task) -> None:
    """The barrier measured on CUDA equals the CPU one (TF32 tolerance); the interior search runs on
    CUDA and its score never exceeds its start."""
    model, spec, models, x, y = task
    vs = align_simplex(spec, models[:3], "star").vertices
    cpu = simplex_barrier(model, vs, x, y, method="grid", resolution=6)
    gpu = simplex_barrier(model, [{k: v.cuda() for k, v in p.items()} for p in vs], x.cuda(), y.cuda(),
                          method="grid", resolution=6)
    assert gpu.value == pytest.approx(cpu.value, abs=5e-3)
    start = align_simplex(spec, models[:3], "star").perms
    r = interior_alignment(model, spec, models[:3], x, y, init=start, steps=10, lr=0.1, batch_size=64,
                           eval_lams=4, device="cuda")
    assert r.score <= r.history[0]


def test_interior_scored_with_repair(task) -> None:
    """``correction="repair"``: candidates are scored on the REPAIRed simplex, so history[0] is the
    start's mean REPAIRed loss at the evaluation points."""
    model, spec, models, x, y = task
    start = align_simplex(spec, models[:3], "star").perms
    r = interior_alignment(model, spec, models[:3], x, y, init=start, steps=8, lr=0.1, batch_size=64,
                           eval_every=4, eval_lams=4, correction="repair", seed=2)
    plain = interior_alignment(model, spec, models[:3], x, y, init=start, steps=8, lr=0.1, batch_size=64,
                               eval_every=4, eval_lams=4, seed=2)
    assert r.score <= r.history[0] and r.history[0] != plain.history[0]
    with pytest.raises(ValueError, match="unknown correction"):
        interior_alignment(model, spec, models[:3], x, y, init=start, steps=1, correction="bn")
