"""Arithmetic on parameter points.

A network's parameters are a ``Params = dict[str, Tensor]`` keyed by ``model.state_dict()`` names,
buffers included. Every method of this suite is a pure function on such dicts; a ``nn.Module`` is
only the architecture that evaluates them (``torch.func.functional_call``).

Integer buffers (BatchNorm's ``num_batches_tracked``) are counters, not coordinates: they are never
averaged. A combination of points takes them from the first point (``int_policy="first"``), or
requires all points to agree (``"equal"``). Linear maps of floating tensors never touch them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import validate

Params = dict[str, Tensor]

#: How ``combine`` treats integer buffers: take them from the first point, or require all to agree.
INT_POLICIES = ("first", "equal")

__all__ = [
    "Params",
    "check_compatible",
    "check_finite",
    "combine",
    "combine_batch",
    "distance",
    "flatten",
    "float_keys",
    "is_float",
    "lerp",
    "stack",
    "to",
    "unflatten",
    "unstack",
    "clone",
    "dot",
]


def is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def float_keys(params: Mapping[str, Tensor]) -> list[str]:
    """The keys whose tensors are coordinates of the parameter point (floating dtype)."""
    return [k for k, v in params.items() if is_float(v)]


def check_compatible(*points: Mapping[str, Tensor], batch_dims: int = 0) -> None:
    """Raise ``ValueError`` naming the first key that differs in presence, shape or dtype kind.

    ``batch_dims`` leading dimensions are ignored in the shape comparison (stacked points).
    """
    batch_dims = validate.integer("batch_dims", batch_dims, minimum=0)
    if not points:
        raise ValueError("need at least one parameter point")
    ref = points[0]
    for i, p in enumerate(points[1:], start=1):
        diff = key_mismatch(sorted(ref), sorted(p))
        if diff:
            raise ValueError(f"parameter point {i} has different keys than point 0: {diff}")
        for k, v in ref.items():
            w = p[k]
            if tuple(v.shape[batch_dims:]) != tuple(w.shape[batch_dims:]):
                raise ValueError(
                    f"key {k!r}: shape {tuple(w.shape)} in point {i} does not match {tuple(v.shape)} in point 0"
                )
            if is_float(v) != is_float(w):
                raise ValueError(f"key {k!r}: dtype {w.dtype} in point {i} vs {v.dtype} in point 0")


def check_finite(params: Mapping[str, Tensor], what: str = "parameters") -> None:
    """Raise ``ValueError`` naming the first key holding NaN or infinite values."""
    for k, v in params.items():
        if is_float(v) and not bool(torch.isfinite(v).all()):
            n_bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"{what}: key {k!r} holds {n_bad} non-finite value(s) (NaN or inf)")


def _coeff_list(coeffs: Sequence[float] | Tensor, n: int) -> Tensor:
    c = torch.as_tensor(coeffs, dtype=torch.float64)
    if c.ndim != 1 or c.shape[0] != n:
        raise ValueError(f"expected {n} coefficients, got shape {tuple(c.shape)}")
    return c


def combine(
    coeffs: Sequence[float] | Tensor,
    points: Sequence[Mapping[str, Tensor]],
    int_policy: str = "first",
) -> Params:
    """Σᵢ kᵢ θᵢ over the floating tensors; integer buffers by ``int_policy`` ("first" or "equal")."""
    validate.choice("int_policy", int_policy, INT_POLICIES)
    points = list(points)
    check_compatible(*points)
    c = _coeff_list(coeffs, len(points))
    out: Params = {}
    for k, v0 in points[0].items():
        if is_float(v0):
            acc = torch.zeros_like(v0)
            for ci, p in zip(c.tolist(), points, strict=True):
                acc = acc + ci * p[k]
            out[k] = acc
        else:
            if int_policy == "equal":
                for i, p in enumerate(points[1:], start=1):
                    if not torch.equal(p[k], v0):
                        raise ValueError(f"integer buffer {k!r} differs between point 0 and point {i}")
            out[k] = v0.clone()
    return out


def combine_batch(coeffs: Tensor, points: Sequence[Mapping[str, Tensor]]) -> Params:
    """K combinations at once: ``coeffs`` is [K, n]; returns a stacked ``Params`` with leading dim K.

    Entry ``[j]`` equals ``combine(coeffs[j], points)``; integer buffers are repeated from point 0.
    """
    points = list(points)
    check_compatible(*points)
    coeffs = torch.as_tensor(coeffs)
    if coeffs.ndim != 2 or coeffs.shape[1] != len(points):
        raise ValueError(f"coeffs must be [K, {len(points)}], got {tuple(coeffs.shape)}")
    K = coeffs.shape[0]
    out: Params = {}
    for k, v0 in points[0].items():
        if is_float(v0):
            st = torch.stack([p[k] for p in points])  # [n, ...]
            c = coeffs.to(device=st.device, dtype=st.dtype)
            out[k] = torch.tensordot(c, st, dims=([1], [0]))
        else:
            out[k] = v0.unsqueeze(0).expand(K, *v0.shape).clone()
    return out


def lerp(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> Params:
    """(1 − t) a + t b."""
    return combine([1.0 - t, t], [a, b])


def stack(points: Sequence[Mapping[str, Tensor]]) -> Params:
    """Stack points along a new leading dimension (for ``vmap``)."""
    points = list(points)
    check_compatible(*points)
    return {k: torch.stack([p[k] for p in points]) for k in points[0]}


def unstack(stacked: Mapping[str, Tensor]) -> list[Params]:
    """Inverse of ``stack``: the K points of a stacked ``Params`` (one leading size K on every entry)."""
    K = validate.leading_size(stacked, "stacked params")
    return [{k: v[i] for k, v in stacked.items()} for i in range(K)]


def flatten(params: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> Tensor:
    """Concatenate the floating tensors (or ``keys``) into one vector, in the dict's key order."""
    ks = float_keys(params) if keys is None else list(keys)
    if not ks:
        raise ValueError("no floating-point entries to flatten")
    return torch.cat([params[k].reshape(-1) for k in ks])


