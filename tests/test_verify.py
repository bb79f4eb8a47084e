"""``reference.verify.verify_spec`` and ``python -m invariants check-model``.

The two invariants on one model (Eq. (1) of Ainsworth et al. 2023: f(P(θ), x) = f(θ, x) in eval and
train mode, float32 and float64; linearity: Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ) bit-exactly): correct specs of
zoo models and of models written here pass; wrong specs (a BatchNorm buffer left out, a residual
coupling forgotten, Q/K or head coupling forgotten, an output axis permuted, tied weights permuted
differently) fail, naming the group and the first divergence; the command's exit status is 0 / 1 / 2.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from invariants.__main__ import main
from reference.models import CNN1D, MLP, VGG, ResNet
from reference.permutation import PermutationSpec
from reference.specs import spec_for
from reference.verify import VerifyReport, default_tolerance, spec_coverage, verify_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --------------------------------------------------------------------------------------------
# models written outside the package (also written to a module file for the command's tests)
# --------------------------------------------------------------------------------------------
MYMODELS = textwrap.dedent(
    '''
    """A user's models and specs, outside the package."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from reference.permutation import PermutationSpec


    class Block(nn.Module):
        def __init__(self, width, hidden):
            super().__init__()
            self.fc1 = nn.Linear(width, hidden)
            self.fc2 = nn.Linear(hidden, width)

        def forward(self, x):
            return x + self.fc2(F.relu(self.fc1(x)))


    class ResMLP(nn.Module):
        """Linear -> BatchNorm -> ReLU, residual blocks, a Linear head."""

        def __init__(self, d_in=6, width=8, hidden=5, depth=2, classes=3):
            super().__init__()
            self.inp = nn.Linear(d_in, width)
            self.bn = nn.BatchNorm1d(width)
            self.blocks = nn.ModuleList(Block(width, hidden) for _ in range(depth))
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            x = F.relu(self.bn(self.inp(x)))
            for b in self.blocks:
                x = b(x)
            return self.head(x)


    def make(**kwargs):
        return ResMLP(**kwargs)


    def not_a_model():
        return 42


    class TokenNet(nn.Module):
        """Token ids [B, T] -> Embedding -> Linear -> mean over tokens -> head."""

        def __init__(self, vocab=7, dim=6, classes=3):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.fc = nn.Linear(dim, dim)
            self.head = nn.Linear(dim, classes)

        def forward(self, idx):
            return self.head(F.relu(self.fc(self.emb(idx))).mean(1))


    def token_spec(model):
        axes = {"emb.weight": (None, "E"), "fc.weight": ("H", "E"), "fc.bias": ("H",), "head.weight": (None, "H"),
                "head.bias": (None,)}
        return PermutationSpec.from_params(axes, model.state_dict())


    def _axes(model, split=False, bn_mean=True, head_rows=False):
        ax = {
            "inp.weight": ("S", None), "inp.bias": ("S",), "bn.weight": ("S",), "bn.bias": ("S",),
            "bn.running_mean": ("S" if bn_mean else None,), "bn.running_var": ("S",),
            "bn.num_batches_tracked": (),
        }
        s = "S"
        for i in range(len(model.blocks)):
            ax[f"blocks.{i}.fc1.weight"] = (f"H{i}", s)
            ax[f"blocks.{i}.fc1.bias"] = (f"H{i}",)
            out = f"S{i}" if split else s  # split: the residual coupling forgotten
            ax[f"blocks.{i}.fc2.weight"] = (out, f"H{i}")
            ax[f"blocks.{i}.fc2.bias"] = (out,)
            s = out
        ax["head.weight"] = ("OUT" if head_rows else None, s)
        ax["head.bias"] = ("OUT" if head_rows else None,)
        return PermutationSpec.from_params(ax, model.state_dict())


    def spec(model):
        return _axes(model)


    def spec_no_residual(model):
        return _axes(model, split=True)


    def spec_bn_mean(model):
        return _axes(model, bn_mean=False)


    def spec_head_rows(model):
        return _axes(model, head_rows=True)


    def spec_empty(model):
        return PermutationSpec.from_params({k: (None,) * v.ndim for k, v in model.state_dict().items()},
                                           model.state_dict())


    def spec_not_a_spec(model):
        return {"inp.weight": ("S", None)}
    '''
)


@pytest.fixture
def mymodels(tmp_path, monkeypatch):
    """``mymodels``: the module above, written to ``tmp_path`` (the current directory) and imported."""
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    importlib.invalidate_caches()
    yield importlib.import_module("mymodels")
    sys.modules.pop("mymodels", None)


class Attention(nn.Module):
    """Multi-head self-attention written by hand (q, k, v, out Linear), a residual stream, a head."""

    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(5, dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 5]
        h = self.inp(x)
        B, T, D = h.shape
        q, k, v = (m(h).view(B, T, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-2, -1) / (D // self.heads) ** 0.5, dim=-1) @ v
        h = h + self.out(a.transpose(1, 2).reshape(B, T, D))
        return self.head(self.norm(h).mean(1))


def attention_spec(model: Attention, qk: tuple[str, str] = ("QK", "QK"), heads: bool = True) -> PermutationSpec:
    q, k = qk
    d = model.q.out_features // model.heads
    axes = {
        "inp.weight": ("S", None), "inp.bias": ("S",),
        "q.weight": (q, "S"), "q.bias": (q,), "k.weight": (k, "S"), "k.bias": (k,),
        "v.weight": ("VO", "S"), "v.bias": ("VO",), "out.weight": ("S", "VO"), "out.bias": ("S",),
        "norm.weight": ("S",), "norm.bias": ("S",), "head.weight": (None, "S"), "head.bias": (None,),
    }  # fmt: skip
    groups = sorted({q, k, "VO"})
    return PermutationSpec.from_params(
        axes, model.state_dict(), dict.fromkeys(groups, d), dict.fromkeys(groups, "h") if heads else {}
    )


class TiedLM(nn.Module):
    """Token embedding tied to the output layer (two state_dict keys, one tensor), a residual MLP between."""

    def __init__(self, vocab: int = 7, dim: int = 6, hidden: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        return self.lm_head(h + self.fc2(F.relu(self.fc1(h))))


def tied_spec(model: TiedLM, head_axes: tuple = (None, "E")) -> PermutationSpec:
    axes = {
        "emb.weight": (None, "E"), "fc1.weight": ("H", "E"), "fc1.bias": ("H",), "fc2.weight": ("E", "H"),
        "fc2.bias": ("E",), "lm_head.weight": head_axes,
    }  # fmt: skip
    return PermutationSpec.from_params(axes, model.state_dict())


class DropoutMLP(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = F.dropout(h, 0.5, self.training) if self.functional else self.drop(h)
        return self.fc2(h)


def dropout_spec(model: DropoutMLP) -> PermutationSpec:
    axes = {"fc1.weight": ("H", None), "fc1.bias": ("H",), "fc2.weight": (None, "H"), "fc2.bias": (None,)}
    return PermutationSpec.from_params(axes, model.state_dict())


class Shift(nn.Module):
    """A parameter read directly in ``forward`` (added to the hidden units)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.shift = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x) + self.shift))


def shift_spec(model: Shift, shift: str | None = "H") -> PermutationSpec:
    axes = {"fc1.weight": ("H", None), "fc1.bias": ("H",), "fc2.weight": (None, "H"), "fc2.bias": (None,)}
    return PermutationSpec.from_params({**axes, "shift": (shift,)}, model.state_dict())


def assert_holds(report: VerifyReport, examples: int) -> None:
    assert report.ok, report.text()
    assert report.violations == []
    assert report.examples == examples
    assert report.checks and all(f"held {examples}/{examples}" in line for line in report.checks), report.checks


# --------------------------------------------------------------------------------------------
# correct specs hold
# --------------------------------------------------------------------------------------------
ZOO = [
    ("mlp", lambda: MLP(6, [5, 4], 3), (4, 6)),
    ("mlp-layernorm", lambda: MLP(6, [5, 4], 3, norm="layer"), (4, 6)),
    ("vgg1d-group", lambda: VGG(2, [4, "M", 6], 3, norm="group", groups=2, dims=1), (4, 2, 8)),
    ("cnn1d-batch", lambda: CNN1D(1, [4, 4], 3, norm="batch", kernel_size=3), (4, 12)),
    *[(f"resnet-{n}", lambda n=n: ResNet(3, 4, depth=8, base=2, norm=n), (4, 3, 8, 8)) for n in ("batch", "layer")],
    *[(f"resnet-{n}", lambda n=n: ResNet(3, 4, depth=8, base=4, norm=n), (4, 3, 8, 8)) for n in (None, "group")],
]


@pytest.mark.parametrize("name,make,shape", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_specs_hold(name, make, shape):
    torch.manual_seed(0)
    model = make()
    report = verify_spec(model, spec_for(model), torch.randn(shape), examples=3)
    assert_holds(report, 3)
    text = report.text()
    for part in ("hypothesis", "float32", "float64", "eval", "train", "bit-exact", "OK: both invariants held"):
        assert part in text, part
    if "batch" in name:
        assert "BatchNorm layer(s) randomised" in text and "train-mode buffer updates" in text


def test_user_model_and_attention_and_tied_weights_hold(mymodels):
    torch.manual_seed(0)
    m = mymodels.make()
    assert_holds(verify_spec(m, mymodels.spec(m), torch.randn(4, 6), examples=3), 3)
    att = Attention()
    assert_holds(verify_spec(att, attention_spec(att), torch.randn(3, 4, 5), examples=3), 3)
    lm = TiedLM()
    assert_holds(verify_spec(lm, tied_spec(lm), torch.randint(0, 7, (3, 5)), examples=3), 3)


def test_model_and_input_are_untouched():
    torch.manual_seed(0)
    model = ResNet(3, 4, depth=8, base=2, norm="batch").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    x0 = x.clone()
    verify_spec(model, spec_for(model), x, examples=2)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_deterministic_in_the_seed(mymodels):
    m = mymodels.make()
    x = torch.randn(4, 6)
    a = verify_spec(m, mymodels.spec_no_residual(m), x, examples=3, seed=5)
    b = verify_spec(m, mymodels.spec_no_residual(m), x, examples=3, seed=5)
    assert a.text() == b.text()


@settings(max_examples=2)
@given(width=st.integers(2, 4))
def test_usable_inside_a_hypothesis_test(width):
    """hypothesis refuses a nested @given: inside a property the draws come from random.Random."""
    m = MLP(4, [width], 2)
    report = verify_spec(m, spec_for(m), torch.randn(3, 4), examples=2, dtypes=(torch.float64,))
    assert_holds(report, 2)
    assert "random.Random" in report.tried


def test_integer_inputs_stay_in_the_vocabulary():
    """Token ids are drawn in [0, max(example) + 1): an id out of range would make nn.Embedding raise."""
    lm = TiedLM(vocab=7)
    report = verify_spec(lm, tied_spec(lm), torch.tensor([[0, 6, 3], [1, 2, 5]]), examples=5)
    assert_holds(report, 5)
    assert "int64" in report.tried


def test_dropout_is_off_in_train_mode_and_functional_dropout_skips_the_mode():
    m = DropoutMLP()
    assert_holds(verify_spec(m, dropout_spec(m), torch.randn(5, 4), examples=3), 3)
    m = DropoutMLP(functional=True)
    report = verify_spec(m, dropout_spec(m), torch.randn(5, 4), examples=3)
    assert report.ok and report.examples == 3
    assert any("train mode skipped" in n for n in report.notes), report.notes
    assert all(" eval " in line or " params " in line for line in report.checks), report.checks
    assert "train mode skipped" in report.text()
    with pytest.raises(ValueError, match="random seed in every mode"):
        verify_spec(m, dropout_spec(m), torch.randn(5, 4), examples=2, modes=("train",))


# --------------------------------------------------------------------------------------------
# wrong specs fail, naming the group and the first divergence
# --------------------------------------------------------------------------------------------
def test_batchnorm_running_mean_left_out_is_caught(mymodels):
    m = mymodels.make()
    report = verify_spec(m, mymodels.spec_bn_mean(m), torch.randn(4, 6), examples=3)
    assert not report.ok
    by = {(v.invariant, v.mode, v.dtype): v for v in report.violations}
    ev = by[("permutation", "eval", "float64")]
    assert ev.group == "S"
    assert "'bn' (BatchNorm1d)" in ev.first_divergence and "not on: bn.running_mean" in ev.first_divergence
    tr = by[("permutation", "train", "float64")]  # train mode: outputs agree, the updated running_mean does not
    assert tr.group == "S" and "buffer updates" in tr.detail and "'bn.running_mean'" in tr.first_divergence
    assert ("combination", "eval", "float32") in by
    text = report.text()
    assert "VIOLATION" in text and "responsible group: S" in text and "FAILED" in text


def test_forgotten_residual_coupling_is_caught(mymodels):
    m = mymodels.make()
    report = verify_spec(m, mymodels.spec_no_residual(m), torch.randn(4, 6), examples=3, dtypes=(torch.float64,))
    assert not report.ok
    modes = {v.mode for v in report.violations if v.invariant == "permutation"}
    assert modes == {"eval", "train"}
    v = report.violations[0]
    assert v.group == "S" and v.dtype == "float64"
    assert "'blocks.0' (Block)" in v.first_divergence and "not on: blocks.0.fc1.bias" in v.first_divergence


def test_permuted_output_axis_is_caught(mymodels):
    m = mymodels.make()
    report = verify_spec(m, mymodels.spec_head_rows(m), torch.randn(4, 6), examples=2, modes=("eval",))
    v = next(v for v in report.violations if v.invariant == "permutation")
    assert v.group == "OUT" and "reaches the output" in v.first_divergence


@pytest.mark.parametrize("mutant", ["no-head-class", "q-k-uncoupled"])
def test_attention_mutants_are_caught(mutant):
    """A spec that moves Q/K heads and V/out heads independently, or Q and K features independently."""
    torch.manual_seed(0)
    att = Attention()
    spec = attention_spec(att, heads=False) if mutant == "no-head-class" else attention_spec(att, qk=("Q", "K"))
    report = verify_spec(att, spec, torch.randn(3, 4, 5), examples=3, dtypes=(torch.float64,), modes=("eval",))
    assert not report.ok
    v = report.violations[0]
    assert v.invariant == "permutation"
    if mutant == "no-head-class":
        assert v.group in ("QK", "VO")
        assert "an operation in the forward of Attention" in v.first_divergence
    else:
        assert v.group in ("Q", "K") and "within its heads" in v.detail


def test_a_forgotten_parameter_read_in_forward_is_caught():
    torch.manual_seed(0)
    m = Shift()
    assert_holds(verify_spec(m, shift_spec(m), torch.randn(5, 4), examples=2), 2)
    report = verify_spec(m, shift_spec(m, shift=None), torch.randn(5, 4), examples=2, modes=("eval",))
    v = report.violations[0]
    assert v.group == "H"
    assert v.first_divergence.startswith(
        "the input of module 'fc2' (Linear), made by an operation in the forward of Shift"
    )
    assert "not on: shift" in v.first_divergence


def test_tied_weights_permuted_differently_are_caught():
    lm = TiedLM()
    report = verify_spec(lm, tied_spec(lm, head_axes=("V", "E")), torch.randint(0, 7, (3, 5)), examples=2)
    assert not report.ok
    v = report.violations[0]
    assert "tied" in v.detail and v.first_divergence == "key 'lm_head.weight'" and "V" in v.group


# --------------------------------------------------------------------------------------------
# nothing to check, bad arguments, coverage text
# --------------------------------------------------------------------------------------------
def test_a_spec_without_groups_checks_nothing_and_says_so(mymodels):
    m = mymodels.make()
    report = verify_spec(m, mymodels.spec_empty(m), torch.randn(4, 6))
    assert report.ok and report.examples == 0 and report.checks == []
    assert "no permutation groups: nothing to check" in report.text()


def test_bad_arguments_raise():
    m = MLP(6, [5], 3)
    spec, x = spec_for(m), torch.randn(4, 6)
    with pytest.raises(TypeError, match="nn.Module"):
        verify_spec("model", spec, x)
    with pytest.raises(TypeError, match="PermutationSpec"):
        verify_spec(m, {"a": 1}, x)
    with pytest.raises(TypeError, match="example_input"):
        verify_spec(m, spec, [1.0, 2.0])
    with pytest.raises(ValueError, match="examples"):
        verify_spec(m, spec, x, examples=0)
    with pytest.raises(ValueError, match="k_points"):
        verify_spec(m, spec, x, k_points=1)
    with pytest.raises(ValueError, match="floating"):
        verify_spec(m, spec, x, dtypes=(torch.int64,))
    with pytest.raises(TypeError, match="dtypes"):
        verify_spec(m, spec, x, dtypes=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        verify_spec(m, spec, x, modes=("test",))
    with pytest.raises(TypeError, match="modes"):
        verify_spec(m, spec, x, modes="eval")
    with pytest.raises(ValueError, match="tolerance"):
        verify_spec(m, spec, x, tolerances={torch.float64: -1.0})
    other = MLP(6, [7], 3)
    with pytest.raises(ValueError, match="does not fit"):
        verify_spec(m, spec_for(other), x)
    with pytest.raises(ValueError, match="forward of MLP"):
        verify_spec(m, spec, torch.randn(4, 5))  # the model's own forward fails on this input


def test_default_tolerances_and_spec_coverage():
    assert default_tolerance(torch.float64) == 1e-10 and default_tolerance(torch.float32) == 1e-4
    assert default_tolerance(torch.float32, "cuda") == 5e-3
    with pytest.raises(ValueError):
        default_tolerance(torch.int64)
    spec = PermutationSpec(
        {"w": ((("A", 2), ("B", 3)), None), "v": ("A",), "c": (None,)}, {"w": (5, 4), "v": (2,), "c": (3,)}, {"B": 3}
    )
    text = spec_coverage(spec)
    assert "w axis 0[0:2]" in text and "w axis 0[2:5]" in text and "B: 3 units (blocks of 3)" in text
    assert "1 tensor(s) not permuted: c" in text
    with pytest.raises(TypeError):
        spec_coverage({"w": ("A",)})


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
MLP_KWARGS = json.dumps({"in_features": 6, "widths": [5, 4], "num_classes": 3})


def test_command_on_a_zoo_mlp_with_a_given_spec(capsys):
    argv = ["check-model", "reference.models:MLP", "--input-shape", "6", "--kwargs", MLP_KWARGS,
            "--spec", "reference.specs:spec_for", "--examples", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "coverage (spec from reference.specs:spec_for)" in out and "layers.0.weight axis 0" in out
    assert "OK: both invariants held on 2 example(s)" in out


def test_command_on_a_zoo_resnet_with_a_traced_spec(capsys):
    kwargs = json.dumps({"in_channels": 3, "num_classes": 4, "depth": 8, "base": 2, "norm": "batch"})
    assert main(["check-model", "reference.models:ResNet", "--input-shape", "3,8,8", "--kwargs", kwargs,
                 "--examples", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "coverage (traced spec)" in out and "OK: both invariants held" in out


def test_command_on_a_user_module(mymodels, capsys):
    assert main(["check-model", "mymodels:make", "--input-shape", "6", "--examples", "2"]) == 0
    assert "OK: both invariants held" in capsys.readouterr().out
    assert main(["check-model", "mymodels:ResMLP", "--input-shape", "6", "--kwargs", '{"depth": 1}',
                 "--spec", "mymodels:spec", "--examples", "2"]) == 0  # fmt: skip
    capsys.readouterr()


def test_command_on_token_inputs(mymodels, capsys):
    argv = ["check-model", "mymodels:TokenNet", "--input-shape", "5", "--input-dtype", "long", "--vocab", "7",
            "--spec", "mymodels:token_spec", "--examples", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "input [4, 5] long" in out and "int64" in out and "OK: both invariants held" in out
    assert main([*argv[:7], "8", *argv[8:]]) == 2  # ids up to 7: out of the embedding's range
    assert "forward of TokenNet" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec_fn,expect",
    [("spec_bn_mean", "not on: bn.running_mean"), ("spec_no_residual", "'blocks.0' (Block)")],
)
def test_command_exits_1_on_a_wrong_spec(mymodels, capsys, spec_fn, expect):
    argv = ["check-model", "mymodels:make", "--input-shape", "6", "--spec", f"mymodels:{spec_fn}", "--examples", "2"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "VIOLATION" in out and "responsible group: S" in out and expect in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["nocolon", "--input-shape", "6"], "must be 'pkg.module:name'"),
        (["no_such_module_xyz:f", "--input-shape", "6"], "cannot import module"),
        (["reference.models:Nope", "--input-shape", "6"], "has no attribute"),
        (["reference.models:NORMS", "--input-shape", "6"], "not a callable"),
        (["mymodels:not_a_model", "--input-shape", "6"], "expected an nn.Module"),
        (["mymodels:make", "--input-shape", "6", "--kwargs", "{bad json"], "not valid JSON"),
        (["mymodels:make", "--input-shape", "6", "--kwargs", "[1]"], "JSON object"),
        (["mymodels:make", "--input-shape", "6", "--kwargs", '{"nope": 1}'], "raised TypeError"),
        (["mymodels:make", "--input-shape", "6", "--input-dtype", "long"], "needs --vocab"),
        (["mymodels:make", "--input-shape", "6", "--vocab", "3"], "integer --input-dtype only"),
        (["mymodels:make", "--input-shape", "6", "--spec", "mymodels:spec_not_a_spec"], "expected a PermutationSpec"),
        (["mymodels:make", "--input-shape", "6", "--spec", "mymodels:spec_empty"], "nothing was checked"),
        (["mymodels:make", "--input-shape", "6", "--spec", "mymodels:not_a_model"], "raised TypeError"),
        (["mymodels:make", "--input-shape", "6", "--examples", "0"], "examples"),
        (["mymodels:make", "--input-shape", "5"], "tracing ResMLP failed"),  # the input does not fit the model
    ],
)
def test_command_exits_2_on_usage_and_setup_errors(mymodels, capsys, args, message):
    assert main(["check-model", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["mymodels:make"],
        ["mymodels:make", "--input-shape", "3,x"],
        ["mymodels:make", "--input-shape", "0"],
        ["mymodels:make", "--input-shape", "6", "--input-dtype", "float16"],
    ],
)
def test_command_argparse_errors_exit_2(mymodels, capsys, args):
    assert main(["check-model", *args]) == 2
    assert "usage:" in capsys.readouterr().err


def test_command_reports_tracing_errors(mymodels, capsys, monkeypatch):
    import reference.trace

    def broken(model, x, strict=True):
        raise ValueError(f"unsupported operation (strict={strict})")

    monkeypatch.setattr(reference.trace, "trace_report", broken)
    assert main(["check-model", "mymodels:make", "--input-shape", "6"]) == 2
    err = capsys.readouterr().err
    assert "tracing ResMLP failed: unsupported operation (strict=True)" in err and "--no-strict" in err
    assert main(["check-model", "mymodels:make", "--input-shape", "6", "--no-strict"]) == 2
    assert "(strict=False)" in capsys.readouterr().err


def test_command_help_exits_0(capsys):
    assert main(["check-model", "--help"]) == 0
    assert "--input-shape" in capsys.readouterr().out
