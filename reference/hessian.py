"""The Hessian of the training loss with respect to the parameters, without forming it.

L(θ) = (1/N) Σₙ CE(f(θ, xₙ), yₙ) over the model's trainable floating parameters (``model.named_parameters()``),
flattened in the ``Params`` key order (``reference.params.flatten``). Buffers (BatchNorm running statistics)
are constants, and the loss is evaluated in **eval mode** (BatchNorm normalises with the stored statistics,
dropout is off), so L is a deterministic function of θ and its Hessian H = ∇²L(θ) is well defined.

- **HVP** (Pearlmutter 1994), forward-over-reverse: Hv = ∂/∂ε ∇L(θ + εv)|₀ = ``jvp(grad(L), θ, v)``
  (``torch.func``; the pattern of ``torch.func.hvp``). Two references: double backward,
  ∇(∇L(θ)·v) with ``torch.autograd.grad`` twice, and reverse-over-reverse ``vjp(grad(L), θ)(v)``
  (``bench/bench_hvp.py`` times all three). Data are processed in chunks of ``batch_size`` and the
  per-chunk HVPs summed (H is linear in the per-sample losses). ``hvp_many`` vmaps over k vectors.
  ``LossHessian`` computes its HVPs in one of two equal ways, ``hvp_mode``: ``"forward-over-reverse"``
  (``hvp_many``: ``vmap`` of the jvp) or ``"double-backward"`` (``hvp_many``: ∇L's graph built once per data
  chunk, then one backward pass per vector); ``"auto"`` takes double backward on the CPU, where
  ``bench/bench_hvp.py`` (2 threads; digits MLP, MLP 784-256-256, CNN1D) measured it 1.2–3.9× as fast for 16
  HVPs at once (what Hutchinson, SLQ and the curve directions use) and 0.9–2.7× for one, and
  forward-over-reverse on CUDA (not yet measured on a GPU: the previous default is kept).
- **Top eigenvalues**: implicitly restarted Lanczos, ``scipy.sparse.linalg.eigsh`` on a
  ``LinearOperator`` whose ``matvec``/``matmat`` are HVPs (Lehoucq et al., ARPACK).
- **Trace** by Hutchinson (1990): tr H = E[zᵀHz] for Rademacher z; the estimate is the mean of S
  draws, with its standard error.
- **Spectral density** by stochastic Lanczos quadrature (Golub & Meurant; Lin, Saad & Yang 2016;
  Ghorbani, Krishnan & Xiao 2019; PyHessian, Yao et al. 2020): for a unit random probe v, m Lanczos
  steps give a tridiagonal T = U diag(λ̃) Uᵀ, and vᵀ g(H) v ≈ Σᵢ τᵢ g(λ̃ᵢ) with τᵢ = U₁ᵢ². Averaged
  over probes, the nodes λ̃ and weights τ estimate the spectral measure (1/d) Σⱼ δ(λ − λⱼ): the count
  of eigenvalues in an interval I is ≈ d · mean_probes Σᵢ τᵢ 1[λ̃ᵢ ∈ I], and a smooth density is the
  Gaussian-broadened sum. Full reorthogonalisation (all probes advanced together, one ``hvp_many``).
- **Exact spectrum** for small nets: H formed column by column from d HVPs (``dense``), symmetrised
  ½(H + Hᵀ) and ``torch.linalg.eigvalsh``: the cross-check of the estimators.
- **Curve directions** (the Rashomon-manifold write-up, ``shared/sources/002``): at φ(t) of a curve from
  θ₁ to θ₂, the straight-line direction θ₂ − θ₁, the detour φ(t) − ((1 − t)θ₁ + tθ₂), and the
  tangent φ'(t), exactly (``Curve.tangents_at``) and by the central difference
  (φ(t + h) − φ(t − h)) / 2h; all normalised. ``directional_curvature`` gives ‖Hu‖ and uᵀHu.
- **Input–output Jacobian** ∂f(θ, x)/∂x per input (``vmap(jacrev)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from . import validate
from .curves import Curve
from .params import Params, check_compatible, flatten, float_keys
from .train import module_mode

__all__ = [
    "HVP_MODES",
    "LossHessian",
    "SpectralDensity",
    "TraceEstimate",
    "count_near_zero",
    "curve_directions",
    "directional_curvature",
    "exact_spectrum",
    "hutchinson_trace",
    "hvp",
    "hvp_double_backward",
    "hvp_reverse_over_reverse",
    "input_jacobian",
    "lanczos",
    "loss_hessian",
    "slq",
    "top_eigenvalues",
]

ScalarFn = Callable[[Tensor], Tensor]
HVP_MODES = ("auto", "forward-over-reverse", "double-backward")


# ---------------------------------------------------------------------------------------------
# HVPs of a scalar function of one flat vector


def _check_vec(theta: Tensor, v: Tensor) -> None:
    if theta.ndim != 1:
        raise ValueError(f"theta must be a flat vector, got shape {tuple(theta.shape)}")
    if v.shape != theta.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}, theta {tuple(theta.shape)}: they must match")


def hvp(f: ScalarFn, theta: Tensor, v: Tensor) -> Tensor:
    """H(θ)v by forward-over-reverse (Pearlmutter 1994): the directional derivative of ∇f along v,
    ``torch.func.jvp(torch.func.grad(f), (θ,), (v,))``. One forward-mode pass over the backward graph."""
    _check_vec(theta, v)
    return jvp(grad(f), (theta,), (v,))[1]


def hvp_reverse_over_reverse(f: ScalarFn, theta: Tensor, v: Tensor) -> Tensor:
    """H(θ)v as the vector–Jacobian product of ∇f: ``vjp(grad(f), θ)[1](v)`` (H symmetric)."""
    _check_vec(theta, v)
    _, pull = vjp(grad(f), theta)
    return pull(v)[0]


def hvp_double_backward(f: ScalarFn, theta: Tensor, v: Tensor) -> Tensor:
    """H(θ)v by double backward: ∇_θ(∇f(θ) · v) with ``torch.autograd.grad`` twice (the classic
    reference; PyHessian's ``hessian_vector_product``)."""
    _check_vec(theta, v)
    th = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(th), th, create_graph=True)
        (hv,) = torch.autograd.grad(g, th, grad_outputs=v.detach())
    return hv