def unflatten(vec: Tensor, like: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> Params:
    """Inverse of ``flatten``: entries not in ``keys`` are copied from ``like``."""
    ks = float_keys(like) if keys is None else list(keys)
    n = sum(like[k].numel() for k in ks)
    if vec.ndim != 1 or vec.numel() != n:
        raise ValueError(f"vector of shape {tuple(vec.shape)} does not match {n} parameters")
    out: Params = {k: v.clone() for k, v in like.items()}
    i = 0
    for k in ks:
        m = like[k].numel()
        out[k] = vec[i : i + m].reshape(like[k].shape).to(like[k].dtype)
        i += m
    return out


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> Tensor:
    check_compatible(a, b)
    ks = float_keys(a) if keys is None else list(keys)
    return sum((a[k].double() * b[k].double()).sum() for k in ks)


def distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> float:
    """Euclidean distance ‖a − b‖ over the floating entries (or ``keys``)."""
    check_compatible(a, b)
    ks = float_keys(a) if keys is None else list(keys)
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in ks)))


def to(params: Mapping[str, Tensor], device=None, dtype: torch.dtype | None = None) -> Params:
    """Move to ``device``; cast floating entries to ``dtype`` (integer buffers keep theirs)."""
    return {
        k: v.to(device=device, dtype=dtype if (dtype is not None and is_float(v)) else None)
        for k, v in params.items()
    }


def clone(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().clone() for k, v in params.items()}


def chosen_float_keys(p: Mapping[str, Tensor], keys: Sequence[str] | None, use: str) -> list[str]:
    """``keys`` (default: every floating entry of ``p``), checked: non-empty, entries of ``p``, and
    floating. ``use`` names what they are for in the message (e.g. "volume", "plane")."""
    ks = float_keys(p) if keys is None else list(keys)
    if not ks:
        raise ValueError(f"no floating-point entries for the {use}")
    for k in ks:
        if k not in p:
            raise ValueError(f"{use} key {k!r} is not an entry of the points")
        if not is_float(p[k]):
            raise ValueError(f"{use} key {k!r} is not a floating entry ({p[k].dtype})")
    return ks


def key_mismatch(expected: Iterable[str], got: Iterable[str]) -> str | None:
    """``None`` if ``got`` holds exactly the keys ``expected``; otherwise the text
    ``"missing keys [...], unexpected keys [...]"`` (at most five of each, in order) for an error."""
    want, have = list(expected), list(got)
    missing = [k for k in want if k not in set(have)]
    extra = [k for k in have if k not in set(want)]
    if not missing and not extra:
        return None
    more = lambda ks: "..." if len(ks) > 5 else ""  # noqa: E731
    return f"missing keys {missing[:5]}{more(missing)}, unexpected keys {extra[:5]}{more(extra)}"
