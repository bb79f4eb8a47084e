"""The Rashomon-manifold write-up (``../shared/sources/002_a41c0cccf3509dc0.txt``, SERI MATS 2022 sprint).

The write-up joins two trained models by a quadratic Bézier curve (Garipov et al. 2018) and collects
local data along it: the gradient of the loss ("close to 0 norm"), the input–output Jacobian, and the
norms of Hessian–vector products in three directions (the straight line θ₂ − θ₁, the detour away from
it, and the curve's tangent by (φ(t + 0.001) − φ(t − 0.001))); its future work asks for PyHessian's top
eigenvalues, trace and eigenvalue density, and the number of (near-)zero eigenvalues as the local
dimension of the Rashomon manifold L⁻¹(c_min), "to determine if the number of dimensions on the ridge
remains constant". Its theory: at a point of the manifold ∇L = 0 and H is positive semi-definite.

``rashomon-hessian`` does all of it on a net small enough for the **exact** spectrum: an MLP
64-24-24-10 (2,410 parameters, no BatchNorm, so every coordinate is a parameter and the loss is a
fixed function of them) on scikit-learn digits; two endpoints trained from different seeds, a
quadratic Bézier curve trained on E_{t~U(0,1)} L(φ(t)). At every t of a grid (analysis in float64,
on the full training set, mean cross-entropy without weight decay):
- exact spectrum (d HVPs → dense H → ``eigvalsh``): top-5, trace, most negative eigenvalue, and the
  number of near-zero eigenvalues |λ| ≤ τ·λ_max for τ = 1e-2, 1e-3, 1e-4 (τ = 1e-3 is the headline);
- the same from HVPs only: Lanczos top-5 (``eigsh``), Hutchinson trace (100 Rademacher probes), and
  at a few t the SLQ density (8 probes × 80 steps), whose mass in |λ| ≤ 1e-2·λ_max is compared with
  the exact count (finer windows are below SLQ's resolution at 80 steps, and the table says so);
- ‖Hu‖ and uᵀHu for unit u = straight, detour, tangent (exact Bézier derivative) and tangent by
  central difference h = 1e-3, plus a random direction as a baseline;
- ‖∇L‖, and the input–output Jacobian ∂f/∂x on the test inputs (mean Frobenius norm, and its
  relative change from t = 0).
The GPU-size version is the write-up's own setting: PreResNet-20 on CIFAR-10 (≈270k parameters),
where the exact spectrum is out of reach and the estimators (Lanczos, Hutchinson, SLQ) carry it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from reference.checkpoint import load_checkpoint, save_checkpoint
from reference.curves import Curve, train_curve
from reference.data import load_dataset
from reference.evaluate import evaluate_points
from reference.hessian import (
    SpectralDensity,
    count_near_zero,
    curve_directions,
    directional_curvature,
    exact_spectrum,
    hutchinson_trace,
    input_jacobian,
    loss_hessian,
    slq,
    top_eigenvalues,
)
from reference.models import build_model, init_params
from reference.params import unstack
from reference.train import TrainConfig

from .common import RunContext, config_hash
from .endpoints import trained_endpoints
from .registry import target

DIRECTIONS = ("straight", "detour", "tangent", "tangent_fd", "random")
TAUS = (1e-2, 1e-3, 1e-4)
HEADLINE_TAU = 1e-3
SLQ_TAU = 1e-2


@dataclass(frozen=True)
class RashomonConfig:
    dataset: str = "digits"
    widths: tuple[int, ...] = (24, 24)
    t_grid: int = 9
    density_ts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    top_k: int = 5
    hutchinson_samples: int = 100
    slq_probes: int = 8
    slq_steps: int = 80
    fd_h: float = 1e-3
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=150, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))
    curve_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=150, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))

    @classmethod
    def quick(cls) -> RashomonConfig:
        return cls(widths=(16,), t_grid=5, density_ts=(0.0, 0.5), hutchinson_samples=30, slq_probes=4, slq_steps=40,
                   train=TrainConfig(epochs=30, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"),
                   curve_train=TrainConfig(epochs=20, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))


class Splits64(NamedTuple):
    """The dataset's splits with float64 inputs (``reference.data.Dataset`` holds float32 only)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _trained_curve(ctx: RunContext, model, mcfg: dict, start, end, data, cfg: RashomonConfig, key: dict) -> Curve:
    """The quadratic Bézier curve, trained once and cached (its control point) under the cache dir."""
    path = ctx.cache_dir / "curves" / f"{config_hash(key)}.pt"
    if path.is_file():
        try:
            free = load_checkpoint(path, expected_model_config=mcfg).params
            return Curve(Curve.init_linear(start, end).kind, start, end, (free,))
        except ValueError as e:
            ctx.log(f"curve cache {path.name} unusable ({e}); retraining")
    ctx.log(f"training a quadratic Bézier curve on {cfg.dataset} ({ctx.device})")
    curve = train_curve(model, start, end, data.x_train, data.y_train, cfg=cfg.curve_train, kind="bezier", order=2,
                        seed=ctx.seed, device=ctx.device, progress=ctx.progress)
    save_checkpoint(path, curve.free[0], model_config=mcfg, train_config=asdict(cfg.curve_train),
                    extra={"curve": "bezier2"})
    return curve