# ---------------------------------------------------------------------------------------------
# the Hessian of a model's training loss


@dataclass(frozen=True, eq=False)
class LossHessian:
    """H = ∇²L(θ) of L(θ) = (1/N) Σₙ CE(f(θ, xₙ), yₙ) at one point, as HVPs (build with ``loss_hessian``).

    ``keys``: the differentiated entries, in flattening order; every other entry of ``params`` is a
    constant. ``theta``: the flat point (a detached copy). The model is run in eval mode.
    """

    model: nn.Module
    params: Params
    x: Tensor
    y: Tensor
    keys: tuple[str, ...]
    theta: Tensor
    batch_size: int
    label_smoothing: float = 0.0
    hvp_mode: str = "auto"

    def __post_init__(self) -> None:
        validate.choice("hvp_mode", self.hvp_mode, HVP_MODES)

    @property
    def mode(self) -> str:
        """The HVP mode in use: ``hvp_mode``, with ``"auto"`` resolved by the device (module docstring)."""
        if self.hvp_mode != "auto":
            return self.hvp_mode
        return "double-backward" if self.theta.device.type == "cpu" else "forward-over-reverse"

    @property
    def dim(self) -> int:
        return self.theta.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    def _batches(self) -> list[tuple[Tensor, Tensor]]:
        n, b = self.x.shape[0], self.batch_size
        return [(self.x[i : i + b], self.y[i : i + b]) for i in range(0, n, b)]

    def unflat(self, flat: Tensor) -> Params:
        """The full ``Params`` with the ``keys`` entries read from ``flat`` (views: differentiable)."""
        p = {k: v for k, v in self.params.items() if k not in self.keys}
        i = 0
        for k in self.keys:
            m = self.params[k].numel()
            p[k] = flat[i : i + m].view(self.params[k].shape)
            i += m
        return p

    def chunk_loss(self, xb: Tensor, yb: Tensor) -> ScalarFn:
        """θ ↦ (1/N) Σ_{n ∈ chunk} CE(f(θ, xₙ), yₙ): the chunk's share of L (the shares sum to L)."""
        n = self.x.shape[0]

        def f(flat: Tensor) -> Tensor:
            logits = functional_call(self.model, self.unflat(flat), (xb,))
            return F.cross_entropy(logits, yb, reduction="sum", label_smoothing=self.label_smoothing) / n

        return f

    def loss_fn(self) -> ScalarFn:
        """θ ↦ L(θ) over all data (one function; for benchmarks and finite differences)."""
        fs = [self.chunk_loss(xb, yb) for xb, yb in self._batches()]
        return lambda flat: sum(f(flat) for f in fs)

    def _sum_chunks(self, op: Callable[[ScalarFn], Tensor]) -> Tensor:
        with module_mode(self.model, False):
            out = None
            for xb, yb in self._batches():
                r = op(self.chunk_loss(xb, yb))
                out = r if out is None else out + r
        return out.detach()

    def loss(self, theta: Tensor | None = None) -> float:
        th = self.theta if theta is None else theta
        with torch.no_grad():
            return float(self._sum_chunks(lambda f: f(th)))

    def grad(self, theta: Tensor | None = None) -> Tensor:
        """∇L(θ) (flat)."""
        th = self.theta if theta is None else theta
        return self._sum_chunks(lambda f: grad(f)(th))

    def hvp(self, v: Tensor) -> Tensor:
        """Hv, summed over data chunks (``mode``: forward-over-reverse or double backward)."""
        v = self._as_vec(v, "v")
        one = hvp_double_backward if self.mode == "double-backward" else hvp
        return self._sum_chunks(lambda f: one(f, self.theta, v))

    def hvp_many(self, vs: Tensor, chunk: int | None = None) -> Tensor:
        """H V for V = ``vs`` [k, d] (one HVP per row), vmapped over ``chunk`` rows at a time."""
        if vs.ndim != 2 or vs.shape[1] != self.dim:
            raise ValueError(f"vs must be [k, {self.dim}], got {tuple(vs.shape)}")
        vs = vs.to(device=self.theta.device, dtype=self.dtype)
        c = vs.shape[0] if chunk is None else validate.integer("chunk", chunk)
        if c < 1:
            raise ValueError(f"vs must hold at least one row, got shape {tuple(vs.shape)}")
        th = self.theta

        def many(f: ScalarFn, block: Tensor) -> Tensor:
            if self.mode == "double-backward":
                t = th.detach().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(f(t), t, create_graph=True)
                    # the gradient's graph once, then one backward pass per vector (``is_grads_batched`` vmaps
                    # the backward instead, but lacks batching rules for some models' ops)
                    return torch.stack([torch.autograd.grad(g, t, grad_outputs=u, retain_graph=True)[0]
                                        for u in block])
            return vmap(lambda u: jvp(grad(f), (th,), (u,))[1])(block)

        return torch.cat([self._sum_chunks(lambda f, b=vs[i : i + c]: many(f, b)) for i in range(0, vs.shape[0], c)])

    def dense(self, chunk: int = 256) -> Tensor:
        """The d × d Hessian, column j = H eⱼ (d HVPs, ``chunk`` per vmapped call). Small nets only."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.theta.device)
        return self.hvp_many(eye, chunk=chunk)

    def linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64) whose products are HVPs."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
            return self.hvp(t).double().cpu().numpy()

        def mm(v: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
            return self.hvp_many(t.T.contiguous()).T.double().cpu().numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)

    def _as_vec(self, v: Tensor, name: str) -> Tensor:
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(v).__name__}")
        if v.shape != (self.dim,):
            raise ValueError(f"{name} must have shape ({self.dim},), got {tuple(v.shape)}")
        return v.to(device=self.theta.device, dtype=self.dtype)


def loss_hessian(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    keys: Sequence[str] | None = None,
    batch_size: int | None = None,
    label_smoothing: float = 0.0,
    hvp_mode: str = "auto",
) -> LossHessian:
    """The Hessian of the mean cross-entropy of ``model`` at ``params`` on ``(x, y)``.

    ``keys`` default: the model's trainable parameters (``named_parameters``) in ``params`` order, so
    BatchNorm buffers are constants. ``batch_size`` (default: all of ``x``) bounds memory. ``hvp_mode``: see
    ``LossHessian`` (``"auto"``, ``"forward-over-reverse"``, ``"double-backward"``). Raises
    ``ValueError`` for keys that are missing or not floating, for ``params`` that do not match the
    model's ``state_dict``, and for mismatched ``x`` / ``y``. ``params`` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    expected = set(model.state_dict())
    missing = sorted(expected - set(params))
    extra = sorted(set(params) - expected)
    if missing or extra:
        raise ValueError(f"params do not match the model's state_dict: missing {missing[:5]}, unexpected {extra[:5]}")
    if keys is None:
        trainable = {n for n, _ in model.named_parameters()}
        keys = [k for k in params if k in trainable]
    keys = tuple(keys)
    if not keys:
        raise ValueError("no parameters to differentiate (keys is empty)")
    fk = set(float_keys(params))
    for k in keys:
        if k not in params:
            raise ValueError(f"key {k!r} is not in params")
        if k not in fk:
            raise ValueError(f"key {k!r} has non-floating dtype {params[k].dtype}: it cannot be differentiated")
    dtypes = {params[k].dtype for k in keys}
    if len(dtypes) != 1:
        raise ValueError(f"differentiated entries must share one dtype, got {sorted(map(str, dtypes))}")
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must hold the same number (> 0) of examples")
    bs = x.shape[0] if batch_size is None else validate.integer("batch_size", batch_size)
    (dt,) = dtypes
    dev = params[keys[0]].device
    held = {k: v.detach() for k, v in params.items()}
    theta = flatten(held, keys).clone()
    return LossHessian(model, held, x.to(device=dev, dtype=dt if x.is_floating_point() else None),
                       y.to(device=dev, dtype=torch.long), keys, theta, bs, float(label_smoothing), hvp_mode)


