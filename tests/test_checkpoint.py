"""Model checkpoints: round trip, atomic writes, safe loads and every refusal with its message."""

from __future__ import annotations

import io
import os
import platform
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from reference.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    config_differences,
    load_checkpoint,
    save_checkpoint,
)

MLP = {"arch": "mlp", "in_features": 4, "widths": [32, 32], "num_classes": 3, "norm": None}


def mlp_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.weight": torch.randn(32, 4, generator=g),
        "layers.0.bias": torch.randn(32, generator=g),
        "layers.1.weight": torch.randn(32, 32, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7),
        "head.weight": torch.randn(3, 32, generator=g),
    }


class Payload:
    """An arbitrary python object: a weights_only load must refuse to rebuild it."""

    def __init__(self) -> None:
        self.x = 1


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip(tmp_path):
    params = mlp_params()
    train = {"lr": 0.1, "epochs": 3, "seed": 0, "schedule": ("cosine", 0.5), "nested": {"ok": True}}
    extra = {"final_loss": torch.tensor([0.25, 0.5]), "note": "hello", "acc": [0.9, 0.95]}
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, params, model_config=MLP, train_config=train, extra=extra)
    ck = load_checkpoint(path, expected_model_config=dict(MLP))
    assert list(ck.params) == list(params)
    for k, v in params.items():
        assert ck.params[k].dtype == v.dtype
        torch.testing.assert_close(ck.params[k], v, rtol=0, atol=0)
    assert ck.model_config == MLP
    assert ck.train_config == train
    assert ck.extra["note"] == "hello" and ck.extra["acc"] == [0.9, 0.95]
    torch.testing.assert_close(ck.extra["final_loss"], extra["final_loss"])
    assert ck.versions == {
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "modeconn": ck.versions["modeconn"],
    }
    assert all(type(v) is str for v in ck.versions.values())
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"], "no temp file left behind"


def test_save_does_not_modify_arguments_and_stores_cpu_copies(tmp_path):
    params = OrderedDict(mlp_params())
    w = torch.nn.Parameter(torch.ones(2))
    params["p"] = w
    before = {k: v.clone() for k, v in params.items()}
    cfg = {"arch": "mlp", "widths": (8, 8)}
    save_checkpoint(tmp_path / "c.pt", params, model_config=cfg, train_config=None)
    assert cfg == {"arch": "mlp", "widths": (8, 8)}
    assert all(torch.equal(params[k], before[k]) for k in before)
    ck = load_checkpoint(tmp_path / "c.pt", expected_model_config={"arch": "mlp", "widths": [8, 8]})
    assert type(ck.params["p"]) is torch.Tensor and ck.params["p"].device.type == "cpu"
    assert ck.train_config is None and ck.extra is None


def test_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, mlp_params(0), model_config=MLP)
    old_bytes = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, mlp_params(1), model_config=MLP)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    ck = load_checkpoint(path)
    torch.testing.assert_close(ck.params["layers.0.bias"], mlp_params(0)["layers.0.bias"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nothing\.pt does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01this is not a torch file" * 10)
    with pytest.raises(
        ValueError, match=r"checkpoint .*garbage\.pt is corrupt, truncated or not a safe torch file"
    ):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, mlp_params(), model_config=MLP)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt\.pt is corrupt, truncated"):
        load_checkpoint(path)


def test_file_without_format_marker(tmp_path):
    path = tmp_path / "plain.pt"
    atomic_torch_save(mlp_params(), path)  # a bare state_dict
    with pytest.raises(
        ValueError, match=r"plain\.pt is not a modeconn checkpoint: no 'modeconn.checkpoint/1'"
    ):
        load_checkpoint(path)
    atomic_torch_save([1, 2], path)
    with pytest.raises(ValueError, match=r"not a modeconn checkpoint.*found list"):
        load_checkpoint(path)


def test_unknown_format_version(tmp_path):
    path = tmp_path / "future.pt"
    atomic_torch_save({"format": "modeconn.checkpoint/99", "params": {}, "model_config": {}}, path)
    with pytest.raises(ValueError, match=r"has format 'modeconn.checkpoint/99'; this version reads"):
        load_checkpoint(path)


def test_incomplete_checkpoint(tmp_path):
    path = tmp_path / "half.pt"
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "params": {}}, path)
    with pytest.raises(ValueError, match=r"half\.pt is incomplete: missing \['model_config'\]"):
        load_checkpoint(path)
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "params": {"w": 1.0}, "model_config": {}}, path)
    with pytest.raises(ValueError, match=r"'params' is not a dict of str -> tensor"):
        load_checkpoint(path)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, mlp_params(), model_config=MLP)
    expected = {**MLP, "widths": [64, 64]}
    with pytest.raises(
        ValueError,
        match=r"ckpt\.pt is for mlp with a different model config: widths: checkpoint has \[32, 32\], "
        r"expected \[64, 64\]",
    ):
        load_checkpoint(path, expected_model_config=expected)
    expected = {
        "arch": "cnn",
        "in_features": 4,
        "widths": [32, 32],
        "num_classes": 3,
        "norm": "bn",
        "depth": 3,
    }
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, expected_model_config=expected)
    msg = str(info.value)
    assert "arch: checkpoint has 'mlp', expected 'cnn'" in msg
    assert "norm: checkpoint has None, expected 'bn'" in msg
    assert "depth: missing in checkpoint, expected 3" in msg
    assert "widths" not in msg and "num_classes" not in msg