def _point_job(model, curve: Curve, t: float, data, cfg: RashomonConfig, seed: int, jac_ref) -> dict:
    """Everything measured at φ(t) (float64)."""
    point = unstack(curve.points_at([t]))[0]
    H = loss_hessian(model, point, data.x_train, data.y_train)
    eig = exact_spectrum(H)
    lmax = float(eig.abs().max())
    top, _ = top_eigenvalues(H, cfg.top_k, seed=seed)
    tr = hutchinson_trace(H, cfg.hutchinson_samples, seed=seed)
    dirs = curve_directions(curve, [t], keys=H.keys, h=cfg.fd_h)
    g = torch.Generator().manual_seed(seed + 7)
    r = torch.randn(1, H.dim, generator=g, dtype=torch.float64)
    dirs["random"] = r / r.norm()
    out: dict = {"t": t, "dim": H.dim, "loss": H.loss(), "grad_norm": float(H.grad().norm()),
                 "exact_top": eig.flip(0)[: cfg.top_k].tolist(), "lanczos_top": top.tolist(),
                 "exact_trace": float(eig.sum()), "hutchinson": tr.estimate, "hutchinson_se": tr.stderr,
                 "lambda_min": float(eig[0]), "lambda_max_abs": lmax,
                 "near_zero": {f"{tau:g}": count_near_zero(eig, tau) for tau in TAUS},
                 "negative": {f"{tau:g}": int((eig < -tau * lmax).sum()) for tau in TAUS},
                 "cos_tangent_fd": float((dirs["tangent"] * dirs["tangent_fd"]).sum())}
    for name in DIRECTIONS:
        n, q = directional_curvature(H, dirs[name].to(H.dtype))
        out[f"hvp_{name}"], out[f"rq_{name}"] = float(n[0]), float(q[0])
    if any(abs(t - s) < 1e-9 for s in cfg.density_ts):
        sd = slq(H, cfg.slq_probes, cfg.slq_steps, seed=seed)
        out["slq"] = {"nodes": sd.nodes.tolist(), "weights": sd.weights.tolist(),
                      "count": sd.count_in(-SLQ_TAU * lmax, SLQ_TAU * lmax), "trace": sd.trace()}
        out["eigenvalues"] = eig.tolist()
    J = input_jacobian(model, point, data.x_test)
    out["jac_norm"] = float(J.flatten(1).norm(dim=1).mean())
    out["jac_change"] = float((J - jac_ref).norm() / jac_ref.norm())
    return out