# ---------------------------------------------------------------------------------------------
# spectrum: exact, top-k by Lanczos, trace by Hutchinson, density by SLQ


def exact_spectrum(H: LossHessian, chunk: int = 256) -> Tensor:
    """All d eigenvalues (ascending, float64) of ½(H + Hᵀ), H formed from d HVPs (small nets)."""
    D = H.dense(chunk).double()
    return torch.linalg.eigvalsh(0.5 * (D + D.T))


def top_eigenvalues(
    H: LossHessian, k: int = 5, *, tol: float = 1e-8, seed: int = 0, which: str = "LA", maxiter: int | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` algebraically largest (``which="LA"``; "LM": largest magnitude, "SA": smallest)
    eigenvalues and eigenvectors of H by ARPACK's implicitly restarted Lanczos (``eigsh``) on HVPs.

    Returns (values [k] float64 sorted descending, vectors [d, k]). The start vector is drawn from
    ``seed``, so the result is reproducible.
    """
    from scipy.sparse.linalg import ArpackError, eigsh

    k = validate.integer("k", k, minimum=1, maximum=H.dim - 1)
    validate.choice("which", which, ("LA", "LM", "SA"))
    tol = validate.number("tol", tol, minimum=0.0)
    maxiter = validate.optional_integer("maxiter", maxiter)
    v0 = np.random.default_rng(seed).standard_normal(H.dim)
    try:
        vals, vecs = eigsh(H.linear_operator(), k=k, which=which, tol=tol, v0=v0, maxiter=maxiter)
    except ArpackError as e:
        if "error -9:" in str(e):  # "Starting vector is zero": the Krylov space collapsed, H v0 = 0
            raise ValueError(f"eigsh: the Hessian-vector products of the start vector vanish (H v0 = 0); the "
                             f"Hessian of this {H.dim}-parameter loss may be identically zero ({e})") from e
        raise
    order = np.argsort(vals)[::-1]
    return torch.from_numpy(vals[order].copy()), torch.from_numpy(vecs[:, order].copy())


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's tr H ≈ mean of zᵢᵀHzᵢ (``samples``), with its standard error."""

    estimate: float
    stderr: float
    samples: Tensor


def _rademacher(n: int, d: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n, d), generator=g).to(dtype) * 2 - 1).to(device)


def hutchinson_trace(H: LossHessian, samples: int = 100, *, seed: int = 0, chunk: int = 32) -> TraceEstimate:
    """tr H = E_z[zᵀHz], z Rademacher (Hutchinson 1990); ``samples`` draws, ``chunk`` HVPs per call."""
    samples = validate.integer("samples", samples, minimum=2)
    seed = validate.integer("seed", seed, minimum=None)
    z = _rademacher(samples, H.dim, seed, H.dtype, H.theta.device)
    q = (z * H.hvp_many(z, chunk=chunk)).sum(1).double().cpu()
    return TraceEstimate(float(q.mean()), float(q.std(unbiased=True) / math.sqrt(samples)), q)


def lanczos(matmat: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Lanczos tridiagonalisation of a symmetric operator from p start vectors at once.

    ``matmat`` maps [p, d] → [p, d] (row-wise products), ``v0`` is [p, d]. Returns the diagonals
    α [p, m] and off-diagonals β [p, m − 1] of the p tridiagonal matrices T (m = ``steps`` ≤ d),
    float64, with full reorthogonalisation (twice, "twice is enough"). A probe whose Krylov space
    is exhausted early (β ≈ 0) continues with zero vectors: its T becomes block-diagonal and the
    extra Ritz values carry zero weight in ``SpectralDensity``.
    """
    if v0.ndim != 2:
        raise ValueError(f"v0 must be [p, d], got {tuple(v0.shape)}")
    p, d = v0.shape
    steps = validate.integer("steps", steps, minimum=1, maximum=d)
    q = v0.double()
    norms = q.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a start vector is zero")
    q = q / norms
    Q = torch.zeros(p, steps, d, dtype=torch.float64, device=v0.device)
    alpha = torch.zeros(p, steps, dtype=torch.float64)
    beta = torch.zeros(p, max(steps - 1, 0), dtype=torch.float64)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(p, 1, dtype=torch.float64, device=v0.device)
    scale = None
    for j in range(steps):
        Q[:, j] = q
        w = matmat(q.to(v0.dtype)).double()
        a = (q * w).sum(1, keepdim=True)
        alpha[:, j] = a.squeeze(1).cpu()
        w = w - a * q - b_prev * q_prev
        Qj = Q[:, : j + 1]
        for _ in range(2):
            w = w - torch.bmm(torch.bmm(w.unsqueeze(1), Qj.transpose(1, 2)), Qj).squeeze(1)
        if j == steps - 1:
            break
        b = w.norm(dim=1, keepdim=True)
        if scale is None:
            scale = alpha[:, 0].abs().max().item() + b.max().item()
        dead = b <= 1e-12 * max(scale, 1e-300)
        b = torch.where(dead, torch.zeros_like(b), b)
        beta[:, j] = b.squeeze(1).cpu()
        q_prev, b_prev = q, b
        q = torch.where(dead, torch.zeros_like(w), w / torch.where(dead, torch.ones_like(b), b))
    return alpha, beta


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ estimate of the spectral measure (1/d) Σⱼ δ(λ − λⱼ): Ritz ``nodes`` and Gauss-quadrature
    ``weights`` [probes, m] (each row sums to 1), for a d-dimensional operator."""

    nodes: Tensor
    weights: Tensor
    dim: int

    def count_in(self, lo: float, hi: float) -> float:
        """Estimated number of eigenvalues in [lo, hi]: d · mean_probes Σᵢ τᵢ 1[lo ≤ λ̃ᵢ ≤ hi]."""
        inside = (self.nodes >= lo) & (self.nodes <= hi)
        return float(self.dim * (self.weights * inside).sum(1).mean())

    def trace(self) -> float:
        """d · mean_probes Σᵢ τᵢ λ̃ᵢ, the SLQ estimate of tr H (= Hutchinson's with Gaussian probes)."""
        return float(self.dim * (self.weights * self.nodes).sum(1).mean())

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """Gaussian-broadened density on ``grid``: mean_probes Σᵢ τᵢ N(λ; λ̃ᵢ, σ²) (integrates to 1)."""
        sigma = validate.number("sigma", sigma, positive=True)
        g = grid.double().reshape(1, 1, -1)
        k = torch.exp(-0.5 * ((g - self.nodes.unsqueeze(-1)) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (self.weights.unsqueeze(-1) * k).sum(1).mean(0)


def slq(H: LossHessian, probes: int = 8, steps: int = 80, *, seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani et al. 2019): ``probes``
    Rademacher start vectors, ``steps`` Lanczos steps each (all probes advanced together)."""
    probes = validate.integer("probes", probes)
    seed = validate.integer("seed", seed, minimum=None)
    v0 = _rademacher(probes, H.dim, seed, H.dtype, H.theta.device)
    alpha, beta = lanczos(H.hvp_many, v0, steps)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    nodes, U = torch.linalg.eigh(T)
    return SpectralDensity(nodes, U[:, 0, :] ** 2, H.dim)


def count_near_zero(eigenvalues: Tensor, rel_tol: float) -> int:
    """#{j : |λⱼ| ≤ rel_tol · max |λ|}: the numerical dimension of the near-flat subspace."""
    rel_tol = validate.number("rel_tol", rel_tol, positive=True)
    e = eigenvalues.double()
    return int((e.abs() <= rel_tol * e.abs().max()).sum())


# ---------------------------------------------------------------------------------------------
# directions along a curve, curvature in a direction, input-output Jacobian


def _unit_rows(m: Tensor, floor: float = 0.0) -> Tensor:
    """Rows scaled to unit norm; a row of norm ≤ ``floor`` (a zero vector up to rounding) becomes NaN."""
    n = m.norm(dim=1, keepdim=True)
    ok = n > floor
    return torch.where(ok, m / torch.where(ok, n, torch.ones_like(n)), torch.full_like(m, float("nan")))


def curve_directions(
    curve: Curve, t: Tensor | Sequence[float], *, keys: Sequence[str] | None = None, h: float = 1e-3
) -> dict[str, Tensor]:
    """Unit directions [K, d] (float64, ``keys`` flattened) at φ(t) for each of the K values of ``t``:

    - ``straight``: θ₂ − θ₁, the direction of the segment (the same at every t);
    - ``detour``: φ(t) − ((1 − t)θ₁ + tθ₂), away from the segment (NaN where it is 0 up to rounding, i.e.
      ‖·‖ ≤ 100 ε_dtype max(‖θ₁‖, ‖θ₂‖): at t ∈ {0, 1}, and everywhere on a straight curve);
    - ``tangent``: φ'(t) = Σᵢ cᵢ'(t) θᵢ, exact (Bernstein derivative);
    - ``tangent_fd``: (φ(t + h) − φ(t − h)) / 2h, one-sided where t ± h leaves [0, 1].
    """
    if not isinstance(curve, Curve):
        raise TypeError(f"curve must be a Curve, got {type(curve).__name__}")
    h = validate.number("h", h, positive=True, below=0.5)
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    ks = float_keys(curve.start) if keys is None else list(keys)
    check_compatible(curve.start, curve.end)

    def flat_rows(stacked: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([stacked[k].double().reshape(stacked[k].shape[0], -1) for k in ks], 1)

    a, b = flatten(curve.start, ks).double(), flatten(curve.end, ks).double()
    pts = flat_rows(curve.points_at(t))
    lo, hi = (t - h).clamp(0, 1), (t + h).clamp(0, 1)
    fd = (flat_rows(curve.points_at(hi)) - flat_rows(curve.points_at(lo))) / (hi - lo).unsqueeze(1)
    # φ(t) is computed in the curve's dtype: a detour below 100 rounding units of the endpoints' size is 0
    noise = 100 * torch.finfo(curve.start[ks[0]].dtype).eps * float(torch.maximum(a.norm(), b.norm()))
    tt = t.unsqueeze(1)
    chord = (1 - tt) * a + tt * b  # exact at t = 0 and 1, where φ(t) is exactly θ₁ / θ₂
    return {
        "straight": _unit_rows((b - a).expand(t.numel(), -1)),
        "detour": _unit_rows(pts - chord, floor=noise),
        "tangent": _unit_rows(flat_rows(curve.tangents_at(t))),
        "tangent_fd": _unit_rows(fd),
    }


def directional_curvature(H: LossHessian, u: Tensor) -> tuple[Tensor, Tensor]:
    """For unit rows u [k, d]: (‖Hu‖ [k], uᵀHu [k]); rows holding NaN give NaN."""
    if u.ndim != 2 or u.shape[1] != H.dim:
        raise ValueError(f"u must be [k, {H.dim}], got {tuple(u.shape)}")
    ok = torch.isfinite(u).all(1)
    norm = torch.full((u.shape[0],), float("nan"), dtype=torch.float64)
    rq = norm.clone()
    if bool(ok.any()):
        uu = u[ok].to(H.dtype)
        hu = H.hvp_many(uu).double().cpu()
        norm[ok] = hu.norm(dim=1)
        rq[ok] = (uu.double().cpu() * hu).sum(1)
    return norm, rq


def input_jacobian(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """∂f(θ, xₙ)/∂xₙ for every input: [N, C, *input_shape] (eval mode; one ``vmap(jacrev)`` call)."""
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [N, *input_shape], got shape {tuple(x.shape)}")
    p = dict(params)

    def f(xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    with module_mode(model, False):
        return vmap(jacrev(f))(x).detach()
