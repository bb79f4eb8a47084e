"""Unit tests of ``reference/hessian.py``: HVPs, dense H, eigsh / Hutchinson / SLQ, curve directions,
input Jacobian, error paths; and the ``rashomon-hessian`` target at quick size (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import reference.hessian as hs
from reference.curves import Bezier, Curve
from reference.models import CNN1D, MLP, init_params
from reference.params import flatten


def _mlp_case(seed: int = 0, n: int = 40, widths=(6, 5)):
    model = MLP(4, list(widths), 3).double()
    params = {k: v.double() for k, v in init_params(model, seed).items()}
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, params, x, y


@pytest.fixture(scope="module")
def case():
    model, params, x, y = _mlp_case()
    return model, params, x, y, hs.loss_hessian(model, params, x, y)


def _reference_hessian(model, params, x, y, keys) -> torch.Tensor:
    """torch.func.hessian (jacfwd ∘ jacrev) of the loss of the flat parameters: an independent dense H."""
    theta = flatten(params, keys)

    def f(flat):
        p, i = dict(params), 0
        for k in keys:
            m = params[k].numel()
            p[k] = flat[i : i + m].view(params[k].shape)
            i += m
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    return torch.func.hessian(f)(theta)


def test_dense_matches_torch_func_hessian(case):
    model, params, x, y, H = case
    ref = _reference_hessian(model, params, x, y, H.keys)
    torch.testing.assert_close(H.dense(chunk=7), ref, rtol=1e-10, atol=1e-12)
    assert H.loss() == pytest.approx(float(torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)))


def test_three_hvps_agree_and_hvp_many_is_rowwise(case):
    *_, H = case
    g = torch.Generator().manual_seed(3)
    V = torch.randn(4, H.dim, generator=g, dtype=torch.float64)
    f = H.loss_fn()
    many = H.hvp_many(V, chunk=3)
    for i in range(4):
        a = hs.hvp(f, H.theta, V[i])
        torch.testing.assert_close(H.hvp(V[i]), a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(hs.hvp_double_backward(f, H.theta, V[i]), a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(hs.hvp_reverse_over_reverse(f, H.theta, V[i]), a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(many[i], a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
def test_both_hvp_modes_agree(case, mode):
    """``hvp_mode`` picks how LossHessian differentiates twice, not what it computes: both modes give H's
    columns (the independent dense reference), for single vectors and vmapped blocks, over data chunks."""
    model, params, x, y, H = case
    Hm = hs.loss_hessian(model, params, x, y, batch_size=7, hvp_mode=mode)
    assert Hm.mode == mode
    ref = _reference_hessian(model, params, x, y, H.keys)
    torch.testing.assert_close(Hm.dense(chunk=5), ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(H.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(Hm.hvp(v), ref @ v, rtol=1e-10, atol=1e-12)


def test_auto_hvp_mode_follows_the_device(case):
    *_, H = case
    assert H.hvp_mode == "auto" and H.mode == "double-backward"  # the CPU: measured faster (bench/bench_hvp.py)
    with pytest.raises(ValueError, match="hvp_mode"):
        hs.loss_hessian(*case[:4], hvp_mode="fastest")


def test_data_chunks_sum_to_the_full_batch(case):
    model, params, x, y, H = case
    Hc = hs.loss_hessian(model, params, x, y, batch_size=7)  # 40 = 5·7 + 5: an uneven last chunk
    v = torch.linspace(-1, 1, H.dim, dtype=torch.float64)
    torch.testing.assert_close(Hc.hvp(v), H.hvp(v), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(Hc.grad(), H.grad(), rtol=1e-10, atol=1e-13)
    assert Hc.loss() == pytest.approx(H.loss(), rel=1e-12)


def test_batchnorm_buffers_are_constants_and_mode_is_restored():
    model = CNN1D(1, [3, 4], 3, norm="batch", kernel_size=3).double()
    params = {k: v.double() if v.is_floating_point() else v for k, v in init_params(model, 0).items()}
    params = {k: (v + 0.3 if "running_mean" in k else v) for k, v in params.items()}
    x = torch.randn(6, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()
    before = {k: v.clone() for k, v in params.items()}
    H = hs.loss_hessian(model, params, x, y)
    assert not any("running" in k or "num_batches" in k for k in H.keys)
    assert H.dim == sum(p.numel() for p in model.parameters())
    ref = _reference_hessian(model.eval(), params, x, y, H.keys)  # eval mode: running statistics
    model.train()
    torch.testing.assert_close(H.dense(), ref, rtol=1e-9, atol=1e-12)
    assert model.training, "the caller's train/eval flag must be restored"
    for k, v in before.items():
        assert torch.equal(params[k], v), f"{k} was modified"


def test_top_eigenvalues_and_exact_spectrum(case):
    *_, H = case
    exact = hs.exact_spectrum(H)
    assert bool((exact[1:] >= exact[:-1]).all())
    vals, vecs = hs.top_eigenvalues(H, 4, tol=1e-12)
    torch.testing.assert_close(vals, exact.flip(0)[:4], rtol=1e-8, atol=1e-10)
    assert vecs.shape == (H.dim, 4)
    low, _ = hs.top_eigenvalues(H, 2, which="SA", tol=1e-12)
    torch.testing.assert_close(low.flip(0), exact[:2], rtol=1e-8, atol=1e-10)


def test_hutchinson_is_exact_on_the_diagonal_and_unbiased(case):
    *_, H = case
    exact = float(hs.exact_spectrum(H).sum())
    est = hs.hutchinson_trace(H, 400, seed=1)
    assert est.samples.shape == (400,)
    assert abs(est.estimate - exact) <= 4 * est.stderr
    # zᵀHz = tr H + Σ_{i≠j} zᵢzⱼHᵢⱼ: the sample mean over many draws pins the trace; and it is the
    # same estimate as SLQ's (d · vᵀHv with v = z/‖z‖, ‖z‖² = d for Rademacher z)
    sd = hs.slq(H, probes=5, steps=3, seed=2)
    z = (torch.randint(0, 2, (5, H.dim), generator=torch.Generator().manual_seed(2)).double() * 2 - 1)
    q = (z * H.hvp_many(z)).sum(1).mean()
    assert sd.trace() == pytest.approx(float(q), rel=1e-10)


def test_lanczos_gauss_quadrature_matches_moments():
    """m Lanczos steps give a Gauss rule exact for polynomials of degree ≤ 2m − 1 (Golub & Meurant):
    Σᵢ τᵢ λ̃ᵢᵏ = vᵀAᵏv for unit v, k ≤ 2m − 1; and m = d recovers the spectrum."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1, 3, 30, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    v0 = torch.randn(2, 30, generator=g, dtype=torch.float64)
    m = 6
    alpha, beta = hs.lanczos(lambda V: V @ A, v0, m)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    nodes, U = torch.linalg.eigh(T)
    w = U[:, 0, :] ** 2
    v = v0 / v0.norm(dim=1, keepdim=True)
    for k in range(2 * m):
        mom = ((v @ torch.linalg.matrix_power(A, k)) * v).sum(1)
        torch.testing.assert_close((w * nodes**k).sum(1), mom, rtol=1e-9, atol=1e-9)
    a_full, b_full = hs.lanczos(lambda V: V @ A, v0[:1], 30)
    T = torch.diag(a_full[0]) + torch.diag(b_full[0], 1) + torch.diag(b_full[0], -1)
    torch.testing.assert_close(torch.linalg.eigvalsh(T), lam, rtol=1e-8, atol=1e-8)


