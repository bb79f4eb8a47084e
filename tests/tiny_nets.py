"""Tiny networks (``nn.Sequential``, keys ``"0.weight"``, ``"1.running_mean"``, …) and parameter points of
them, shared by the tests of curves, NEB, simplexes and training."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from reference.params import Params


def relu_mlp(d_in: int, widths: Sequence[int], n_cls: int) -> nn.Sequential:
    """Linear → ReLU for every hidden width, then a Linear head."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d_in, w), nn.ReLU()]
        d_in = w
    return nn.Sequential(*layers, nn.Linear(d_in, n_cls))


def bn_mlp(d_in: int, widths: Sequence[int], n_cls: int, momentum: float | None = 0.1,
           bias: bool = False) -> nn.Sequential:
    """Linear → BatchNorm1d → ReLU for every hidden width, then a Linear head. No bias before BatchNorm by
    default (it cancels it, and its true gradient is 0)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d_in, w, bias=bias), nn.BatchNorm1d(w, momentum=momentum), nn.ReLU()]
        d_in = w
    return nn.Sequential(*layers, nn.Linear(d_in, n_cls))


class LinearTwice(nn.Module):
    """One ``Linear(width, width)`` applied twice, ``fc(relu(fc(x)))``: a module that runs more than once per
    forward (what per-module hooks and first-layer shortcuts must notice)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def bn_point(make: Callable[[], nn.Module], seed: int, dtype: torch.dtype | None = None) -> Params:
    """``make()``'s initialisation under ``torch.manual_seed(seed)``, with non-trivial BatchNorm statistics
    (running_mean ~ N(0, 1), running_var ~ U(0.5, 1.5), num_batches_tracked = seed + 3); floating entries
    cast to ``dtype`` when given. Every entry is a fresh tensor."""
    torch.manual_seed(seed)
    out = {}
    for k, v in make().state_dict().items():
        if k.endswith("running_mean"):
            v = torch.randn_like(v)
        elif k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif k.endswith("num_batches_tracked"):
            v = torch.tensor(seed + 3)
        out[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).clone()
    return out


def general_params(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> Params:
    """Every floating entry of ``model``'s state N(0, 1) (running_var |N| + 0.5), integer buffers as
    initialised: a point in general position (no ties between units anywhere)."""
    from reference.models import init_params

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in init_params(model, seed).items():
        if not v.is_floating_point():
            out[k] = v
        elif k.endswith("running_var"):
            out[k] = (torch.randn(v.shape, generator=g).abs() + 0.5).to(dtype)
        else:
            out[k] = torch.randn(v.shape, generator=g).to(dtype)
    return out


def nontrivial(params: Params, seed: int) -> Params:
    """Perturb every float entry so that no coordinate is permutation-symmetric by accident (norm weights
    start at 1, biases at 0, BatchNorm statistics at 0 / 1); running variances stay positive."""
    g = torch.Generator().manual_seed(seed)
    out: Params = {}
    for k, v in params.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype)
        elif k.endswith("running_mean"):
            out[k] = 0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        else:
            out[k] = v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype)
    return out
