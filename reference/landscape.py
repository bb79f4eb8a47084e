"""The loss on a plane through three parameter points (Garipov et al. 2018, §3, Fig. 1).

Garipov, Izmailov, Podoprikhin, Vetrov & Wilson, "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs", NeurIPS 2018 (arXiv:1802.10026); the authors' ``plane.py`` computes the planes
of their Fig. 1. For points p₀, p₁, p₂ (two modes and a curve's bend, say), flattened over their
floating entries (float64), Gram–Schmidt gives the orthonormal basis

    u = (p₁ − p₀) / ‖p₁ − p₀‖,     v = w / ‖w‖,  w = (p₂ − p₀) − ⟨p₂ − p₀, u⟩ u,          (P)

and a point of the plane with coordinates (a, b) is θ(a, b) = p₀ + a u + b v; ``project`` gives a
point's coordinates (⟨θ − p₀, u⟩, ⟨θ − p₀, v⟩) (the authors' ``get_xy``), e.g. to draw a curve on
the plane. Coordinates are Euclidean distances in parameter space: p₀ = (0, 0), p₁ = (‖p₁ − p₀‖, 0).

``plane_grid`` evaluates a G_a × G_b grid of coordinates over the bounding box of the three points,
widened by ``margin`` times its extent on every side (the authors' margins of 0.2 on [0, 1] in units
of the two lengths), in chunks of stacked points through ``reference.evaluate.evaluate_points``
(one vmapped call per chunk). Integer buffers (``num_batches_tracked``) are not coordinates: every
plane point takes them from p₀. With ``recompute_bn`` the BatchNorm statistics of every grid point
are recomputed first (``reference.bn``; the authors call ``utils.update_bn`` at every point).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import validate
from .bn import has_batchnorm, recompute_bn_stats_batched
from .evaluate import default_chunk_size, evaluate_points
from .params import Params, check_compatible, chosen_float_keys

__all__ = ["PlaneBasis", "plane_basis", "plane_grid", "plane_points", "plot_plane", "project"]


@dataclass(frozen=True, eq=False)
class PlaneBasis:
    """Origin p₀ and the orthonormal directions u, v of Eq. (P) over ``keys`` (float64 vectors).

    ``origin`` is a copy of p₀ (every entry, integer buffers included); ``u`` and ``v`` are flat
    float64 vectors in the order of ``keys``.
    """

    origin: Params
    u: Tensor
    v: Tensor
    keys: tuple[str, ...]

    @property
    def dim(self) -> int:
        """Number of coordinates of the parameter space (length of u and v)."""
        return int(self.u.numel())


def _flat64(p: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    return torch.cat([p[k].detach().reshape(-1).to(torch.float64) for k in keys])


def plane_basis(
    p0: Mapping[str, Tensor],
    p1: Mapping[str, Tensor],
    p2: Mapping[str, Tensor],
    keys: Sequence[str] | None = None,
    rtol: float | None = None,
) -> PlaneBasis:
    """The basis (p₀; u, v) of Eq. (P) over ``keys`` (default: every floating entry, BatchNorm
    statistics included, as the plane then moves them with the weights).

    Raises ``ValueError`` for points with different keys / shapes, for p₁ = p₀, and for p₂ on the
    line through p₀ and p₁ (‖w‖ ≤ ``rtol`` · ‖p₂ − p₀‖; default ``rtol``: 1000 × the machine epsilon of
    the points' least precise floating dtype, as points are rounded to it): three collinear points
    span no plane.
    """
    check_compatible(p0, p1, p2)
    ks = tuple(chosen_float_keys(p0, keys, "plane"))
    if rtol is None:
        rtol = 1000.0 * max(torch.finfo(p[k].dtype).eps for p in (p0, p1, p2) for k in ks)
    f0, f1, f2 = (_flat64(p, ks) for p in (p0, p1, p2))
    d1 = f1 - f0
    n1 = d1.norm()
    if not float(n1) > 0:
        raise ValueError("p1 coincides with p0 (over the plane's keys): no direction u = p1 - p0")
    u = d1 / n1
    d2 = f2 - f0
    w = d2 - torch.dot(d2, u) * u
    w = w - torch.dot(w, u) * u  # a second Gram–Schmidt pass: orthogonal to rounding
    nw = w.norm()
    if not float(nw) > rtol * float(d2.norm()):
        raise ValueError(
            f"p2 lies on the line through p0 and p1 (distance {float(nw):.3g} from it, "
            f"|p2 - p0| = {float(d2.norm()):.3g}): three collinear points span no plane"
        )
    origin = {k: t.detach().clone() for k, t in p0.items()}
    return PlaneBasis(origin, u, w / nw, ks)


def _as_stacked(points: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor], basis: PlaneBasis) -> Tensor:
    """Points as a float64 [K, D] matrix over the basis' keys (a list of Params or stacked Params)."""
    if isinstance(points, Mapping):
        missing = [k for k in basis.keys if k not in points]
        if missing:
            raise ValueError(f"stacked points lack the plane's keys {missing[:5]}")
        K = validate.leading_size({k: points[k] for k in basis.keys}, "stacked points")
        rows = torch.cat([points[k].detach().reshape(K, -1).to(torch.float64).cpu() for k in basis.keys], dim=1)
    else:
        pts = list(points)
        if not pts:
            return torch.zeros(0, basis.dim, dtype=torch.float64)
        for i, p in enumerate(pts):
            missing = [k for k in basis.keys if k not in p]
            if missing:
                raise ValueError(f"point {i} lacks the plane's keys {missing[:5]}")
        rows = torch.stack([_flat64(p, basis.keys).cpu() for p in pts])
    if rows.shape[1] != basis.dim:
        raise ValueError(f"points have {rows.shape[1]} coordinates over the plane's keys, the plane {basis.dim}")
    return rows


def project(points: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor], basis: PlaneBasis) -> Tensor:
    """Coordinates (⟨θ − p₀, u⟩, ⟨θ − p₀, v⟩) of each point, float64 ``[K, 2]``.

    ``points``: a list of ``Params`` or stacked ``Params`` (leading dimension K), e.g. a curve's
    ``points_at(t)``. A point off the plane is projected orthogonally onto it.
    """
    rows = _as_stacked(points, basis)
    o = _flat64(basis.origin, basis.keys).cpu()
    d = rows - o
    return torch.stack([d @ basis.u.cpu(), d @ basis.v.cpu()], dim=1)


