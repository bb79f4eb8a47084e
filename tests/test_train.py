"""Tests of reference/train.py: K-at-once training equals K sequential trains; torch.optim parity;
determinism; no mutation; divergence guard; device selection."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_nets import bn_mlp, relu_mlp
from torch import Tensor, nn
from torch.func import functional_call

from reference.params import Params
from reference.train import TrainConfig, lr_schedule, pick_device, train, train_many

D_IN, N_CLS, N = 10, 3, 256


def mlp() -> nn.Module:
    return relu_mlp(D_IN, [32], N_CLS)


def bn_net(momentum: float | None = 0.1) -> nn.Module:
    # No bias before BatchNorm (as usual): its true gradient is 0, so Adam's m/√v would turn the
    # rounding noise of that gradient into lr-sized steps that differ between batched and sequential
    # kernels in float32 (observed: 2e-3 apart after 3 epochs; every other key within 1e-7).
    return bn_mlp(D_IN, [32], N_CLS, momentum, bias=False)


ARCHS = {"mlp": mlp, "bn": bn_net}


def init_points(make, K: int, dtype: torch.dtype = torch.float32) -> list[Params]:
    """K independent initialisations as state_dict-keyed Params (integer buffers keep their dtype)."""
    pts = []
    for k in range(K):
        torch.manual_seed(100 + k)
        sd = make().state_dict()
        pts.append({n: (v.to(dtype) if v.is_floating_point() else v).clone() for n, v in sd.items()})
    return pts


def data(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A learnable task: labels of a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    w = torch.randn(D_IN, N_CLS, generator=g, dtype=torch.float64)
    return x.to(dtype), (x @ w).argmax(1)


def assert_points_close(a: Params, b: Params, **tol) -> None:
    assert list(a) == list(b)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"key {k!r}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"integer buffer {k!r}: {a[k]} vs {b[k]}"


# batch 48 on 256 examples: 5 full minibatches and a kept last one of 16
CFG = TrainConfig(epochs=3, batch_size=48, lr=0.05, weight_decay=5e-4)


@pytest.mark.parametrize("arch", ["mlp", "bn"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_many_equals_sequential_float64(arch: str, optimizer: str) -> None:
    """train_many(θ₁..θ_K, s₁..s_K)[k] = train(θ_k, s_k), parameters and BN buffers (float64)."""
    make = ARCHS[arch]
    cfg = dataclasses.replace(CFG, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    x, y = data(torch.float64)
    pts = init_points(make, 3, torch.float64)
    seeds = [0, 1, 2]
    many = train_many(make().double(), pts, x, y, cfg, seeds, device="cpu", progress=False, strategy="vmap")
    for p, s, got in zip(pts, seeds, many, strict=True):
        one = train(make().double(), p, x, y, cfg, s, device="cpu", progress=False)
        assert_points_close(got, one, rtol=1e-9, atol=1e-12)
    if arch == "bn":
        steps = cfg.epochs * cfg.steps_per_epoch(N)
        assert [int(m["1.num_batches_tracked"]) for m in many] == [steps] * 3
        assert not torch.equal(many[0]["1.running_mean"], pts[0]["1.running_mean"])


@pytest.mark.parametrize("arch", ["mlp", "bn"])
def test_train_many_equals_sequential_float32_all_options(arch: str) -> None:
    """Same in float32 with every option on (AdamW, warmup+cosine, clipping, smoothing, drop_last)."""
    make = ARCHS[arch]
    cfg = TrainConfig(
        epochs=3, batch_size=48, lr=3e-3, weight_decay=1e-2, optimizer="adamw", schedule="cosine",
        warmup_frac=0.2, label_smoothing=0.1, grad_clip=0.5, drop_last=True,
    )  # fmt: skip
    x, y = data()
    pts = init_points(make, 2)
    many = train_many(make(), pts, x, y, cfg, [3, 4], device="cpu", progress=False, strategy="vmap")
    for p, s, got in zip(pts, [3, 4], many, strict=True):
        one = train(make(), p, x, y, cfg, s, device="cpu", progress=False)
        assert_points_close(got, one, rtol=1e-4, atol=1e-5)


def _torch_optim_reference(make, p: Params, x: Tensor, y: Tensor, cfg: TrainConfig, seed: int) -> Params:
    """The textbook loop: a module, torch.optim, the same data order."""
    model = make().double()
    model.load_state_dict(p)
    model.train()
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt = {
        "sgd": lambda: torch.optim.SGD(model.parameters(), momentum=cfg.momentum, foreach=False, **kw),
        "adam": lambda: torch.optim.Adam(model.parameters(), betas=cfg.betas, foreach=False, **kw),
        "adamw": lambda: torch.optim.AdamW(model.parameters(), betas=cfg.betas, foreach=False, **kw),
    }[cfg.optimizer]()
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for idx in order.split(cfg.batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_matches_torch_optim(optimizer: str) -> None:
    """Our optimizer steps equal torch.optim.{SGD, Adam, AdamW} (float64, BatchNorm net)."""
    cfg = dataclasses.replace(CFG, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    x, y = data(torch.float64)
    (p,) = init_points(bn_net, 1, torch.float64)
    ours = train(bn_net().double(), p, x, y, cfg, seed=7, device="cpu", progress=False)
    ref = _torch_optim_reference(bn_net, p, x, y, cfg, seed=7)
    assert_points_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_step_is_bit_identical_to_the_per_tensor_step(optimizer: str, dtype: torch.dtype) -> None:
    """``opt_step_(..., foreach=True)`` (one ``torch._foreach_*`` call per operation) gives the same bits as
    the per-tensor loop, with and without weight decay and momentum, on single and K-stacked tensors."""
    from reference.optim import opt_step_

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 7, 5), (4, 7), (4, 3, 2, 2), (4,)]
    for wd, momentum in ((0.0, 0.9), (1e-2, 0.0), (5e-3, 0.5)):
        cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, optimizer=optimizer, weight_decay=wd, momentum=momentum)
        init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        runs = {}
        for foreach in (False, True):
            ps, state = [t.clone() for t in init], [{} for _ in init]
            gg = torch.Generator().manual_seed(1)
            for step in range(1, 6):
                grads = [torch.randn(s, generator=gg, dtype=dtype) for s in shapes]
                opt_step_(cfg, ps, grads, state, lr=0.1 / step, step=step, foreach=foreach)
            runs[foreach] = (ps, state)
        for a, b in zip(runs[False][0], runs[True][0], strict=True):
            assert torch.equal(a, b)
        for sa, sb in zip(runs[False][1], runs[True][1], strict=True):
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="one of each"):
        opt_step_(cfg, [torch.zeros(2)], [torch.zeros(2)] * 2, [{}], lr=0.1, step=1, foreach=True)


def test_deterministic_and_seed_dependent() -> None:
    x, y = data()
    (p,) = init_points(bn_net, 1)
    a = train(bn_net(), p, x, y, CFG, seed=5, device="cpu", progress=False)
    b = train(bn_net(), p, x, y, CFG, seed=5, device="cpu", progress=False)
    c = train(bn_net(), p, x, y, CFG, seed=6, device="cpu", progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    m1 = train_many(bn_net(), [p, p], x, y, CFG, [5, 6], device="cpu", progress=False)
    m2 = train_many(bn_net(), [p, p], x, y, CFG, [5, 6], device="cpu", progress=False)
    assert all(torch.equal(u[k], v[k]) for u, v in zip(m1, m2, strict=True) for k in u)
    assert not torch.equal(m1[0]["0.weight"], m1[1]["0.weight"])


def test_dropout_is_seeded() -> None:
    """Dropout masks come from the RNG seeded per call: reproducible, and the K models differ."""

    def drop_net() -> nn.Module:
        return nn.Sequential(nn.Linear(D_IN, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, N_CLS))

    x, y = data()
    (p,) = init_points(drop_net, 1)
    a = train(drop_net(), p, x, y, CFG, seed=1, device="cpu", progress=False)
    b = train(drop_net(), p, x, y, CFG, seed=1, device="cpu", progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    m1 = train_many(drop_net(), [p, p], x, y, CFG, [1, 1], device="cpu", progress=False, strategy="vmap")
    m2 = train_many(drop_net(), [p, p], x, y, CFG, [1, 1], device="cpu", progress=False, strategy="vmap")
    assert all(torch.equal(u[k], v[k]) for u, v in zip(m1, m2, strict=True) for k in u)
    assert not torch.equal(m1[0]["0.weight"], m1[1]["0.weight"]), "same seed, different masks"


def test_inputs_module_and_global_rng_untouched() -> None:
    x, y = data()
    pts = init_points(bn_net, 2)
    model = bn_net().eval()
    before = [{k: v.clone() for k, v in p.items()} for p in pts]
    x0, y0 = x.clone(), y.clone()
    module_sd = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = train(model, pts[0], x, y, CFG, seed=0, device="cpu", progress=False)
    train_many(model, pts, x, y, CFG, [0, 1], device="cpu", progress=False)
    for p, q in zip(pts, before, strict=True):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(torch.equal(v, module_sd[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules()), "train mode must be restored"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(v.device.type == "cpu" for v in out.values())
    assert out["1.num_batches_tracked"].dtype == torch.long


def _loss(model: nn.Module, p: Params, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(model, p, (x,)), y))


@pytest.mark.parametrize("arch", ["mlp", "bn"])
def test_loss_decreases(arch: str) -> None:
    make = ARCHS[arch]
    x, y = data()
    pts = init_points(make, 2)
    cfg = TrainConfig(epochs=8, batch_size=32, lr=0.05, schedule="linear", warmup_frac=0.1)
    trained = train_many(make(), pts, x, y, cfg, [0, 1], device="cpu", progress=False)
    for p, q in zip(pts, trained, strict=True):
        assert _loss(make(), q, x, y) < 0.5 * _loss(make(), p, x, y)


def test_divergence_raises_helpful_error() -> None:
    x, y = data()
    pts = init_points(mlp, 2)
    cfg = dataclasses.replace(CFG, lr=1e6)
    with pytest.raises(ValueError, match=r"diverged.*epoch \d+/3, step \d+/6.*lower learning rate"):
        train(mlp(), pts[0], x, y, cfg, seed=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"diverged.*model \d of 2, seed \d.*lower learning rate"):
        train_many(mlp(), pts, x, y, cfg, [0, 1], device="cpu", progress=False)


def test_progress_bar_shows_loss(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = data()
    (p,) = init_points(mlp, 1)
    train(mlp(), p, x, y, dataclasses.replace(CFG, epochs=1), seed=0, device="cpu", progress=True)
    assert "loss=" in capsys.readouterr().err


def test_input_errors() -> None:
    x, y = data()
    (p,) = init_points(bn_net, 1)
    with pytest.raises(ValueError, match="missing"):
        train(bn_net(), {k: v for k, v in p.items() if k != "1.running_var"}, x, y, CFG, 0, "cpu", False)
    with pytest.raises(ValueError, match="number of examples"):
        train(bn_net(), p, x[:10], y, CFG, 0, "cpu", False)
    with pytest.raises(ValueError, match="integer tensor of class indices"):
        train(bn_net(), p, x, y.float(), CFG, 0, "cpu", False)
    with pytest.raises(ValueError, match="one seed each"):
        train_many(bn_net(), [p, p], x, y, CFG, [0], "cpu", False)
    with pytest.raises(ValueError, match="momentum=None"):
        train_many(bn_net(momentum=None), [p], x, y, CFG, [0], "cpu", False, strategy="vmap")
    with pytest.raises(ValueError, match="unknown strategy"):
        train_many(bn_net(), [p], x, y, CFG, [0], "cpu", False, strategy="threads")
    # the cumulative-average BatchNorm is fine without vmap, and "auto" trains it one model at a time
    out = train(bn_net(momentum=None), p, x, y, CFG, 0, "cpu", False)
    assert int(out["1.num_batches_tracked"]) == CFG.epochs * CFG.steps_per_epoch(N)
    (auto,) = train_many(bn_net(momentum=None), [p], x, y, CFG, [0], "cpu", False)
    assert all(torch.equal(auto[k], out[k]) for k in out)


def test_train_many_strategy_auto_and_sequential() -> None:
    """``strategy="sequential"`` is K calls of ``train``, exactly; ``"auto"`` takes vmap for a small MLP and
    sequential for a wide one or a convolution on the CPU (by FLOPs, never by a timing), and says which."""
    from reference.models import CNN1D, MLP, init_params
    from reference.train import choose_strategy

    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    cfg = TrainConfig.adam(1, batch_size=16)
    small = MLP(16, [8], 3)
    pts = [init_params(small, s) for s in (0, 1)]
    seq = train_many(small, pts, x, y, cfg, [0, 1], "cpu", False, strategy="sequential")
    for got, p, s in zip(seq, pts, [0, 1], strict=True):
        want = train(small, p, x, y, cfg, s, "cpu", False)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert choose_strategy(small, pts[0], x, cfg, "cpu") == "vmap"
    wide = MLP(16, [2048, 2048], 3)
    assert choose_strategy(wide, init_params(wide, 0), x, TrainConfig.adam(1, batch_size=64), "cpu") == "sequential"
    conv = CNN1D(1, (4,), 3)
    assert choose_strategy(conv, init_params(conv, 0), torch.randn(8, 1, 40), cfg, "cpu") == "sequential"
    # the thread count of the training decides, given or this process's: 19 MFLOP per step is vmap with 2
    # threads (< 30), sequential with 1 (>= 0.6)
    mid, cfg256 = MLP(64, [512], 10), TrainConfig.adam(1, batch_size=256)
    xm = torch.randn(300, 64)
    assert choose_strategy(mid, init_params(mid, 0), xm, cfg256, "cpu", threads=2) == "vmap"
    assert choose_strategy(mid, init_params(mid, 0), xm, cfg256, "cpu", threads=1) == "sequential"
    with pytest.raises(ValueError, match="threads"):
        choose_strategy(mid, init_params(mid, 0), xm, cfg256, "cpu", threads=0)
    # a cumulative BatchNorm (momentum=None) cannot run under vmap: sequential on every device
    cum = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8, momentum=None), nn.Linear(8, 3))
    assert choose_strategy(cum, init_params(cum, 0), x, cfg, "cpu") == "sequential"


def test_config_validation_and_provenance() -> None:
    assert TrainConfig(**CFG.asdict()) == CFG
    assert CFG.asdict()["optimizer"] == "sgd"
    for bad in (dict(optimizer="rmsprop"), dict(schedule="step"), dict(lr=-1.0), dict(epochs=0),
                dict(momentum=1.0), dict(grad_clip=0.0), dict(label_smoothing=1.0)):  # fmt: skip
        with pytest.raises(ValueError):
            dataclasses.replace(CFG, **bad)
    assert CFG.steps_per_epoch(256) == 6
    assert dataclasses.replace(CFG, drop_last=True).steps_per_epoch(256) == 5


def test_lr_schedule() -> None:
    """Warmup ramps to lr; cosine and linear decay towards 0; constant stays."""
    c = TrainConfig(epochs=1, batch_size=1, lr=1.0, schedule="cosine", warmup_frac=0.1)
    lrs = [lr_schedule(c, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and 0 < lrs[-1] < 1e-3
    lin = dataclasses.replace(c, schedule="linear", warmup_frac=0.0)
    assert lr_schedule(lin, 50, 100) == pytest.approx(0.5)
    assert lr_schedule(dataclasses.replace(c, schedule="constant"), 99, 100) == 1.0


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    """Training on CUDA gives the CPU result within float32 tolerance (same data order by design)."""
    x, y = data()
    pts = init_points(bn_net, 2)
    cpu = train_many(bn_net(), pts, x, y, CFG, [0, 1], device="cpu", progress=False)
    gpu = train_many(bn_net(), pts, x, y, CFG, [0, 1], device="cuda", progress=False)
    one = train(bn_net(), pts[0], x, y, CFG, 0, device="cuda", progress=False)
    for a, b in zip(cpu, gpu, strict=True):
        assert all(v.device.type == "cpu" for v in b.values())
        assert_points_close(a, b, rtol=1e-3, atol=1e-4)
    assert_points_close(one, cpu[0], rtol=1e-3, atol=1e-4)


def test_raise_if_diverged_names_epoch_step_and_hint():
    from reference.train import raise_if_diverged

    raise_if_diverged(torch.tensor([1.0, 0.5]), what="FGE", at="epoch 1/2", context="(seed 0)", hint="h")
    with pytest.raises(ValueError, match=r"^SPRO diverged: loss is nan at vertex 1/2, epoch 3/5, step 2/3 \(seed 7\); "
                                         r"try less$"):
        raise_if_diverged(torch.tensor([1.0, float("nan"), 2.0]), what="SPRO", at="vertex 1/2, epoch 3/5",
                          context="(seed 7)", hint="try less")
