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
The paper size is the write-up's own setting, CIFAR-10 with a ≈270k-parameter ResNet-20 (the zoo's
nearest model to its PreResNet-20), where the exact spectrum is out of reach (``exact=False``): the
estimators carry it — Lanczos top-k, Hutchinson trace, and SLQ at every t for λ_min (its smallest Ritz
value) and the near-zero / negative counts (headline τ = 1e-2, SLQ's resolution). With BatchNorm the
statistics of every analysed point (the curve's, the segment's, the initialisation) are recomputed on
the training inputs before it is evaluated in eval mode, as the authors' ``update_bn`` does.

Jobs: one per t (Hessian data at φ(t)), one for the segment and test curves over all t, one for the
gradient norm at a random initialisation. The trained curve is shared by the first two kinds: each
job trains it or loads it from ``<cache>/curves/<key>.pt`` (keyed by both endpoints, the curve's
training config and seed, and the library's code version; one process trains it while the others wait).
"""

from __future__ import annotations

import fcntl
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from reference.bn import has_batchnorm, recompute_bn_stats, recompute_bn_stats_batched
from reference.checkpoint import load_checkpoint, save_checkpoint
from reference.curves import Curve, train_curve
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

from ..runner import DataRef, Endpoint, Job, JobContext, Report, Results, seaborn
from ..runner.context import code_version
from ..runner.declare import declare
from ..runner.util import config_hash, jsonable

DIRECTIONS = ("straight", "detour", "tangent", "tangent_fd", "random")
TAUS = (1e-2, 1e-3, 1e-4)
HEADLINE_TAU = 1e-3
SLQ_TAU = 1e-2
ARCHS = ("mlp", "resnet")
EXACT_MAX_DIM = 20_000  # a dense float64 Hessian of 3.2 GB


@dataclass(frozen=True)
class RashomonConfig:
    dataset: str = "digits"
    seed: int = 0
    arch: str = "mlp"  # "mlp" (hidden ``widths``) or "resnet" (the zoo's CIFAR ResNet with BatchNorm)
    widths: tuple[int, ...] = (24, 24)
    resnet_depth: int = 20
    resnet_base: int = 16
    resnet_width: int = 1
    t_grid: int = 9
    density_ts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    top_k: int = 5
    hutchinson_samples: int = 100
    slq_probes: int = 8
    slq_steps: int = 80
    fd_h: float = 1e-3
    exact: bool = True  # the exact spectrum (d HVPs → dense H); False: Lanczos / Hutchinson / SLQ only
    hessian_batch: int | None = None  # examples per chunk of the float64 passes (None: all at once)
    jacobian_examples: int | None = None  # test inputs of the input–output Jacobian (None: all)
    curve_l2: float = 0.0  # the authors' curve regulariser ½·l2·E_t‖φ(t)‖² (train_curve l2_on="curve")
    curve_points_per_step: int = 4  # t values drawn per curve-training step
    train: TrainConfig = TrainConfig.adam(150)
    curve_train: TrainConfig = TrainConfig.adam(150)


SIZES = {
    "quick": RashomonConfig(
        widths=(16,), t_grid=5, density_ts=(0.0, 0.5), hutchinson_samples=30, slq_probes=4, slq_steps=40,
        train=TrainConfig.adam(30),
        curve_train=TrainConfig.adam(20)),
    "cpu": RashomonConfig(),
    # The write-up's setting (sources/002, "Procedure"): CIFAR-10, two separately trained PreResNet20
    # (~270k params) joined by a Bézier curve as in Garipov et al. The zoo has no pre-activation ResNet: its
    # CIFAR ResNet-20 (He et al. §4.2, 16-32-64 channels, BatchNorm, ≈272k parameters) stands in for it.
    # Budgets from the authors' repo (timgaripov/dnn-mode-connectivity README, PreResNet commands; train.py
    # defaults): endpoints SGD momentum 0.9, lr 0.1, weight decay 3e-4, 150 epochs, batch 128; curve: Bézier
    # with num_bends=3 (one free point: our quadratic Bézier), fixed endpoints, SGD lr 0.03, 200 epochs, batch
    # 128, its weight decay 3e-4 as the curve regulariser (curves.l2_regularizer, optimizer weight decay 0),
    # one t per minibatch. Our choices: a cosine schedule instead of the authors' piecewise-linear one (the
    # trainer has no such schedule), no data augmentation; the analysis budgets (9 t, 5 SLQ densities,
    # top-5, 100 Hutchinson probes, 8×80 SLQ) are the cpu size's (the write-up names PyHessian but gives
    # none); the Jacobian on the first 1000 test images and float64 passes in chunks of 128 examples bound
    # the memory. Needs --data-dir with the CIFAR-10 python batches.
    "paper": RashomonConfig(
        dataset="cifar10", arch="resnet", resnet_depth=20, resnet_base=16, resnet_width=1, exact=False,
        hessian_batch=128, jacobian_examples=1000, curve_l2=3e-4, curve_points_per_step=1,
        train=TrainConfig(epochs=150, batch_size=128, lr=0.1, momentum=0.9, weight_decay=3e-4, optimizer="sgd",
                          schedule="cosine"),
        curve_train=TrainConfig(epochs=200, batch_size=128, lr=0.03, momentum=0.9, weight_decay=0.0,
                                optimizer="sgd", schedule="cosine")),
}


class Splits64(NamedTuple):
    """The dataset's splits with float64 inputs (``reference.data.Dataset`` holds float32 only)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class CurveSpec:
    """The quadratic Bézier curve from ``a`` to ``b``: what determines it."""

    model: dict
    a: Endpoint
    b: Endpoint
    train: TrainConfig
    seed: int
    l2: float
    points_per_step: int


# ---------------------------------------------------------------------------------------------
# the curve, trained once and cached by content; float64 data; BatchNorm statistics

# per process: the last curve (float64, on the device) and float64 splits, by content
_CURVE: dict[tuple, Curve] = {}
_D64: dict[tuple, Splits64] = {}


def _curve_key(spec: CurveSpec) -> dict:
    return {"curve": "bezier2", "spec": jsonable(spec), "code": code_version()}


def _trained_curve(spec: CurveSpec, ctx: JobContext) -> Curve:
    """The curve in float32 on the device: loaded from the curve cache, else trained and stored there
    (under a lock, so parallel jobs train it once)."""
    key = _curve_key(spec)
    path = Path(ctx.cache_dir) / "curves" / f"{config_hash(key)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(spec.model).to(ctx.dev)
    start, end = ctx.endpoints([spec.a, spec.b])
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            try:
                ck = load_checkpoint(path, expected_model_config=spec.model)
                if jsonable((ck.extra or {}).get("key")) != jsonable(key):
                    raise ValueError("it was stored under another key")
                free = {k: v.to(ctx.dev) for k, v in ck.params.items()}
                return Curve(Curve.init_linear(start, end).kind, start, end, (free,))
            except (ValueError, OSError) as e:
                ctx.log(f"curve cache {path} unusable ({e}); retraining")
        data = ctx.data(spec.a.data, spec.a.view)
        ctx.log(f"training a quadratic Bézier curve on {spec.a.data.dataset} ({ctx.device})")
        curve = train_curve(model, start, end, data.x_train, data.y_train, cfg=spec.train, kind="bezier", order=2,
                            seed=spec.seed, points_per_step=spec.points_per_step, l2=spec.l2, l2_on="curve",
                            device=ctx.dev, progress=ctx.progress)
        save_checkpoint(path, curve.free[0], model_config=spec.model, train_config=asdict(spec.train),
                        extra={"curve": "bezier2", "key": jsonable(key)})
    return curve


def _curve64(spec: CurveSpec, ctx: JobContext) -> Curve:
    k = (config_hash(_curve_key(spec)), ctx.device)
    if k not in _CURVE:
        _CURVE.clear()
        _CURVE[k] = _trained_curve(spec, ctx).to(ctx.dev, torch.float64)
    return _CURVE[k]


def _data64(ref: DataRef, view, ctx: JobContext) -> Splits64:
    k = (ref.dataset, ref.data_dir, ref.fingerprint, view, ctx.device)
    if k not in _D64:
        data = ctx.data(ref, view)
        _D64.clear()
        _D64[k] = Splits64(data.x_train.double(), data.y_train, data.x_test.double(), data.y_test)
    return _D64[k]


def _bn(model64, point, d64: Splits64, batch: int | None):
    """``point`` with its BatchNorm statistics recomputed on the training inputs (a no-op without BN)."""
    return recompute_bn_stats(model64, point, d64.x_train, batch) if has_batchnorm(model64) else point


def _bn_stacked(model64, stacked, d64: Splits64, batch: int | None):
    return recompute_bn_stats_batched(model64, stacked, d64.x_train, batch) if has_batchnorm(model64) else stacked


def _jacobian(model64, point, x: torch.Tensor, batch: int | None) -> torch.Tensor:
    if batch is None or batch >= len(x):
        return input_jacobian(model64, point, x)
    return torch.cat([input_jacobian(model64, point, x[i:i + batch]) for i in range(0, len(x), batch)])


# ---------------------------------------------------------------------------------------------
# jobs


@dataclass(frozen=True)
class PointArgs:
    """Everything measured at φ(t) (float64)."""

    curve: CurveSpec
    data: DataRef
    view: tuple[int, ...] | None
    t: float
    seed: int
    top_k: int
    hutchinson_samples: int
    slq_probes: int
    slq_steps: int
    fd_h: float
    density: bool  # t is one of the density ts: SLQ density (and, exact, all eigenvalues) kept
    exact: bool
    hessian_batch: int | None
    jacobian_examples: int | None


def point_job(args: PointArgs, ctx: JobContext) -> dict:
    t, seed = args.t, args.seed
    curve64 = _curve64(args.curve, ctx)
    model64 = build_model(args.curve.model).to(ctx.dev, torch.float64)
    data = _data64(args.data, args.view, ctx)
    xj = data.x_test if args.jacobian_examples is None else data.x_test[: args.jacobian_examples]
    jac_ref = _jacobian(model64, _bn(model64, unstack(curve64.points_at([0.0]))[0], data, args.hessian_batch), xj,
                        args.hessian_batch)
    point = _bn(model64, unstack(curve64.points_at([t]))[0], data, args.hessian_batch)
    H = loss_hessian(model64, point, data.x_train, data.y_train, batch_size=args.hessian_batch)
    if args.exact:
        eig = exact_spectrum(H)
        lmax = float(eig.abs().max())
    top, _ = top_eigenvalues(H, args.top_k, seed=seed)
    tr = hutchinson_trace(H, args.hutchinson_samples, seed=seed)
    dirs = curve_directions(curve64, [t], keys=H.keys, h=args.fd_h)
    g = torch.Generator().manual_seed(seed + 7)
    r = torch.randn(1, H.dim, generator=g, dtype=torch.float64)
    dirs["random"] = r / r.norm()
    out: dict = {"t": t, "dim": H.dim, "loss": H.loss(), "grad_norm": float(H.grad().norm()), "exact": args.exact,
                 "density": args.density, "lanczos_top": top.tolist(), "hutchinson": tr.estimate,
                 "hutchinson_se": tr.stderr}
    if args.exact:
        out.update({"exact_top": eig.flip(0)[: args.top_k].tolist(), "exact_trace": float(eig.sum()),
                    "lambda_min": float(eig[0]), "lambda_max_abs": lmax,
                    "near_zero": {f"{tau:g}": count_near_zero(eig, tau) for tau in TAUS},
                    "negative": {f"{tau:g}": int((eig < -tau * lmax).sum()) for tau in TAUS}})
    out["cos_tangent_fd"] = float((dirs["tangent"] * dirs["tangent_fd"]).sum())
    for name in DIRECTIONS:
        n, q = directional_curvature(H, dirs[name].to(H.dtype))
        out[f"hvp_{name}"], out[f"rq_{name}"] = float(n[0]), float(q[0])
    if args.density or not args.exact:
        sd = slq(H, args.slq_probes, args.slq_steps, seed=seed)
        if not args.exact:  # the estimated spectrum: λ_min is SLQ's smallest Ritz value, counts are SLQ's
            lam_min = float(sd.nodes.min())
            lmax = max(abs(float(top[0])), abs(lam_min))
            out.update({"lambda_min": lam_min, "lambda_max_abs": lmax,
                        "near_zero": {f"{tau:g}": sd.count_in(-tau * lmax, tau * lmax) for tau in TAUS},
                        "negative": {f"{tau:g}": sd.count_in(-math.inf, -tau * lmax) for tau in TAUS}})
        out["slq"] = {"nodes": sd.nodes.tolist(), "weights": sd.weights.tolist(),
                      "count": sd.count_in(-SLQ_TAU * lmax, SLQ_TAU * lmax), "trace": sd.trace()}
        if args.exact:
            out["eigenvalues"] = eig.tolist()
    J = _jacobian(model64, point, xj, args.hessian_batch)
    out["jac_norm"] = float(J.flatten(1).norm(dim=1).mean())
    out["jac_change"] = float((J - jac_ref).norm() / jac_ref.norm())
    lam1 = (out["exact_top"] if args.exact else out["lanczos_top"])[0]
    nz = out["near_zero"][f"{HEADLINE_TAU if args.exact else SLQ_TAU:g}"]
    ctx.log(f"  t={t:.3f}: loss {out['loss']:.4f}, |∇L| {out['grad_norm']:.2e}, λ_max {lam1:.3f}, "
            f"trace {out['exact_trace'] if args.exact else out['hutchinson']:.2f}, "
            f"#|λ|≤{HEADLINE_TAU if args.exact else SLQ_TAU:g}λmax {_count(nz)}/{out['dim']}, "
            f"λ_min {out['lambda_min']:.3g}; |Hu| straight {out['hvp_straight']:.3g} detour "
            f"{out['hvp_detour']:.3g} tangent {out['hvp_tangent']:.3g}")
    return out


@dataclass(frozen=True)
class PathArgs:
    """The train loss on the straight segment and the test error on the curve, at every analysed t."""

    curve: CurveSpec
    data: DataRef
    view: tuple[int, ...] | None
    ts: tuple[float, ...]
    hessian_batch: int | None  # chunk of the BatchNorm statistics pass (BN nets only)


def path_job(args: PathArgs, ctx: JobContext) -> dict:
    curve64 = _curve64(args.curve, ctx)
    model64 = build_model(args.curve.model).to(ctx.dev, torch.float64)
    d64 = _data64(args.data, args.view, ctx)
    ts = list(args.ts)
    seg = Curve.init_linear(curve64.start, curve64.end, "bezier", 1)
    on_seg = evaluate_points(model64, _bn_stacked(model64, seg.points_at(ts), d64, args.hessian_batch),
                             d64.x_train, d64.y_train)
    test = evaluate_points(model64, _bn_stacked(model64, curve64.points_at(ts), d64, args.hessian_batch),
                           d64.x_test, d64.y_test)
    return {"t": ts, "segment_loss": on_seg.loss.tolist(), "test_error": test.error.tolist()}


@dataclass(frozen=True)
class InitArgs:
    """‖∇L‖ at a random initialisation (the first endpoint's seed), the scale of "close to 0"."""

    model: dict
    init_seed: int
    data: DataRef
    view: tuple[int, ...] | None
    hessian_batch: int | None


def init_job(args: InitArgs, ctx: JobContext) -> dict:
    model = build_model(args.model)
    model64 = build_model(args.model).to(ctx.dev, torch.float64)
    d64 = _data64(args.data, args.view, ctx)
    init64 = {k: v.to(ctx.dev, torch.float64) for k, v in init_params(model, args.init_seed).items()}
    init64 = _bn(model64, init64, d64, args.hessian_batch)
    g = loss_hessian(model64, init64, d64.x_train, d64.y_train, batch_size=args.hessian_batch).grad().norm().item()
    return {"grad_norm": g}


def _model_config(cfg: RashomonConfig, data) -> tuple[dict, tuple[int, ...] | None]:
    if cfg.arch not in ARCHS:
        raise ValueError(f"rashomon-hessian: arch must be one of {ARCHS}, got {cfg.arch!r}")
    if cfg.arch == "mlp":
        return {"name": "mlp", "in_features": data.in_features, "widths": list(cfg.widths),
                "num_classes": data.num_classes, "bias": True}, None
    shape = tuple(data.input_shape)
    if len(shape) == 3:  # images: a 2-D ResNet on them as they are
        c, dims, view = shape[0], 2, None
    else:  # flat inputs: a 1-D ResNet on (1, L)
        c, dims, view = 1, 1, (1, data.in_features)
    return {"name": "resnet", "in_channels": c, "num_classes": data.num_classes, "depth": cfg.resnet_depth,
            "width": cfg.resnet_width, "norm": "batch", "groups": 2, "dims": dims, "base": cfg.resnet_base}, view


def _ts(cfg: RashomonConfig) -> list[float]:
    ts = torch.linspace(0, 1, cfg.t_grid, dtype=torch.float64)
    return torch.unique(torch.cat([ts, torch.tensor(cfg.density_ts, dtype=torch.float64)])).tolist()


def jobs(cfg: RashomonConfig, data) -> list[Job]:
    mcfg, view = _model_config(cfg, data)
    d = sum(p.numel() for p in build_model(mcfg).parameters())
    if cfg.exact and d > EXACT_MAX_DIM:
        raise ValueError(f"rashomon-hessian: the exact spectrum of d = {d} parameters needs a dense {d}×{d} "
                         f"Hessian ({8 * d * d / 2**30:.0f} GiB in float64); above d = {EXACT_MAX_DIM} set "
                         f"exact=false (Lanczos / Hutchinson / SLQ only)")
    seeds = [cfg.seed * 1000, cfg.seed * 1000 + 1]
    a, b = (Endpoint(mcfg, cfg.train, s, data.ref, view) for s in seeds)
    spec = CurveSpec(mcfg, a, b, cfg.curve_train, cfg.seed, cfg.curve_l2, cfg.curve_points_per_step)
    ts = _ts(cfg)
    out = [Job(point_job, PointArgs(spec, data.ref, view, t, cfg.seed, cfg.top_k, cfg.hutchinson_samples,
                                    cfg.slq_probes, cfg.slq_steps, cfg.fd_h,
                                    any(abs(t - s) < 1e-9 for s in cfg.density_ts), cfg.exact, cfg.hessian_batch,
                                    cfg.jacobian_examples))
           for t in ts]
    out.append(Job(path_job, PathArgs(spec, data.ref, view, tuple(ts), cfg.hessian_batch)))
    out.append(Job(init_job, InitArgs(mcfg, seeds[0], data.ref, view, cfg.hessian_batch)))
    return out


# ---------------------------------------------------------------------------------------------
# report


def _count(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:.0f}"


def _rows(res: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    nan = float("nan")
    spec, hv, est = [], [], []
    for r in res:
        exact = r["exact"]
        top = r["exact_top"] if exact else r["lanczos_top"]
        s = {"t": r["t"], "train_loss": r["loss"], "segment_loss": r["segment_loss"], "test_error": r["test_error"],
             "grad_norm": r["grad_norm"]}
        s.update({f"lambda_{i + 1}": v for i, v in enumerate(top)})
        s.update({"trace": r["exact_trace"] if exact else r["hutchinson"], "lambda_min": r["lambda_min"]})
        s.update({f"near0_{k}": v for k, v in r["near_zero"].items()})
        s.update({f"neg_{k}": v for k, v in r["negative"].items()})
        spec.append(s)
        h = {"t": r["t"], "lambda_max": r["lambda_max_abs"], "cos_tangent_fd": r["cos_tangent_fd"]}
        h.update({f"hvp_{d}": r[f"hvp_{d}"] for d in DIRECTIONS})
        h.update({f"rq_{d}": r[f"rq_{d}"] for d in DIRECTIONS})
        h.update({"jac_norm": r["jac_norm"], "jac_change": r["jac_change"]})
        hv.append(h)
        if exact:
            e = {"t": r["t"], "lanczos_lambda_1": r["lanczos_top"][0], "exact_lambda_1": r["exact_top"][0],
                 "lanczos_max_rel_err": max(abs(a - b) / abs(b) for a, b in zip(r["lanczos_top"], r["exact_top"],
                                                                                strict=True)),
                 "hutchinson": r["hutchinson"], "hutchinson_se": r["hutchinson_se"], "exact_trace": r["exact_trace"],
                 "hutchinson_z": (r["hutchinson"] - r["exact_trace"]) / r["hutchinson_se"]}
        else:
            e = {"t": r["t"], "lanczos_lambda_1": r["lanczos_top"][0], "exact_lambda_1": nan,
                 "lanczos_max_rel_err": nan, "hutchinson": r["hutchinson"], "hutchinson_se": r["hutchinson_se"],
                 "exact_trace": nan, "hutchinson_z": nan}
        if "slq" in r:
            e.update({"slq_trace": r["slq"]["trace"], f"slq_near0_{SLQ_TAU:g}": r["slq"]["count"],
                      f"exact_near0_{SLQ_TAU:g}": r["near_zero"][f"{SLQ_TAU:g}"] if exact else nan})
        est.append(e)
    return spec, hv, est


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else float("nan")


def report(cfg: RashomonConfig, results: Results) -> Report:
    """Exact and stochastic Hessian spectra, directional HVPs and Jacobians along a trained Bézier curve."""
    rep = Report()
    path = results.one(PathArgs)
    init_g = results.one(InitArgs)["grad_norm"]
    res = []
    for i, (_, r) in enumerate(results.of(PointArgs)):
        res.append(dict(r, segment_loss=float(path["segment_loss"][i]), test_error=float(path["test_error"][i])))
    spec_rows, hv_rows, est_rows = _rows(res)
    d = res[0]["dim"]
    model = (f"MLP {list(cfg.widths)}" if cfg.arch == "mlp" else
             f"ResNet-{cfg.resnet_depth} ×{cfg.resnet_width} (base {cfg.resnet_base}, BatchNorm reset at every t)")
    source = "exact" if cfg.exact else "estimated: λᵢ by Lanczos, trace by Hutchinson, λ_min and counts by SLQ"
    rep.table("spectrum", spec_rows,
              title=f"Hessian spectrum ({source}) of the train loss along the Bézier curve ({cfg.dataset} {model}, "
                    f"d = {d} parameters, float64). near0_τ = #|λ| ≤ τ·max|λ|; neg_τ = #λ < −τ·max|λ|; "
                    f"segment_loss = train loss on the straight line at the same t")
    rep.table("hvp_directions", hv_rows,
              title="‖Hu‖ and uᵀHu for unit u: straight line θ₂−θ₁, detour φ(t)−chord(t), tangent φ'(t) "
                    f"(exact) and by central difference h={cfg.fd_h}, a random direction; input–output "
                    "Jacobian on test inputs (mean Frobenius norm, relative change from t=0)")
    rep.table("estimators", est_rows,
              title=f"HVP-only estimators vs the exact spectrum: Lanczos (eigsh) top-{cfg.top_k}, Hutchinson "
                    f"({cfg.hutchinson_samples} Rademacher probes; z = (est − exact)/se), SLQ "
                    f"({cfg.slq_probes} probes × {cfg.slq_steps} steps) count of |λ| ≤ {SLQ_TAU:g}·max|λ|"
                    + ("" if cfg.exact else " (exact spectrum out of reach at this size: exact columns NaN)"))
    for name, fig in _figures(res, spec_rows, hv_rows, cfg):
        rep.figure(name, fig)

    interior = [r for r in res if 0 < r["t"] < 1]
    gmax = max(r["grad_norm"] for r in res)
    rep.verdict("grad-near-zero", f"max ‖∇L‖ {gmax:.3g} vs {init_g:.3g} at init (ratio {gmax / init_g:.3f})",
                gmax <= 0.05 * init_g)
    # at t = ½ a quadratic Bézier's tangent is parallel to the chord (φ'(½) = θ₂ − θ₁): there the two
    # directions coincide, so "smaller" is ≤ (to rounding) against the straight line, < against the detour
    smaller = [r["hvp_tangent"] <= r["hvp_straight"] * (1 + 1e-9) and r["hvp_tangent"] < r["hvp_detour"]
               for r in interior]
    rep.verdict("tangent-hvp-smaller",
                f"{sum(smaller)}/{len(smaller)} interior t; mean ‖Hu‖ tangent / straight / detour = "
                f"{_mean(interior, 'hvp_tangent'):.3g} / {_mean(interior, 'hvp_straight'):.3g} / "
                f"{_mean(interior, 'hvp_detour'):.3g}", all(smaller))
    rel = [r["hvp_tangent"] / r["lambda_max_abs"] for r in res]
    cos_min = min(r["cos_tangent_fd"] for r in res)
    rep.verdict("tangent-hvp-nonzero",
                f"‖H·tangent‖/λ_max from {min(rel):.3g} to {max(rel):.3g}; exact vs finite-difference tangent "
                f"cosine ≥ {cos_min:.8f}", min(rel) > 1e-3)
    ratio_neg = [r["lambda_min"] / r["lambda_max_abs"] for r in res]
    neg = [r["negative"]["0.001"] for r in res]
    rep.verdict("psd", ("" if cfg.exact else "SLQ estimate: ")
                + f"λ_min/λ_max from {min(ratio_neg):.3g} to {max(ratio_neg):.3g}; #λ < −1e-3·λ_max from "
                  f"{_count(min(neg))} to {_count(max(neg))}", min(ratio_neg) >= -1e-3)
    tau = HEADLINE_TAU if cfg.exact else SLQ_TAU
    n0 = [r["near_zero"][f"{tau:g}"] for r in res]
    pre = "" if cfg.exact else f"SLQ estimate at τ = {tau:g}: "
    rep.verdict("dimension-high-below-d",
                pre + f"{_count(min(n0))}…{_count(max(n0))} of d = {d} ({min(n0) / d:.2f}…{max(n0) / d:.2f})",
                min(n0) >= d / 10 and max(n0) < d)
    median = sorted(n0)[len(n0) // 2]
    spread = (max(n0) - min(n0)) / median if median else float("inf")
    counts = str(n0) if cfg.exact else "[" + ", ".join(_count(v) for v in n0) + "]"
    rep.verdict("dimension-constant",
                pre + f"counts {counts}; spread {spread:.1%}"
                + (f"; at τ = 1e-2: {[r['near_zero']['0.01'] for r in res]}" if cfg.exact else ""), spread < 0.10)
    return rep


def _figures(res: list[dict], spec_rows: list[dict], hv_rows: list[dict], cfg: RashomonConfig):
    plt, _, _ = seaborn()
    t = [r["t"] for r in res]
    top = [r["exact_top"] if r["exact"] else r["lanczos_top"] for r in res]
    fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
    ax = axes[0]
    ax.plot(t, [r["train_loss"] for r in spec_rows], "o-", label="Bézier curve")
    ax.plot(t, [r["segment_loss"] for r in spec_rows], "s--", label="straight line")
    ax.set_yscale("log")
    ax.set(title="train loss", xlabel="t")
    ax.legend()
    ax = axes[1]
    for i in range(cfg.top_k):
        if cfg.exact:
            ax.plot(t, [v[i] for v in top], "-", color=f"C{i}", label=f"λ{i + 1} exact")
        ax.plot(t, [r["lanczos_top"][i] for r in res], "x" if cfg.exact else "x-", color=f"C{i}")
    ax.set(title="top eigenvalues (lines exact, × Lanczos)" if cfg.exact else "top eigenvalues (Lanczos)",
           xlabel="t")
    ax = axes[2]
    if cfg.exact:
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
    ax.set(title="near-zero eigenvalues (exact)" if cfg.exact else "near-zero eigenvalues (SLQ)", xlabel="t")
    ax.legend(fontsize=7)
    yield "spectrum_along_t", fig

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
    yield "hvp_directions", fig

    dens = [r for r in res if r["density"] and "slq" in r]
    fig, axes = plt.subplots(1, len(dens), figsize=(4.2 * len(dens), 3.6), squeeze=False)
    for ax, r in zip(axes[0], dens, strict=True):
        sd = SpectralDensity(torch.tensor(r["slq"]["nodes"]), torch.tensor(r["slq"]["weights"]), r["dim"])
        eig = torch.tensor(r["eigenvalues"], dtype=torch.float64) if "eigenvalues" in r else sd.nodes.double()
        lo, hi = float(eig.min()), float(eig.max())
        pad = 0.05 * (hi - lo)
        grid = torch.linspace(lo - pad, hi + pad, 600, dtype=torch.float64)
        sigma = 0.01 * (hi - lo)
        ax.plot(grid, sd.density(grid, sigma) + 1e-8, label="SLQ")
        if "eigenvalues" in r:
            exact = torch.exp(-0.5 * ((grid.unsqueeze(1) - eig) / sigma) ** 2).sum(1) / (
                len(eig) * sigma * math.sqrt(2 * math.pi))
            ax.plot(grid, exact + 1e-8, "--", label="exact (same broadening)")
        ax.set(yscale="log", ylim=(1e-5, None), title=f"spectral density, t = {r['t']:.2f}", xlabel="λ")
        ax.legend(fontsize=7)
    yield "density", fig


TARGET = declare("rashomon-hessian", __file__, config=RashomonConfig, sizes=SIZES, jobs=jobs, report=report,
                 datasets=("digits", "mnist1d", "mnist", "cifar10"),
                 claim_ids=("grad-near-zero", "tangent-hvp-smaller", "tangent-hvp-nonzero", "psd",
                            "dimension-high-below-d", "dimension-constant"))