def plane_points(basis: PlaneBasis, coords: Tensor | Sequence[Sequence[float]]) -> Params:
    """The stacked points θ(a, b) = p₀ + a u + b v for the rows (a, b) of ``coords`` [K, 2].

    Computed in float64 and cast to each entry's dtype (so a point whose coordinates came from
    ``project`` is rebuilt to float64 rounding); entries outside the basis' keys, integer buffers
    included, are p₀'s, repeated.
    """
    c = torch.as_tensor(coords, dtype=torch.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be [K, 2] (a, b) pairs, got shape {tuple(c.shape)}")
    K = c.shape[0]
    o = basis.origin
    out: Params = {}
    offset = 0
    dev = next(iter(o.values())).device
    uv = torch.stack([basis.u, basis.v]).to(dev)  # [2, D]
    flat = c.to(dev) @ uv  # [K, D]
    sizes = {k: o[k].numel() for k in basis.keys}
    for k, t in o.items():
        if k in sizes:
            m = sizes[k]
            delta = flat[:, offset : offset + m].reshape(K, *t.shape)
            out[k] = (t.to(torch.float64).unsqueeze(0) + delta).to(t.dtype)
            offset += m
        else:
            out[k] = t.unsqueeze(0).expand(K, *t.shape).clone()
    return out


def _grid_axis(values: Tensor, n: int, margin: float) -> Tensor:
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    return torch.linspace(lo - margin * span, hi + margin * span, n, dtype=torch.float64)


def plane_grid(
    model: nn.Module,
    p0: Mapping[str, Tensor],
    p1: Mapping[str, Tensor],
    p2: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    grid: int | tuple[int, int] = (21, 21),
    margin: float = 0.2,
    recompute_bn: bool = False,
    x_bn: Tensor | None = None,
    *,
    alphas: Tensor | Sequence[float] | None = None,
    betas: Tensor | Sequence[float] | None = None,
    keys: Sequence[str] | None = None,
    bn_batch_size: int | None = None,
    bn_method: str = "pooled",
    chunk_size: int | None = None,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Loss and error of θ(a, b) on ``(x, y)`` over a grid of the plane through p₀, p₁, p₂.

    The grid: ``grid`` = (G_a, G_b) (an int G: G × G) points spanning the three points' bounding box
    in (a, b) widened by ``margin`` × its extent on each side; ``alphas`` / ``betas`` replace an axis
    by explicit coordinates. The G_a · G_b points are built ``chunk_size`` at a time (default
    ``evaluate.default_chunk_size`` of the device) and evaluated (and their BatchNorm statistics
    recomputed) with that ``chunk_size`` (``None``: ``evaluate.auto_chunk_size``). With
    ``recompute_bn`` (BatchNorm models) each point's running statistics are recomputed on ``x_bn``
    (default: ``x``) first.

    Returns ``{"alphas": [G_a], "betas": [G_b], "loss": [G_a, G_b], "error": [G_a, G_b],
    "coords": [3, 2]`` (p₀, p₁, p₂ in the plane)``, "basis": PlaneBasis, "recompute_bn": bool}``;
    ``loss[i, j]`` is at (``alphas[i]``, ``betas[j]``). Tensors are float64 on CPU, except loss and
    error (float32, as ``evaluate_points``).
    """
    basis = plane_basis(p0, p1, p2, keys)
    coords = project([p0, p1, p2], basis)
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, tuple) or len(grid) != 2:
        raise ValueError(f"grid must be an int >= 2 or a pair of ints >= 2, got {grid!r}")
    grid = (validate.integer("grid[0]", grid[0], minimum=2), validate.integer("grid[1]", grid[1], minimum=2))
    margin = validate.number("margin", margin, minimum=0.0)
    recompute_bn = validate.flag("recompute_bn", recompute_bn)

    def axis(explicit: Tensor | Sequence[float] | None, col: int, n: int, name: str) -> Tensor:
        if explicit is None:
            return _grid_axis(coords[:, col], n, float(margin))
        a = torch.as_tensor(explicit, dtype=torch.float64).reshape(-1)
        if a.numel() == 0 or not bool(torch.isfinite(a).all()):
            raise ValueError(f"{name} must be a non-empty sequence of finite coordinates")
        return a

    al = axis(alphas, 0, grid[0], "alphas")
    be = axis(betas, 1, grid[1], "betas")
    A, B = torch.meshgrid(al, be, indexing="ij")
    ab = torch.stack([A.reshape(-1), B.reshape(-1)], dim=1)
    dev = torch.device(device) if device is not None else next(iter(p0.values())).device
    chunk = chunk_size or default_chunk_size(dev)
    bn = recompute_bn and has_batchnorm(model)
    on_dev = PlaneBasis({k: t.to(dev) for k, t in basis.origin.items()}, basis.u, basis.v, basis.keys)
    losses, errors = [], []
    for s in range(0, ab.shape[0], chunk):
        pts = plane_points(on_dev, ab[s : s + chunk])
        if bn:
            pts = recompute_bn_stats_batched(
                model, pts, x if x_bn is None else x_bn, batch_size=bn_batch_size, method=bn_method,
                chunk_size=chunk_size,
            )
        r = evaluate_points(model, pts, x, y, chunk_size=chunk_size, batch_size=batch_size, device=dev)
        losses.append(r.loss)
        errors.append(r.error)
    shape = (al.numel(), be.numel())
    return {
        "alphas": al,
        "betas": be,
        "loss": torch.cat(losses).reshape(shape),
        "error": torch.cat(errors).reshape(shape),
        "coords": coords,
        "basis": basis,
        "recompute_bn": bool(bn),
    }


def plot_plane(
    result: Mapping[str, Any],
    curve_coords: Tensor | Sequence[Sequence[float]] | None = None,
    *,
    metric: str = "loss",
    labels: Sequence[str] = ("$\\theta_0$", "$\\theta_1$", "$\\theta_2$"),
    levels: int = 20,
    title: str | None = None,
) -> Any:
    """A matplotlib ``Figure`` of ``plane_grid``'s result: filled contours of log₁₀ of ``metric``
    (``"loss"`` or ``"error"``) over the plane (seaborn's ``whitegrid`` style and ``rocket_r``
    colours), the three points marked and labelled, and ``curve_coords`` [K, 2] (``project`` of a
    curve's points) drawn as a line. The figure is built without pyplot (no global state)."""
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    validate.choice("metric", metric, ("loss", "error"))
    for k in ("alphas", "betas", metric, "coords"):
        if k not in result:
            raise ValueError(f"result lacks {k!r}: pass the dict plane_grid returns")
    al = torch.as_tensor(result["alphas"], dtype=torch.float64).numpy()
    be = torch.as_tensor(result["betas"], dtype=torch.float64).numpy()
    z = torch.as_tensor(result[metric], dtype=torch.float64)
    z = torch.log10(z.clamp_min(1e-12)).numpy()
    pts = torch.as_tensor(result["coords"], dtype=torch.float64).numpy()
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(5.5, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        cs = ax.contourf(al, be, z.T, levels=levels, cmap=sns.color_palette("rocket_r", as_cmap=True))
        fig.colorbar(cs, ax=ax, label=f"log10 {metric}")
        if curve_coords is not None:
            cc = torch.as_tensor(curve_coords, dtype=torch.float64)
            if cc.ndim != 2 or cc.shape[1] != 2:
                raise ValueError(f"curve_coords must be [K, 2], got shape {tuple(cc.shape)}")
            ax.plot(cc[:, 0].numpy(), cc[:, 1].numpy(), color="white", lw=2, label="curve")
        ax.scatter(pts[:, 0], pts[:, 1], color="black", s=40, zorder=3)
        for (a, b), name in zip(pts, labels, strict=False):
            ax.annotate(name, (a, b), textcoords="offset points", xytext=(6, 6), color="black")
        ax.set_xlabel("u (parameter-space distance)")
        ax.set_ylabel("v (parameter-space distance)")
        ax.set_aspect("equal", adjustable="box")
        if title:
            ax.set_title(title)
    return fig