def test_lanczos_survives_an_exhausted_krylov_space():
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0], dtype=torch.float64))  # 3 distinct eigenvalues
    v0 = torch.ones(1, 5, dtype=torch.float64)
    alpha, beta = hs.lanczos(lambda V: V @ A, v0, 5)
    assert float(beta[0, 2]) == 0.0 and float(beta[0, 3]) == 0.0
    T = torch.diag(alpha[0]) + torch.diag(beta[0], 1) + torch.diag(beta[0], -1)
    nodes, U = torch.linalg.eigh(T)
    sd = hs.SpectralDensity(nodes.unsqueeze(0), (U[0, :] ** 2).unsqueeze(0), 5)
    assert sd.count_in(0.5, 1.5) == pytest.approx(2.0)
    assert sd.count_in(1.5, 2.5) == pytest.approx(2.0)
    assert sd.count_in(4.5, 5.5) == pytest.approx(1.0)
    assert sd.trace() == pytest.approx(11.0)


def test_slq_density_and_counts(case):
    *_, H = case
    sd = hs.slq(H, probes=6, steps=min(40, H.dim), seed=0)
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(6, dtype=torch.float64))
    exact = hs.exact_spectrum(H)
    assert float(sd.nodes.min()) >= float(exact[0]) - 1e-9 and float(sd.nodes.max()) <= float(exact[-1]) + 1e-9
    assert sd.count_in(-1e9, 1e9) == pytest.approx(H.dim)
    lo, hi = float(exact[0]) - 1, float(exact[-1]) + 1
    grid = torch.linspace(lo, hi, 4001, dtype=torch.float64)
    dens = sd.density(grid, sigma=0.02)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="sigma"):
        sd.density(grid, 0.0)


