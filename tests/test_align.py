"""``python -m repro align`` (repro/align.py): the suite on two checkpoints of one's own model.

End to end on a zoo MLP (weight / activation / STE), on a model defined outside the package and saved as
``.safetensors`` (with and without BatchNorm), and on a zoo ViT: the output set is written, the aligned B
computes B's function (Eq. (1) of Ainsworth et al. 2023: f(P(θ), x) = f(θ, x)), the barriers are finite.
Refusals exit 2 with one line on stderr and leave the inputs' bytes as they were.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from reference.checkpoint import save_checkpoint
from reference.data import load_digits
from reference.models import MLP, build_model, init_params
from reference.permutation import Permutation
from reference.specs import spec_for
from reference.train import TrainConfig, train
from repro.__main__ import main
from repro.align import OUTPUTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MLP_KW = {"in_features": 64, "widths": [16, 16], "num_classes": 10}

MYNET = textwrap.dedent('''
    """A residual MLP with a LayerNorm'd stream, defined outside the package."""
    import torch
    from torch import nn


    class ResMLP(nn.Module):
        def __init__(self, d_in, width, depth, n_cls, bn):
            super().__init__()
            self.inp = nn.Linear(d_in, width)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width) if bn else nn.Identity(), nn.ReLU(),
                              nn.Linear(width, width))
                for _ in range(depth))
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, n_cls)

        def forward(self, x):
            h = self.inp(x.flatten(1))
            for block in self.blocks:
                h = h + block(h)
            return self.head(torch.relu(self.norm(h)))


    def make(d_in=64, width=16, depth=2, n_cls=10, bn=False):
        return ResMLP(d_in, width, depth, n_cls, bn)
