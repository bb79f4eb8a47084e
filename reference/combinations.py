"""Evaluating K combinations of M points at once when the network's first layer is linear in θ.

A point θ = Σₘ cₘ θₘ of a linear path, a curve or a simplex, in a network whose first layer is a
``Linear`` or a convolution applied to the raw input, ℓ(θ; x) = W x + b, has

    ℓ(θ; x) = Σₘ cₘ ℓ(θₘ; x),

because W and b are entries of θ and the layer sees only x. So the first layer's outputs of the M basis
points are computed once per input batch, each of the K points starts from their combination, and the rest
of the network runs per point as ``evaluate_points`` would run it. This pays when K is several times M and
the first layer is a large share of the forward pass: an MLP 784-512×3-10 on MNIST spends 43% of its
multiply-adds there, an MLP on the 64 pixels of digits 4% (bench/bench_evaluate.py measures both). The
result equals ``evaluate_points`` on the combined points up to float rounding (the sum is taken after the
layer instead of before it); ``tests/test_evaluate_barrier.py`` checks it on the zoo.

``first_layer(model, point, x)`` finds the layer, or says why there is none: it runs one forward pass with
hooks and accepts the first module holding parameters of its own only if it is a ``Linear`` or a
``Conv1d/2d/3d`` called once, on exactly the input's values (a flatten or reshape of x is fine; a
normalisation of x is not), in a model that ties no weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .cost import forward_cost
from .evaluate import PointMetrics, chunk_plan, evaluate_points, metrics_of_chunks, tf32_allowed
from .params import combine_batch

__all__ = ["FirstLayer", "first_layer", "pays", "evaluate_combinations"]

_LINEAR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# ``pays``: use the shortcut when the first layer is at least this share of one point's forward FLOPs, it
# saves at least this many FLOPs per point on the inputs (below that the probe, the model copy and the
# extra calls cost more than they save), and there are at least this many points per basis point
# (bench/bench_evaluate.py).
_MIN_SHARE = 0.2
_MIN_SAVED_FLOPS = 20e6
_MIN_POINTS_PER_BASIS = 2


@dataclass(frozen=True)
class FirstLayer:
    """The first layer of a model: its module name, its parameter keys, the shape its input takes (after
    the batch dimension), its FLOPs per input and their share of one point's forward FLOPs."""

    name: str
    keys: tuple[str, ...]
    input_shape: tuple[int, ...]
    flops: float
    share: float


_FOUND: dict[tuple, FirstLayer | str] = {}


def first_layer(model: nn.Module, point: Mapping[str, Tensor], x: Tensor, train_mode: bool = False
                ) -> FirstLayer | str:
    """The model's first layer if it is linear in θ and sees the raw input, else the reason why not (a
    string). Runs one forward pass of ``point`` on ``x[:2]`` with hooks, without gradients, in the mode
    the evaluation will use (train mode: a dropout before the layer changes its input, so it is refused;
    the point's buffers are not written), once per architecture (model class, parameter shapes, input
    shape, mode), as ``reference.cost.forward_cost``."""
    key = (type(model).__module__, type(model).__qualname__, tuple((k, tuple(v.shape)) for k, v in point.items()),
           tuple(x.shape[1:]), bool(train_mode))
    if key not in _FOUND:
        _FOUND[key] = _find_first_layer(model, point, x, bool(train_mode))
    return _FOUND[key]


def _find_first_layer(model: nn.Module, point: Mapping[str, Tensor], x: Tensor, train_mode: bool
                      ) -> FirstLayer | str:
    shared: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(n)
    tied = next((names for names in shared.values() if len(names) > 1), None)
    if tied is not None:
        return f"the model ties weights: {', '.join(tied)} are one tensor"
    owners = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    calls: list[tuple[str, Tensor]] = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            calls.append((name, args[0] if args and isinstance(args[0], Tensor) else None))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in owners.items()]
    probe = x[:2]
    was = {m: m.training for m in model.modules()}
    try:
        model.train(train_mode)
        with torch.no_grad():
            functional_call(model, {k: v.clone() for k, v in point.items()}, (probe,))
    finally:
        for h in handles:
            h.remove()
        for m, flag in was.items():
            m.training = flag
    if not calls:
        return "no module with parameters ran"
    name, inp = calls[0]
    module = owners[name]
    if not name:
        return f"the model itself ({type(model).__name__}) holds parameters: no first layer to split off"
    if not isinstance(module, _LINEAR_LAYERS):
        return f"the first module with parameters, {name or type(module).__name__!r}, is a {type(module).__name__}"
    if sum(1 for n, _ in calls if n == name) != 1:
        return f"the first layer {name!r} runs more than once"
    if inp is None or inp.numel() != probe.numel() or inp.shape[0] != probe.shape[0] \
            or not torch.equal(inp.reshape(-1), probe.reshape(-1).to(inp.dtype)):
        return f"the first layer {name!r} does not see the raw input"
    prefix = f"{name}." if name else ""
    keys = tuple(prefix + k for k, _ in module.named_parameters(recurse=False))
    total, _ = forward_cost(model, point, x)
    layer_point = {k[len(prefix):]: point[k] for k in keys}
    flops, _ = forward_cost(module, layer_point, inp)
    return FirstLayer(name, keys, tuple(inp.shape[1:]), flops, flops / total if total else 0.0)