def test_count_near_zero():
    e = torch.tensor([-1e-5, 0.0, 2e-4, 0.5, 1.0])
    assert hs.count_near_zero(e, 1e-4) == 2
    assert hs.count_near_zero(e, 1e-3) == 3
    with pytest.raises(ValueError, match="rel_tol"):
        hs.count_near_zero(e, 0.0)


def test_curve_directions_of_a_quadratic_bezier():
    g = torch.Generator().manual_seed(0)
    a, b, c = ({"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "n": torch.tensor(3)} for _ in range(3))
    curve = Curve(Bezier(2), a, b, (c,))
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    d = hs.curve_directions(curve, t, h=1e-3)
    assert set(d) == {"straight", "detour", "tangent", "tangent_fd"}
    ab = (b["w"] - a["w"]).reshape(-1)
    for row in d["straight"]:
        torch.testing.assert_close(row, ab / ab.norm())
    # φ(t) − chord(t) = 2t(1 − t)(θ_c − (θ_a + θ_b)/2): one direction for all interior t, undefined at the ends
    det = (c["w"] - 0.5 * (a["w"] + b["w"])).reshape(-1)
    for row in d["detour"][1:4]:
        torch.testing.assert_close(row, det / det.norm())
    assert bool(d["detour"][[0, 4]].isnan().all())
    # φ'(t) = 2(1 − t)(θ_c − θ_a) + 2t(θ_b − θ_c); central differences are exact for a quadratic, so the
    # fd tangent matches the exact one to rounding inside and to O(h) at the one-sided ends
    for i, ti in enumerate(t.tolist()):
        tan = (2 * (1 - ti) * (c["w"] - a["w"]) + 2 * ti * (b["w"] - c["w"])).reshape(-1)
        torch.testing.assert_close(d["tangent"][i], tan / tan.norm())
    torch.testing.assert_close(d["tangent_fd"][1:4], d["tangent"][1:4], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(d["tangent_fd"][[0, 4]], d["tangent"][[0, 4]], rtol=0, atol=1e-2)
    # at t = ½ the tangent of a quadratic Bézier is parallel to the chord
    torch.testing.assert_close(d["tangent"][2], d["straight"][2])
    # the straight line has no detour
    line = Curve.init_linear(a, b, "bezier", 2)
    assert bool(hs.curve_directions(line, [0.3])["detour"].isnan().all())


def test_directional_curvature(case):
    *_, H = case
    g = torch.Generator().manual_seed(5)
    u = torch.randn(3, H.dim, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    u[1] = float("nan")
    norm, rq = hs.directional_curvature(H, u)
    D = H.dense()
    for i in (0, 2):
        assert float(norm[i]) == pytest.approx(float((D @ u[i]).norm()), rel=1e-10)
        assert float(rq[i]) == pytest.approx(float(u[i] @ D @ u[i]), rel=1e-10)
    assert math.isnan(float(norm[1])) and math.isnan(float(rq[1]))


def test_input_jacobian_matches_autograd(case):
    model, params, x, *_ = case
    J = hs.input_jacobian(model, params, x[:5])
    assert J.shape == (5, 3, 4)
    for i in range(5):
        ref = torch.autograd.functional.jacobian(lambda xi: functional_call(model, params, (xi.unsqueeze(0),))[0],
                                                 x[i])
        torch.testing.assert_close(J[i], ref)


def test_errors(case):
    model, params, x, y, H = case
    with pytest.raises(ValueError, match=r"v must have shape"):
        H.hvp(torch.zeros(H.dim + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="v must be a Tensor"):
        H.hvp([0.0] * H.dim)
    with pytest.raises(ValueError, match=r"vs must be"):
        H.hvp_many(torch.zeros(H.dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="missing"):
        hs.loss_hessian(model, {k: v for k, v in params.items() if k != "head.bias"}, x, y)
    with pytest.raises(ValueError, match="'nope' is not in params"):
        hs.loss_hessian(model, params, x, y, keys=["nope"])
    with pytest.raises(ValueError, match="same number"):
        hs.loss_hessian(model, params, x, y[:-1])
    with pytest.raises(ValueError, match="batch_size"):
        hs.loss_hessian(model, params, x, y, batch_size=0)
    with pytest.raises(ValueError, match="one dtype"):
        hs.loss_hessian(model, {**params, "head.bias": params["head.bias"].float()}, x, y)
    with pytest.raises(ValueError, match="k must be"):
        hs.top_eigenvalues(H, H.dim)
    with pytest.raises(ValueError, match="which"):
        hs.top_eigenvalues(H, 2, which="BE")
    with pytest.raises(ValueError, match="samples"):
        hs.hutchinson_trace(H, 1)
    with pytest.raises(ValueError, match="steps"):
        hs.lanczos(H.hvp_many, torch.ones(1, H.dim, dtype=torch.float64), H.dim + 1)
    with pytest.raises(ValueError, match="zero"):
        hs.lanczos(H.hvp_many, torch.zeros(1, H.dim, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="theta must be a flat vector"):
        hs.hvp(H.loss_fn(), H.theta.view(1, -1), H.theta.view(1, -1))
    with pytest.raises(TypeError, match="curve must be a Curve"):
        hs.curve_directions({"w": torch.zeros(2)}, [0.5])
    with pytest.raises(ValueError, match="x must be a batch"):
        hs.input_jacobian(model, params, x[0])


def test_argument_types_and_ranges(case):
    """Floats, bools and out-of-range values are refused, never truncated (``int(2.5)`` would be 2)."""
    from reference.validate import ArgumentTypeError

    model, params, x, y, H = case
    one = torch.ones(1, H.dim, dtype=torch.float64)
    with pytest.raises(ArgumentTypeError, match="batch_size must be an integer, got 2.5"):
        hs.loss_hessian(model, params, x, y, batch_size=2.5)
    with pytest.raises(ArgumentTypeError, match="chunk must be an integer, got True"):
        H.hvp_many(one, chunk=True)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1, got 0"):
        H.hvp_many(one, chunk=0)
    with pytest.raises(ValueError, match="at least one row"):
        H.hvp_many(torch.zeros(0, H.dim, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"k must be an integer <= {H.dim - 1}"):
        hs.top_eigenvalues(H, H.dim)
    with pytest.raises(ArgumentTypeError, match="k must be an integer"):
        hs.top_eigenvalues(H, 2.0)
    with pytest.raises(ValueError, match="unknown which 'BE'"):
        hs.top_eigenvalues(H, 2, which="BE")
    with pytest.raises(ValueError, match="tol must be >= 0"):
        hs.top_eigenvalues(H, 2, tol=-1.0)
    with pytest.raises(ArgumentTypeError, match="samples must be an integer"):
        hs.hutchinson_trace(H, 10.0)
    with pytest.raises(ArgumentTypeError, match="seed must be an integer"):
        hs.hutchinson_trace(H, 4, seed=0.5)
    with pytest.raises(ValueError, match=f"steps must be an integer <= {H.dim}"):
        hs.lanczos(H.hvp_many, one, H.dim + 1)
    with pytest.raises(ArgumentTypeError, match="probes must be an integer"):
        hs.slq(H, probes=True)
    with pytest.raises(ValueError, match="rel_tol must be a finite number"):
        hs.count_near_zero(torch.ones(3), float("nan"))
    with pytest.raises(ValueError, match="h must be < 0.5"):
        hs.curve_directions(Curve(Bezier(2), *_three_points()[:2], (_three_points()[2],)), [0.5], h=0.5)
    with pytest.raises(ValueError, match="h must be > 0"):
        hs.curve_directions(Curve(Bezier(2), *_three_points()[:2], (_three_points()[2],)), [0.5], h=0.0)


def _three_points():
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(3, 2, generator=g, dtype=torch.float64)} for _ in range(3)]


def test_zero_hessian_is_a_clear_error():
    model, params, x, y = _mlp_case()
    dead = {k: (torch.full_like(v, -1.0) if k.endswith("bias") and k.startswith("layers.0") else v)
            for k, v in params.items()}
    dead["layers.0.weight"] = torch.zeros_like(params["layers.0.weight"])
    dead["head.weight"] = torch.zeros_like(params["head.weight"])  # all ReLUs dead: L depends on head.bias only
    H = hs.loss_hessian(model, dead, x, y, keys=["layers.0.weight"])
    assert float(H.dense().abs().max()) == 0.0
    with pytest.raises(ValueError, match="identically zero"):
        hs.top_eigenvalues(H, 2)


@pytest.mark.gpu
def test_hvp_on_cuda_matches_cpu(case):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    model, params, x, y, H = case
    Hg = hs.loss_hessian(model.to("cuda"), {k: v.cuda() for k, v in params.items()}, x.cuda(), y.cuda())
    try:
        v = torch.linspace(-1, 1, H.dim, dtype=torch.float64)
        torch.testing.assert_close(Hg.hvp(v).cpu(), H.hvp(v), rtol=1e-9, atol=1e-12)
    finally:
        model.to("cpu")


@pytest.mark.slow
def test_target_quick_run(tmp_path):
    from repro.runner import get_target
    from repro.runner.run import RunOptions, run_target

    tgt = get_target("rashomon-hessian")
    opts = RunOptions(size="quick", out=tmp_path / "out", cache_dir=tmp_path / "cache", device="cpu", progress=False)
    summary = run_target(tgt, opts)
    out = tmp_path / "out" / "rashomon-hessian"
    for name in ("spectrum", "hvp_directions", "estimators"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.md").is_file()
    for name in ("spectrum_along_t", "hvp_directions", "density"):
        assert (out / f"{name}.png").is_file()
    assert len(summary["claims"]) == 6
    assert {c["id"] for c in summary["claims"]} == set(tgt.claim_ids)
    # one job per t plus the path and initialisation jobs, cached under <cache>/jobs/<target>/; the curve once
    assert len(list((tmp_path / "cache" / "jobs" / "rashomon-hessian").glob("*.json"))) == 5 + 2
    assert len(list((tmp_path / "cache" / "curves").glob("*.pt"))) == 1
