"""Shared helpers of the property suites: device, tolerances, evaluation, comparisons.

Tolerances of the functional properties (``f(P(θ), x) = f(θ, x)`` holds exactly in real
arithmetic; a permuted network sums the same terms in another order):

============  ===========  ==========================================================================
dtype         device       relative tolerance (``atol = rtol · max|f(θ, x)|``)
============  ===========  ==========================================================================
float64       any          1e-9
float32       CPU          1e-4 (measured: permuted fp32 logits differ by ~1e-6 relative)
float32       CUDA         5e-3: cuDNN convolutions run in TF32 by default
                           (``torch.backends.cudnn.allow_tf32``: 10-bit mantissa, ~5e-4 per op,
                           compounding over depth); the suite does not change global flags
============  ===========  ==========================================================================

Parameter-level properties (``Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ)``, group laws) are exact: ``torch.equal``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["DEVICE", "assert_params_equal", "assert_same_function", "forward", "rtol_for"]

#: device of the functional properties (``MODECONN_DEVICE=cuda`` with ``HYPOTHESIS_PROFILE=gpu``)
DEVICE = os.environ.get("MODECONN_DEVICE", "cpu")


def rtol_for(dtype: torch.dtype, device: str | torch.device) -> float:
    """Relative tolerance of a functional comparison (table in the module docstring)."""
    if dtype == torch.float64:
        return 1e-9
    if torch.device(device).type == "cuda":
        return 5e-3
    return 1e-4


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, train: bool) -> Tensor:
    """``f(θ, x)`` by ``torch.func.functional_call`` in train or eval mode.

    The parameters are cloned: in train mode BatchNorm updates its running statistics in place,
    which must not leak into the caller's ``params``.
    """
    model.train(train)
    with torch.no_grad():
        return functional_call(model, {k: v.clone() for k, v in params.items()}, (x,))


def assert_same_function(out: Tensor, ref: Tensor, what: str = "") -> None:
    """``out ≈ ref`` at the dtype/device tolerance, both finite (NaN is never compared with NaN)."""
    assert bool(torch.isfinite(ref).all()), f"{what}: reference output is not finite"
    assert bool(torch.isfinite(out).all()), f"{what}: output is not finite"
    rtol = rtol_for(ref.dtype, ref.device)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    atol = rtol * scale + 1e-30
    torch.testing.assert_close(
        out, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m} (rtol {rtol:g}, output scale {scale:.3g})"
    )


def assert_params_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "") -> None:
    """Exact equality of two parameter points: same keys, dtypes, shapes and values."""
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}: {k!r} dtype {a[k].dtype} vs {b[k].dtype}"
        assert a[k].shape == b[k].shape, f"{what}: {k!r} shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        if not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs().max() if a[k].is_floating_point() else "n/a"
            raise AssertionError(f"{what}: {k!r} differs (max |Δ| = {diff})")
