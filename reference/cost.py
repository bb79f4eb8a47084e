"""What one forward pass costs, for choosing between a loop and ``vmap`` (``evaluate.auto_chunk_size``,
``train.train_many(strategy="auto")``).

``forward_cost(model, point, x)`` counts the floating-point operations of one point's forward pass on one
input with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions; element-wise
operations are not counted) and notes whether a convolution ran. The count depends only on the
architecture, so it is kept per (model class, parameter shapes, input shape): later calls cost nothing,
and the same architecture always gets the same answer (the choice it drives changes floating-point
rounding, never the algorithm, so it must not depend on a timing).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["forward_cost"]

_COST: dict[tuple, tuple[float, bool]] = {}


def forward_cost(model: nn.Module, point: Mapping[str, Tensor], x: Tensor) -> tuple[float, bool]:
    """``(FLOPs of model(point) on the input x[0], whether it runs a convolution)``.

    ``point``: one parameter point (``state_dict`` keys; unbatched). Runs one forward pass, in eval mode
    (train-mode BatchNorm would write running statistics into ``point``), on the model's device, without
    gradients; the model's train / eval flags are restored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    key = (type(model).__qualname__, tuple((k, tuple(v.shape)) for k, v in point.items()), tuple(x.shape[1:]))
    if key not in _COST:
        dev = next(iter(model.parameters()), x).device
        one = {k: v.detach().to(dev) for k, v in point.items()}
        was = {n: m.training for n, m in model.named_modules()}
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()
            try:
                functional_call(model, one, (x[:1].detach().to(dev),))
            finally:
                for n, m in model.named_modules():
                    m.training = was[n]
        ops = counter.get_flop_counts().get("Global", {})
        _COST[key] = (float(counter.get_total_flops()), any("convolution" in str(op) for op in ops))
    return _COST[key]