def pays(layer: FirstLayer | str, n_points: int, n_basis: int, n_inputs: int) -> bool:
    """``evaluate_combinations``' ``first_layer_shortcut="auto"``: a first layer linear in θ that is at
    least 20% of the forward FLOPs and costs at least 20 MFLOP per point on the ``n_inputs`` inputs, and
    at least two points per basis point. Depends on the architecture and the sizes, never on a timing."""
    return (isinstance(layer, FirstLayer) and layer.share >= _MIN_SHARE and layer.flops * n_inputs >= _MIN_SAVED_FLOPS
            and n_points >= _MIN_POINTS_PER_BASIS * n_basis)


class _Given(nn.Module):
    """Stands in for the first layer: returns the output computed outside (``value``)."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, _x: Tensor) -> Tensor:
        return self.value


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def evaluate_combinations(
    model: nn.Module,
    coeffs: Tensor,
    basis: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    *,
    first_layer_shortcut: bool | str = "auto",
    chunk_size: int | None = None,
    batch_size: int = 4096,
    train_mode: bool = False,
    device: torch.device | str | None = None,
    tf32: bool = False,
) -> PointMetrics:
    """Mean cross-entropy and error of the K points ``combine_batch(coeffs, basis)`` (``coeffs`` [K, M])
    on ``(x, y)``: what ``evaluate_points`` returns for them, up to float rounding.

    ``first_layer_shortcut``: ``True`` combines the basis points' first-layer outputs (module docstring;
    ``ValueError`` if the model has no such layer), ``False`` evaluates the combined points plainly,
    ``"auto"`` (default) the first where it pays (``pays``). ``chunk_size``, ``tf32`` and the rest as
    ``evaluate_points``. The first layer is found by ``first_layer`` on ``basis[0]`` (one small forward
    pass with hooks) at every call.
    """
    use = first_layer_shortcut
    if not (isinstance(use, bool) or use == "auto"):
        raise ValueError(f"first_layer_shortcut must be True, False or 'auto', got {use!r}")
    basis = list(basis)
    stacked = combine_batch(coeffs, basis)
    K, M = int(torch.as_tensor(coeffs).shape[0]), len(basis)
    kw = {"chunk_size": chunk_size, "batch_size": batch_size, "train_mode": train_mode, "device": device}
    if use is False:
        return evaluate_points(model, stacked, x, y, tf32=tf32, **kw)
    if use == "auto" and K < _MIN_POINTS_PER_BASIS * M:  # no need to look for the layer
        return evaluate_points(model, stacked, x, y, tf32=tf32, **kw)
    layer = first_layer(model, basis[0], x, train_mode)
    if use is True and not isinstance(layer, FirstLayer):
        raise ValueError(f"first_layer_shortcut=True, but the model has no first layer linear in θ: {layer}")
    if use == "auto" and not pays(layer, K, M, x.shape[0]):
        return evaluate_points(model, stacked, x, y, tf32=tf32, **kw)
    plan = chunk_plan(model, stacked, x, chunk_size, batch_size, train_mode, device)
    with tf32_allowed(tf32, plan[4]):
        chunks = _shortcut_logits(model, layer, torch.as_tensor(coeffs), basis, stacked, x, plan)
        return metrics_of_chunks(chunks, K, x.shape[0], y, plan[2])


def _shortcut_logits(
    model: nn.Module,
    layer: FirstLayer,
    coeffs: Tensor,
    basis: list[Mapping[str, Tensor]],
    stacked: Mapping[str, Tensor],
    x: Tensor,
    plan: tuple[int, int, int, bool, torch.device],
) -> Iterator[tuple[int, int, int, Tensor]]:
    """``evaluate._chunked_logits``' chunks (``plan``: ``evaluate.chunk_plan``), the first layer's output of
    each point combined from the basis'."""
    K, chunk, batch_size, train_mode, dev = plan
    first = model.get_submodule(layer.name)
    prefix = f"{layer.name}." if layer.name else ""
    w = [{k[len(prefix):]: p[k].to(dev) for k in layer.keys} for p in basis]
    rest = copy.deepcopy(model).to(dev).train(train_mode)
    given = _Given()
    _set_submodule(rest, layer.name, given)
    rest_keys = [k for k in stacked if k not in layer.keys]

    def run(p: Mapping[str, Tensor], z: Tensor, xb: Tensor) -> Tensor:
        given.value = z
        return functional_call(rest, p, (xb,))

    fv = vmap(run, in_dims=(0, 0, None))
    for b in range(0, x.shape[0], batch_size):
        xb = x[b : b + batch_size].to(dev)
        inp = xb.reshape(xb.shape[0], *layer.input_shape)
        z_basis = torch.stack([functional_call(first, wm, (inp,)) for wm in w])  # [M, B, ...]
        z_all = torch.tensordot(coeffs.to(dev, z_basis.dtype), z_basis, dims=([1], [0]))  # [K, B, ...]
        for s in range(0, K, chunk):
            part = {k: stacked[k][s : s + chunk].to(dev) for k in rest_keys}
            if train_mode:  # BatchNorm would update the running statistics of the caller's tensors
                part = {k: v.clone() for k, v in part.items()}
            if chunk == 1:
                yield s, 1, b, run({k: v[0] for k, v in part.items()}, z_all[s], xb).unsqueeze(0)
            else:
                yield s, min(chunk, K - s), b, fv(part, z_all[s : s + chunk], xb)