''')


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _align(capsys, *args) -> tuple[int, str, str]:
    rc = main(["align", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _logits(model, params, x):
    model.eval()
    with torch.no_grad():
        return functional_call(model, params, (x,))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def mlp_pair(tmp_path_factory, digits):
    """Two MLPs 64-16-16-10 trained 2 epochs on digits: A as a modeconn checkpoint, B as ``{"state_dict": ...}``."""
    d = tmp_path_factory.mktemp("mlp_pair")
    model = MLP(**MLP_KW)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-3, optimizer="adam")
    a, b = (
        train(model, init_params(model, s), digits.x_train, digits.y_train, cfg, seed=s, progress=False) for s in (1, 2)
    )
    save_checkpoint(d / "A.pt", a, model_config=model.config)
    torch.save({"state_dict": b, "epoch": 2}, d / "B.pt")
    return d, model, a, b


def _cli(model: str, kwargs: dict | None, a, b, out, method: str, *extra, grid: int = 7, data="digits") -> list:
    """The arguments of one ``repro align`` run on the CPU (``kwargs=None``: no ``--model-kwargs``)."""
    kw = [] if kwargs is None else ["--model-kwargs", json.dumps(kwargs)]
    return ["--model", model, *kw, "--a", a, "--b", b, "--method", method, "--data", data, "--out", out,
            "--grid", grid, "--device", "cpu", *extra]


def _mlp_args(d: Path, out: Path, method: str, *extra) -> list:
    return _cli("zoo:mlp", MLP_KW, d / "A.pt", d / "B.pt", out, method, "--no-progress", *extra)


@pytest.mark.parametrize("method", ["weight", "activation", "ste"])
def test_zoo_mlp_end_to_end(capsys, tmp_path, mlp_pair, digits, method):
    d, model, a, b = mlp_pair
    before = {p.name: _sha(p) for p in (d / "A.pt", d / "B.pt")}
    out = tmp_path / "out"
    extra = ("--ste-steps", 4, "--ste-batch", 128) if method == "ste" else ()
    rc, stdout, err = _align(capsys, *_mlp_args(d, out, method, *extra))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no .safetensors: B was a .pt
    assert not (tmp_path / ".staging").exists() and not (tmp_path / ".old").exists()

    # the aligned B is a plain state_dict computing B's function; permutation.json is its permutation
    b_al = torch.load(out / "b_aligned.pt", weights_only=True)
    assert set(b_al) == set(b)
    x = digits.x_test
    torch.testing.assert_close(_logits(model, b_al, x), _logits(model, b, x), atol=1e-5, rtol=1e-5)
    spec = spec_for(model)
    perm = Permutation.from_json((out / "permutation.json").read_text(), spec)
    for k, v in perm.apply(spec, b).items():
        assert torch.equal(v, b_al[k]), k

    s = json.loads((out / "summary.json").read_text())
    assert s["command"] == "align" and s["method"] == method and s["model_class"] == "MLP"
    assert s["spec_source"].startswith("hand-written") and s["groups"] == 2 and s["grid"] == 7
    assert s["bn_reset"] == {"applied": False}
    assert s["function_check"]["ok"] and s["function_check"]["max_abs_diff"] < 1e-4
    assert s["moved_units"] == sum(perm.num_moved().values())
    for path in ("naive", "aligned"):
        names = {f"{sp}_{m}_{k}" for sp in ("train", "test") for m in ("loss", "error") for k in ("max_chord", "mid")}
        assert set(s["barriers"][path]) == names
        assert all(math.isfinite(v["value"]) for v in s["barriers"][path].values())
    obj = s["objective"]
    if method == "ste":  # a loss, never worse than its start (weight matching) by construction
        assert obj["value"] <= obj["initial"]
    else:  # both start from (or compare with) the identity and never end below it
        assert obj["value"] >= obj["identity"]
    # the endpoints: A at t=0 on both paths; P(θ_B) and θ_B at t=1 compute the same function
    for k in ("train_loss", "test_error"):
        assert s["endpoints"]["b_aligned"][k] == pytest.approx(s["endpoints"]["b"][k], abs=1e-4)

    with (out / "path.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14 and {r["path"] for r in rows} == {"naive", "aligned"}
    assert set(rows[0]) == {"path", "t", "train_loss", "train_error", "test_loss", "test_error"}
    naive0 = next(r for r in rows if r["path"] == "naive" and float(r["t"]) == 0.0)
    aligned0 = next(r for r in rows if r["path"] == "aligned" and float(r["t"]) == 0.0)
    assert naive0["train_loss"] == aligned0["train_loss"]
    assert (out / "path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "P_0: 16 units" in (out / "coverage.txt").read_text()

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["inputs"]["a"]["sha256"] == before["A.pt"] and prov["inputs"]["a"]["format"] == "modeconn"
    assert prov["inputs"]["b"]["sha256"] == before["B.pt"] and prov["inputs"]["b"]["format"] == "torch"
    assert prov["command"].startswith("python -m repro align --model zoo:mlp")
    assert prov["versions"]["torch"] and prov["versions"]["safetensors"] and prov["data"]["name"] == "digits"
    assert {p.name: _sha(p) for p in (d / "A.pt", d / "B.pt")} == before

    # a second run may replace its own earlier output set
    rc, _, err = _align(capsys, *_mlp_args(d, out, "weight"))
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["method"] == "weight"


@pytest.mark.parametrize("bn", [False, True], ids=["layernorm", "batchnorm"])
def test_model_outside_the_package_as_safetensors(capsys, tmp_path, monkeypatch, digits, bn):
    import safetensors.torch

    (tmp_path / "mynet.py").write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    path_before = list(sys.path)
    sys.path.insert(0, str(tmp_path))
    try:
        import mynet

        model = mynet.make(bn=bn)
    finally:
        sys.path[:] = path_before
        sys.modules.pop("mynet", None)
    for name, seed in (("A", 1), ("B", 2)):
        p = init_params(model, seed)
        if bn:  # non-trivial running statistics: the function check then covers the permuted buffers
            g = torch.Generator().manual_seed(seed)
            p = {k: torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var") else v for k, v in p.items()}
        safetensors.torch.save_file({k: v.contiguous() for k, v in p.items()}, tmp_path / f"{name}.safetensors")
    before = {n: _sha(tmp_path / f"{n}.safetensors") for n in "AB"}
    rc, _, err = _align(capsys, *_cli("mynet:make", {"bn": bn}, "A.safetensors", "B.safetensors", "aligned", "weight",
                                      grid=5))
    assert rc == 0, err
    assert sys.path == path_before and "mynet" in sys.modules  # the cwd was on sys.path for the import only
    sys.modules.pop("mynet", None)
    out = tmp_path / "aligned"
    assert sorted(p.name for p in out.iterdir()) == sorted((*OUTPUTS, "b_aligned.safetensors"))
    from_st = safetensors.torch.load_file(out / "b_aligned.safetensors")
    from_pt = torch.load(out / "b_aligned.pt", weights_only=True)
    assert set(from_st) == set(from_pt) and all(torch.equal(from_st[k], from_pt[k]) for k in from_pt)
    b = safetensors.torch.load_file(tmp_path / "B.safetensors")
    torch.testing.assert_close(
        _logits(model, from_st, digits.x_test), _logits(model, b, digits.x_test), atol=1e-5, rtol=1e-5
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["spec_source"].startswith("traced") and s["groups"] == 3 and s["moved_units"] > 0
    assert s["bn_reset"]["applied"] is bn and s["function_check"]["ok"]
    assert all(math.isfinite(v["value"]) for p in s["barriers"].values() for v in p.values())
    cov = (out / "coverage.txt").read_text()
    assert "norm.weight" in cov and "blocks.1.3.weight" in cov
    assert {n: _sha(tmp_path / f"{n}.safetensors") for n in "AB"} == before


def test_zoo_vit_end_to_end(capsys, tmp_path, digits):
    kw = {"image_size": 8, "patch": 2, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2, "num_classes": 10}
    model = build_model({"name": "vit", **kw})
    for name, seed in (("A", 1), ("B", 2)):
        torch.save(init_params(model, seed), tmp_path / f"{name}.pt")
    b = torch.load(tmp_path / "B.pt", weights_only=True)
    spec = spec_for(model)
    assert spec.heads, "the ViT spec couples its attention heads"
    for method in ("weight", "activation"):
        out = tmp_path / f"out_{method}"
        rc, _, err = _align(capsys, *_cli("zoo:vit", kw, tmp_path / "A.pt", tmp_path / "B.pt", out, method,
                                          "--max-examples", 400, grid=3))
        assert rc == 0, err
        b_al = torch.load(out / "b_aligned.pt", weights_only=True)
        torch.testing.assert_close(
            _logits(model, b_al, digits.x_test), _logits(model, b, digits.x_test), atol=1e-5, rtol=1e-5
        )
        perm = Permutation.from_json((out / "permutation.json").read_text(), spec)  # heads move as wholes
        assert perm.apply(spec, b).keys() == b_al.keys()
        s = json.loads((out / "summary.json").read_text())
        assert s["function_check"]["ok"] and s["data"]["num_train"] == 400
        assert "head class" in (out / "coverage.txt").read_text()


# ---------------------------------------------------------------------------------------------
# refusals: exit 2, one line on stderr, inputs untouched, nothing written


def _refused(capsys, d: Path, out: Path, *args) -> str:
    files = sorted(p for p in d.rglob("*") if p.is_file())
    before = {p: _sha(p) for p in files}
    rc, _, err = _align(capsys, *args)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert {p: _sha(p) for p in files} == before
    assert not out.exists()
    return err


def test_refuses_mismatched_architectures(capsys, tmp_path, mlp_pair):
    d, *_ = mlp_pair
    wide = MLP(64, [24, 16], 10)
    torch.save(init_params(wide, 3), tmp_path / "B.pt")
    args = _mlp_args(d, tmp_path / "out", "weight")
    args[args.index("--b") + 1] = tmp_path / "B.pt"
    err = _refused(capsys, tmp_path, tmp_path / "out", *args)
    assert "different architectures" in err and "A fits the model" in err
    assert "'layers.0.weight' B (24, 64) vs A (16, 64)" in err and "'layers.1.weight' B (16, 24) vs A (16, 16)" in err
    # keys missing / unexpected
    b = dict(init_params(MLP(**MLP_KW), 3))
    b["extra.weight"] = b.pop("head.bias")
    torch.save(b, tmp_path / "B.pt")
    err = _refused(capsys, tmp_path, tmp_path / "out", *args)
    assert "missing keys ['head.bias']" in err and "unexpected keys ['extra.weight']" in err
    # A and B agree with each other but not with the model that --model-kwargs builds
    args[args.index("--model-kwargs") + 1] = json.dumps({**MLP_KW, "widths": [16, 8]})
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--b", d / "B.pt"))
    assert "A and B agree with each other" in err and "'layers.1.weight' A (16, 16) vs model (8, 16)" in err


def _with(args: list, flag: str, value) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_refuses_non_finite_and_corrupt_checkpoints(capsys, tmp_path, mlp_pair):
    d, _, _, b = mlp_pair
    args = _mlp_args(d, tmp_path / "out", "weight")
    bad = {k: v.clone() for k, v in b.items()}
    bad["layers.1.weight"][3, 2] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    err = _refused(capsys, tmp_path, tmp_path / "out", *_with(args, "--b", tmp_path / "nan.pt"))
    assert "nan.pt" in err and "'layers.1.weight' holds 1 non-finite" in err
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02not a torch file at all" * 10)
    err = _refused(capsys, tmp_path, tmp_path / "out", *_with(args, "--b", tmp_path / "corrupt.pt"))
    assert f"checkpoint B: checkpoint {tmp_path / 'corrupt.pt'} is corrupt" in err
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    err = _refused(capsys, tmp_path, tmp_path / "out", *_with(args, "--a", tmp_path / "corrupt.safetensors"))
    assert f"checkpoint A {tmp_path / 'corrupt.safetensors'} is corrupt" in err
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pt")
    err = _refused(capsys, tmp_path, tmp_path / "out", *_with(args, "--b", tmp_path / "empty.pt"))
    assert "is not a state_dict" in err
    err = _refused(capsys, tmp_path, tmp_path / "out", *_with(args, "--b", tmp_path / "missing.pt"))
    assert "missing.pt does not exist" in err


def test_refuses_out_at_an_input_and_bad_usage(capsys, tmp_path, mlp_pair):
    d, *_ = mlp_pair
    args = _mlp_args(d, tmp_path / "out", "weight")
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--out", d / "B.pt"))
    assert "is an input (--a, --b or --data)" in err
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--data", tmp_path))
    assert "neither the MNIST IDX files" in err and "nor the CIFAR-10 python batches" in err
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--out", d))
    assert f"contains the input {d / 'A.pt'}" in err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--out", tmp_path / "notes"))
    assert "not an earlier align output" in err and (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--model-kwargs", "{not json"))
    assert "--model-kwargs is not valid JSON" in err
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--model", "no_such_module_xyz:make"))
    assert "cannot import 'no_such_module_xyz'" in err
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--data", tmp_path / "nothing.npz"))
    assert "no such dataset, folder or file" in err
    import numpy as np

    x, y = np.zeros((4, 40), np.float32), np.arange(4) % 2
    np.savez(tmp_path / "d40.npz", x_train=x, y_train=y, x_test=x, y_test=y)  # 40 features, not 64
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--data", tmp_path / "d40.npz"))
    assert "the model does not accept the data" in err and "[2, 40]" in err
    err = _refused(capsys, d, tmp_path / "out", *_with(args, "--grid", 1))
    assert "--grid must be >= 2" in err
    with pytest.raises(SystemExit) as e:
        main(["align", *map(str, _with(args, "--method", "telepathy"))])
    assert e.value.code == 2 and "invalid choice: 'telepathy'" in capsys.readouterr().err


def test_npz_data(capsys, tmp_path, mlp_pair, digits):
    import numpy as np

    d, *_ = mlp_pair
    np.savez(
        tmp_path / "data.npz",
        x_train=digits.x_train[:300].numpy(),
        y_train=digits.y_train[:300].numpy(),
        x_test=digits.x_test[:100].numpy(),
        y_test=digits.y_test[:100].numpy(),
    )
    out = tmp_path / "out"
    rc, _, err = _align(capsys, *_with(_mlp_args(d, out, "activation"), "--data", tmp_path / "data.npz"))
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["num_train"] == 300 and s["data"]["num_test"] == 100 and s["data"]["name"] == "data"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["data"]["sha256"] == _sha(tmp_path / "data.npz")
    np.savez(tmp_path / "partial.npz", x_train=digits.x_train[:10].numpy())
    err = _refused(
        capsys,
        d,
        tmp_path / "out2",
        *_with(_mlp_args(d, tmp_path / "out2", "weight"), "--data", tmp_path / "partial.npz"),
    )
    assert "lacks arrays ['y_train', 'x_test', 'y_test']" in err


def test_command_line_exit_status_and_one_line_error(tmp_path, mlp_pair):
    """The real command: a corrupt input exits 2 with one line on stderr and no traceback."""
    d, *_ = mlp_pair
    (tmp_path / "B.pt").write_bytes(b"garbage")
    args = _with(_mlp_args(d, tmp_path / "out", "weight"), "--b", tmp_path / "B.pt")
    r = subprocess.run(
        [sys.executable, "-m", "repro", "align", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: checkpoint B:") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_wrong_spec_is_caught_by_the_function_check(capsys, tmp_path, monkeypatch, mlp_pair):
    """A spec that forgets the head's input axis permutes B into another function: exit 1, outputs written,
    ``function_check.ok`` false (Eq. (1) of Git Re-Basin is checked, not assumed)."""
    import repro.align as align
    from reference.permutation import PermutationSpec

    d, model, *_ = mlp_pair
    good = spec_for(model)
    broken = PermutationSpec({**good.axes, "head.weight": (None, None)}, good.shapes)
    monkeypatch.setattr(align, "_spec", lambda *a, **k: (broken, "a broken spec", "coverage\n"))
    out = tmp_path / "out"
    rc, _, err = _align(capsys, *_mlp_args(d, out, "weight"))
    assert rc == 1 and "the permutation changed B's function" in err and "a broken spec" in err
    s = json.loads((out / "summary.json").read_text())
    assert s["function_check"]["ok"] is False and s["function_check"]["max_abs_diff"] > 1e-3


NOSTRICT = textwrap.dedent("""
    from torch import nn


    class CumNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.b(self.a(x).relu().cumsum(1))  # a cumulative sum over units: no rule for it
""")


def test_unsupported_operation_strict_and_no_strict(capsys, tmp_path, monkeypatch):
    (tmp_path / "cumnet.py").write_text(NOSTRICT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cumnet", raising=False)
    sys.path.insert(0, str(tmp_path))
    try:
        import cumnet

        model = cumnet.CumNet()
    finally:
        sys.path.remove(str(tmp_path))
    for name, seed in (("A", 1), ("B", 2)):
        torch.save(init_params(model, seed), tmp_path / f"{name}.pt")
    args = _cli("cumnet:CumNet", None, "A.pt", "B.pt", tmp_path / "out", "activation", grid=3)
    err = _refused(capsys, tmp_path, tmp_path / "out", *args)
    assert "cannot derive the permutation spec of CumNet" in err and "cumsum" in err and "--no-strict" in err
    rc, _, err = _align(capsys, *args, "--no-strict")
    sys.modules.pop("cumnet", None)
    assert rc == 0, err
    assert "no permutation group" in err  # a warning: nothing to align
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["groups"] == 0 and s["moved_units"] == 0 and s["function_check"]["max_abs_diff"] == 0.0
    assert "held fixed" in (tmp_path / "out" / "coverage.txt").read_text()


def test_a_folder_of_mnist_idx_files(capsys, tmp_path):
    from fake_data import make_mnist

    make_mnist(tmp_path / "mnist", n_train=20, n_test=8)
    model = MLP(784, [8], 10)
    for name, seed in (("A", 1), ("B", 2)):
        torch.save(init_params(model, seed), tmp_path / f"{name}.pt")
    out = tmp_path / "out"
    kw = {"in_features": 784, "widths": [8], "num_classes": 10}
    rc, _, err = _align(capsys, *_cli("zoo:mlp", kw, tmp_path / "A.pt", tmp_path / "B.pt", out, "weight",
                                      grid=3, data=tmp_path / "mnist"))
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["name"] == "mnist" and s["data"]["input_shape"] == [1, 28, 28] and s["data"]["num_train"] == 20