def test_config_differences_semantics():
    assert config_differences({"w": (1, 2)}, {"w": [1, 2]}) == []
    assert config_differences({"b": True}, {"b": 1}) == ["b: checkpoint has True, expected 1"]
    assert config_differences({"t": torch.ones(2)}, {"t": torch.ones(2)}) == []
    assert config_differences({"x": 1, "y": 2}, {"x": 1}) == [
        "y: checkpoint has 2, not in the expected config"
    ]


def test_nan_refused_on_save(tmp_path):
    params = mlp_params()
    params["layers.0.bias"][3] = float("nan")
    path = tmp_path / "nan.pt"
    with pytest.raises(
        ValueError, match=r"refusing to save checkpoint .*nan\.pt: key 'layers.0.bias' holds 1 non-finite"
    ):
        save_checkpoint(path, params, model_config=MLP)
    params["layers.0.bias"][3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(path, params, model_config=MLP)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_nan_refused_on_load(tmp_path):
    params = mlp_params()
    params["head.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "params": params, "model_config": MLP, "train_config": None}, path
    )
    with pytest.raises(ValueError, match=r"checkpoint .*nan\.pt: key 'head.weight' holds 1 non-finite"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"model_config": {"act": torch.relu}}, r"model_config\['act'\]"),
        ({"model_config": {"w": np.float64(0.5)}}, r"model_config\['w'\]: .* of type numpy.float64"),
        (
            {"model_config": MLP, "train_config": {"opt": {"betas": [0.9, np.float32(0.99)]}}},
            r"train_config\['opt'\]\['betas'\]\[1\]",
        ),
        ({"model_config": MLP, "extra": {"path": Path("x")}}, r"extra\['path'\]: value .* of type pathlib"),
        ({"model_config": MLP, "extra": {"arr": np.zeros(2)}}, r"extra\['arr'\]: .* numpy.ndarray"),
        (
            {"model_config": MLP, "extra": {"v": torch.__version__}},
            r"extra\['v'\]: .* torch.torch_version.TorchVersion",
        ),
        ({"model_config": {("a", "b"): 1}}, r"model_config: dict key \('a', 'b'\) of type tuple"),
        ({"model_config": MLP, "extra": {"s": {1, 2}}}, r"extra\['s'\]: .* of type builtins.set"),
    ],
)
def test_unsafe_types_refused_on_save(tmp_path, kwargs, where):
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=where):
        save_checkpoint(path, mlp_params(), **kwargs)
    assert not path.exists()


def test_bad_params_refused_on_save(tmp_path):
    with pytest.raises(TypeError, match=r"params\['w'\]: expected a torch.Tensor, got ndarray"):
        save_checkpoint(tmp_path / "c.pt", {"w": np.zeros(2)}, model_config=MLP)
    with pytest.raises(TypeError, match=r"params: key 3 of type int is not a str"):
        save_checkpoint(tmp_path / "c.pt", {3: torch.zeros(2)}, model_config=MLP)
    with pytest.raises(TypeError, match="model_config must be a dict"):
        save_checkpoint(tmp_path / "c.pt", mlp_params(), model_config=["mlp"])


def test_arbitrary_object_refused_by_weights_only_load(tmp_path):
    path = tmp_path / "bomb.pt"
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "params": {}, "model_config": {}, "extra": Payload()}, buf)
    path.write_bytes(buf.getvalue())
    msg = r"bomb\.pt is corrupt, truncated or not a safe torch file: .*GLOBAL test_checkpoint\.Payload"
    with pytest.raises(ValueError, match=msg):
        load_checkpoint(path)