def _rows(res: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    spec, hv, est = [], [], []
    for r in res:
        s = {"t": r["t"], "train_loss": r["loss"], "segment_loss": r["segment_loss"], "test_error": r["test_error"],
             "grad_norm": r["grad_norm"]}
        s.update({f"lambda_{i + 1}": v for i, v in enumerate(r["exact_top"])})
        s.update({"trace": r["exact_trace"], "lambda_min": r["lambda_min"]})
        s.update({f"near0_{k}": v for k, v in r["near_zero"].items()})
        s.update({f"neg_{k}": v for k, v in r["negative"].items()})
        spec.append(s)
        h = {"t": r["t"], "lambda_max": r["lambda_max_abs"], "cos_tangent_fd": r["cos_tangent_fd"]}
        h.update({f"hvp_{d}": r[f"hvp_{d}"] for d in DIRECTIONS})
        h.update({f"rq_{d}": r[f"rq_{d}"] for d in DIRECTIONS})
        h.update({"jac_norm": r["jac_norm"], "jac_change": r["jac_change"]})
        hv.append(h)
        e = {"t": r["t"], "lanczos_lambda_1": r["lanczos_top"][0], "exact_lambda_1": r["exact_top"][0],
             "lanczos_max_rel_err": max(abs(a - b) / abs(b) for a, b in zip(r["lanczos_top"], r["exact_top"],
                                                                            strict=True)),
             "hutchinson": r["hutchinson"], "hutchinson_se": r["hutchinson_se"], "exact_trace": r["exact_trace"],
             "hutchinson_z": (r["hutchinson"] - r["exact_trace"]) / r["hutchinson_se"]}
        if "slq" in r:
            e.update({"slq_trace": r["slq"]["trace"], f"slq_near0_{SLQ_TAU:g}": r["slq"]["count"],
                      f"exact_near0_{SLQ_TAU:g}": r["near_zero"][f"{SLQ_TAU:g}"]})
        est.append(e)
    return spec, hv, est


@target(
    "rashomon-hessian",
    paper="The Rashomon manifold and its Hessian along a Bézier curve (SERI MATS 2022 sprint write-up)",
    arxiv="1802.10026",
    claims=(
        "the gradient of the loss is close to 0 along the connecting curve",
        "the HVP in the curve's tangent direction is smaller than in the straight-line and detour directions",
        "the HVP in the tangent direction is not zero",
        "the Hessian is positive semi-definite on the low-loss curve",
        "the number of near-zero eigenvalues (local dimension of the ridge) is high but below d",
        "the number of near-zero eigenvalues stays constant along the ridge",
    ),
)
def run(ctx: RunContext) -> None:
    """Exact and stochastic Hessian spectra, directional HVPs and Jacobians along a trained Bézier curve."""
    cfg = RashomonConfig.quick() if ctx.quick else RashomonConfig()
    ctx.config = asdict(cfg)
    data = load_dataset(cfg.dataset, data_dir=ctx.data_dir).to(ctx.device)
    if len(data.input_shape) != 1:
        raise ValueError(f"rashomon-hessian uses an MLP on flat inputs; dataset {cfg.dataset!r} has "
                         f"input shape {data.input_shape}")
    mcfg = {"name": "mlp", "in_features": int(data.input_shape[0]), "widths": list(cfg.widths),
            "num_classes": data.num_classes, "bias": True}
    model = build_model(mcfg).to(ctx.device)
    seeds = [ctx.seed * 1000, ctx.seed * 1000 + 1]
    start, end = [{k: v.to(ctx.device) for k, v in p.items()}
                  for p in trained_endpoints(ctx, mcfg, data, {"dataset": cfg.dataset}, cfg.train, seeds)]
    ckey = {"model": mcfg, "train": asdict(cfg.train), "curve": asdict(cfg.curve_train), "seeds": seeds,
            "dataset": cfg.dataset, "seed": ctx.seed}
    curve = _trained_curve(ctx, model, mcfg, start, end, data, cfg, ckey)

    # float64 analysis
    curve64 = curve.to(ctx.device, torch.float64)
    model64 = build_model(mcfg).to(ctx.device, torch.float64)
    d64 = Splits64(data.x_train.double(), data.y_train, data.x_test.double(), data.y_test)
    ts = torch.linspace(0, 1, cfg.t_grid, dtype=torch.float64)
    ts = torch.unique(torch.cat([ts, torch.tensor(cfg.density_ts, dtype=torch.float64)])).tolist()
    seg = Curve.init_linear(curve64.start, curve64.end, "bezier", 1)
    on_seg = evaluate_points(model64, seg.points_at(ts), d64.x_train, d64.y_train)
    test = evaluate_points(model64, curve64.points_at(ts), d64.x_test, d64.y_test)
    init64 = {k: v.to(ctx.device, torch.float64) for k, v in init_params(model, seeds[0]).items()}
    init_g = loss_hessian(model64, init64, d64.x_train, d64.y_train).grad().norm().item()
    jac_ref = input_jacobian(model64, unstack(curve64.points_at([0.0]))[0], d64.x_test)
    res = []
    for i, t in enumerate(ts):
        key = {"target": "rashomon-hessian", "t": round(t, 9), "cfg": asdict(cfg), "model": mcfg, "ckey": ckey}
        r = ctx.job(key, lambda t=t: _point_job(model64, curve64, t, d64, cfg, ctx.seed, jac_ref))
        r = dict(r, segment_loss=float(on_seg.loss[i]), test_error=float(test.error[i]))
        ctx.log(f"  t={t:.3f}: loss {r['loss']:.4f} (segment {r['segment_loss']:.4f}), |∇L| {r['grad_norm']:.2e}, "
                f"λ_max {r['exact_top'][0]:.3f}, trace {r['exact_trace']:.2f}, "
                f"#|λ|≤1e-3λmax {r['near_zero']['0.001']}/{r['dim']}, λ_min {r['lambda_min']:.3g}; "
                f"|Hu| straight {r['hvp_straight']:.3g} detour {r['hvp_detour']:.3g} tangent {r['hvp_tangent']:.3g}")
        res.append(r)
    spec_rows, hv_rows, est_rows = _rows(res)
    d = res[0]["dim"]
    ctx.write_table("spectrum", spec_rows,
                    title=f"Exact Hessian spectrum of the train loss along the Bézier curve ({cfg.dataset} MLP "
                          f"{mcfg['widths']}, d = {d} parameters, float64). near0_τ = #|λ| ≤ τ·max|λ|; "
                          f"neg_τ = #λ < −τ·max|λ|; segment_loss = train loss on the straight line at the same t")
    ctx.write_table("hvp_directions", hv_rows,
                    title="‖Hu‖ and uᵀHu for unit u: straight line θ₂−θ₁, detour φ(t)−chord(t), tangent φ'(t) "
                          f"(exact) and by central difference h={cfg.fd_h}, a random direction; input–output "
                          "Jacobian on test inputs (mean Frobenius norm, relative change from t=0)")
    ctx.write_table("estimators", est_rows,
                    title=f"HVP-only estimators vs the exact spectrum: Lanczos (eigsh) top-{cfg.top_k}, Hutchinson "
                          f"({cfg.hutchinson_samples} Rademacher probes; z = (est − exact)/se), SLQ "
                          f"({cfg.slq_probes} probes × {cfg.slq_steps} steps) count of |λ| ≤ {SLQ_TAU:g}·max|λ|")
    _figures(ctx, res, spec_rows, hv_rows, cfg)

    interior = [r for r in res if 0 < r["t"] < 1]
    gmax = max(r["grad_norm"] for r in res)
    ctx.claim("grad-near-zero", "max_t ‖∇L(φ(t))‖ ≤ 5% of ‖∇L‖ at a random initialisation",
              "‖∇_θ L‖ along the curve 'as expected was close to 0 norm'",
              f"max ‖∇L‖ {gmax:.3g} vs {init_g:.3g} at init (ratio {gmax / init_g:.3f})", gmax <= 0.05 * init_g)
    # at t = ½ a quadratic Bézier's tangent is parallel to the chord (φ'(½) = θ₂ − θ₁): there the two
    # directions coincide, so "smaller" is ≤ (to rounding) against the straight line, < against the detour
    smaller = [r["hvp_tangent"] <= r["hvp_straight"] * (1 + 1e-9) and r["hvp_tangent"] < r["hvp_detour"]
               for r in interior]
    ctx.claim("tangent-hvp-smaller", "‖H·tangent‖ ≤ ‖H·straight‖ and < ‖H·detour‖ at every interior t "
                                     "(at t = ½ the Bézier tangent is θ₂ − θ₁ itself)",
              "'The Hessian vector product on the tangent direction to the constant loss curve was smaller'",
              f"{sum(smaller)}/{len(smaller)} interior t; mean ‖Hu‖ tangent / straight / detour = "
              f"{_mean(interior, 'hvp_tangent'):.3g} / {_mean(interior, 'hvp_straight'):.3g} / "
              f"{_mean(interior, 'hvp_detour'):.3g}", all(smaller))
    rel = [r["hvp_tangent"] / r["lambda_max_abs"] for r in res]
    cos_min = min(r["cos_tangent_fd"] for r in res)
    ctx.claim("tangent-hvp-nonzero", "‖H·tangent‖ / λ_max > 1e-3 at every t (exact tangent, float64: not noise)",
              "'smaller, but not zero like we expected and this may be due to noise'",
              f"‖H·tangent‖/λ_max from {min(rel):.3g} to {max(rel):.3g}; exact vs finite-difference tangent "
              f"cosine ≥ {cos_min:.8f}", min(rel) > 1e-3)
    ratio_neg = [r["lambda_min"] / r["lambda_max_abs"] for r in res]
    ctx.claim("psd", "λ_min ≥ −1e-3·λ_max at every t (no significantly negative eigenvalue)",
              "'the Hessian matrix is positive-semidefinite at every local minimizer' (theory section)",
              f"λ_min/λ_max from {min(ratio_neg):.3g} to {max(ratio_neg):.3g}; #λ < −1e-3·λ_max from "
              f"{min(r['negative']['0.001'] for r in res)} to {max(r['negative']['0.001'] for r in res)}",
              min(ratio_neg) >= -1e-3)
    n0 = [r["near_zero"][f"{HEADLINE_TAU:g}"] for r in res]
    ctx.claim("dimension-high-below-d", f"d/10 ≤ #|λ| ≤ {HEADLINE_TAU:g}·λ_max < d at every t",
              "the ridge's dimension is 'smaller than the dimension d of the whole weight space, but still quite "
              "high-dimensional'", f"{min(n0)}…{max(n0)} of d = {d} ({min(n0) / d:.2f}…{max(n0) / d:.2f})",
              min(n0) >= d / 10 and max(n0) < d)
    spread = (max(n0) - min(n0)) / (sorted(n0)[len(n0) // 2])
    ctx.claim("dimension-constant", f"(max − min)/median of #|λ| ≤ {HEADLINE_TAU:g}·λ_max along t < 10%",
              "open question: 'determine if the number of dimensions on the ridge remains constant'",
              f"counts {n0}; spread {spread:.1%}; at τ = 1e-2: "
              f"{[r['near_zero']['0.01'] for r in res]}", spread < 0.10)


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else float("nan")


def _figures(ctx: RunContext, res: list[dict], spec_rows: list[dict], hv_rows: list[dict], cfg: RashomonConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    t = [r["t"] for r in res]
    fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
    ax = axes[0]
    ax.plot(t, [r["train_loss"] for r in spec_rows], "o-", label="Bézier curve")
    ax.plot(t, [r["segment_loss"] for r in spec_rows], "s--", label="straight line")
    ax.set_yscale("log")
    ax.set(title="train loss", xlabel="t")
    ax.legend()
    ax = axes[1]
    for i in range(cfg.top_k):
        ax.plot(t, [r["exact_top"][i] for r in res], "-", color=f"C{i}", label=f"λ{i + 1} exact")
        ax.plot(t, [r["lanczos_top"][i] for r in res], "x", color=f"C{i}")
    ax.set(title="top eigenvalues (lines exact, × Lanczos)", xlabel="t")
    ax = axes[2]
    ax.plot(t, [r["exact_trace"] for r in res], "o-", label="exact")
    ax.errorbar(t, [r["hutchinson"] for r in res], yerr=[2 * r["hutchinson_se"] for r in res], fmt="x",
                capsize=3, label="Hutchinson ± 2 se")
    ax.set(title="trace of H", xlabel="t")
    ax.legend()
    ax = axes[3]
    d = res[0]["dim"]
    for tau in TAUS:
        ax.plot(t, [r["near_zero"][f"{tau:g}"] for r in res], "o-", label=f"|λ| ≤ {tau:g}·λ_max")
    ax.plot(t, [r["negative"][f"{HEADLINE_TAU:g}"] for r in res], "v:", label=f"λ < −{HEADLINE_TAU:g}·λ_max")
    ax.axhline(d, color="k", lw=0.8, ls="--", label=f"d = {d}")
    ax.set(title="near-zero eigenvalues (exact)", xlabel="t")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "spectrum_along_t")

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, style in zip(DIRECTIONS, ("o-", "s-", "^-", "x--", ":"), strict=True):
        axes[0].plot(t, [r[f"hvp_{name}"] for r in hv_rows], style, label=name)
        axes[1].plot(t, [abs(r[f"rq_{name}"]) for r in hv_rows], style, label=name)
    axes[0].set(title="‖H u‖ (unit u)", xlabel="t", yscale="log")
    axes[1].set(title="|uᵀ H u|", xlabel="t", yscale="log")
    axes[0].legend(fontsize=8)
    axes[2].plot(t, [r["grad_norm"] for r in spec_rows], "o-", label="‖∇L‖")
    axes[2].plot(t, [r["jac_norm"] for r in hv_rows], "s-", label="mean ‖∂f/∂x‖_F")
    axes[2].plot(t, [r["jac_change"] for r in hv_rows], "^-", label="‖J(t) − J(0)‖ / ‖J(0)‖")
    axes[2].set(title="gradient and input–output Jacobian", xlabel="t", yscale="log")
    axes[2].legend(fontsize=8)
    ctx.save_figure(fig, "hvp_directions")

    dens = [r for r in res if "slq" in r]
    fig, axes = plt.subplots(1, len(dens), figsize=(4.2 * len(dens), 3.6), squeeze=False)
    for ax, r in zip(axes[0], dens, strict=True):
        eig = torch.tensor(r["eigenvalues"], dtype=torch.float64)
        sd = SpectralDensity(torch.tensor(r["slq"]["nodes"]), torch.tensor(r["slq"]["weights"]), r["dim"])
        lo, hi = float(eig.min()), float(eig.max())
        pad = 0.05 * (hi - lo)
        grid = torch.linspace(lo - pad, hi + pad, 600, dtype=torch.float64)
        sigma = 0.01 * (hi - lo)
        ax.plot(grid, sd.density(grid, sigma) + 1e-8, label="SLQ")
        exact = torch.exp(-0.5 * ((grid.unsqueeze(1) - eig) / sigma) ** 2).sum(1) / (
            len(eig) * sigma * math.sqrt(2 * math.pi))
        ax.plot(grid, exact + 1e-8, "--", label="exact (same broadening)")
        ax.set(yscale="log", ylim=(1e-5, None), title=f"spectral density, t = {r['t']:.2f}", xlabel="λ")
        ax.legend(fontsize=7)
    ctx.save_figure(fig, "density")