def test_code_execution_refused_by_weights_only_load(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "params": Evil(marker), "model_config": {}}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"evil\.pt is corrupt, .*refused it \(.*GLOBAL (posix|nt)\.system"):
        load_checkpoint(path)
    assert not marker.exists()


# --- weights are checked against the model the stored config builds ------------------------------

ZOO = {"name": "mlp", "in_features": 4, "widths": [8, 6], "num_classes": 3, "bias": True}


def zoo_params(seed: int = 0) -> dict[str, torch.Tensor]:
    from reference.models import build_model, init_params

    return init_params(build_model(dict(ZOO)), seed)


def _write_raw(path: Path, params, model_config) -> None:
    """A checkpoint file written without save_checkpoint's checks (an old or foreign writer)."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "params": params, "model_config": model_config}, path)


def test_zoo_checkpoint_round_trip_is_checked_and_accepted(tmp_path):
    params = zoo_params()
    save_checkpoint(tmp_path / "ok.pt", params, model_config=ZOO)
    ck = load_checkpoint(tmp_path / "ok.pt", expected_model_config=ZOO)
    assert all(torch.equal(ck.params[k], v) for k, v in params.items())
    from reference.models import build_model

    res = {"name": "resnet", "in_channels": 1, "num_classes": 3, "depth": 8, "width": 1, "norm": "batch",
           "groups": 2, "dims": 2, "base": 4}
    p = build_model(res).state_dict()  # BatchNorm buffers, num_batches_tracked included
    save_checkpoint(tmp_path / "res.pt", p, model_config=res)
    assert set(load_checkpoint(tmp_path / "res.pt").params) == set(p)


def test_load_refuses_weights_of_another_shape_than_the_config_builds(tmp_path):
    path = tmp_path / "wide.pt"
    params = zoo_params()
    params["layers.1.weight"] = torch.randn(7, 8)  # the config says widths [8, 6]
    _write_raw(path, params, ZOO)
    with pytest.raises(
        ValueError,
        match=r"wide\.pt: key 'layers.1.weight' has shape \(7, 8\), the 'mlp' model of its config has \(6, 8\)",
    ):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"key 'layers.1.weight' has shape \(7, 8\)"):
        load_checkpoint(path, expected_model_config=ZOO)  # the configs agree; the weights do not
    with pytest.raises(ValueError, match=r"refusing to save checkpoint .*: key 'layers.1.weight' has shape \(7, 8\)"):
        save_checkpoint(tmp_path / "never.pt", params, model_config=ZOO)
    assert not (tmp_path / "never.pt").exists()


def test_load_refuses_missing_unexpected_or_integer_keys(tmp_path):
    path = tmp_path / "keys.pt"
    params = zoo_params()
    del params["head.bias"]
    _write_raw(path, params, ZOO)
    with pytest.raises(ValueError, match=r"do not fit the 'mlp' model of its config: missing keys \['head.bias'\]"):
        load_checkpoint(path)
    params = {**zoo_params(), "bn.num_batches_tracked": torch.tensor(3)}
    _write_raw(path, params, ZOO)
    with pytest.raises(ValueError, match=r"unexpected keys \['bn.num_batches_tracked'\]"):
        load_checkpoint(path)
    params = zoo_params()
    params["head.bias"] = torch.zeros(3, dtype=torch.int64)
    _write_raw(path, params, ZOO)
    with pytest.raises(ValueError, match=r"key 'head.bias' has dtype torch.int64"):
        load_checkpoint(path)


def test_load_refuses_a_zoo_config_that_does_not_build(tmp_path):
    path = tmp_path / "bad.pt"
    _write_raw(path, zoo_params(), {**ZOO, "widths": [8, 0]})
    with pytest.raises(ValueError, match=r"bad\.pt: its model config does not build a 'mlp' model .*widths\[1\]"):
        load_checkpoint(path)


def test_configs_outside_the_zoo_are_data_only(tmp_path):
    for cfg in (MLP, {"name": "custom-net", "widths": [3]}, {"name": 3}):
        save_checkpoint(tmp_path / "c.pt", mlp_params(), model_config=cfg)
        assert set(load_checkpoint(tmp_path / "c.pt").params) == set(mlp_params())


def test_checking_a_checkpoint_draws_no_random_numbers(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", zoo_params(), model_config=ZOO)
    other = zoo_params(1)  # building a model outside the checks draws from the global generator
    torch.manual_seed(11)
    want = torch.rand(3)
    torch.manual_seed(11)
    load_checkpoint(tmp_path / "ok.pt")
    save_checkpoint(tmp_path / "ok2.pt", other, model_config=ZOO)
    assert torch.equal(torch.rand(3), want)
