"""Checkpoints: atomic writes, safe loads (``weights_only=True``), clear errors.

A *model checkpoint* (:func:`save_checkpoint` / :func:`load_checkpoint`) is one ``torch.save`` file
holding a plain dict::

    {"format": "modeconn.checkpoint/1",
     "params": Params (CPU tensors), "model_config": dict, "train_config": dict | None,
     "versions": {"torch", "python", "modeconn"}, "extra": dict | None}

Only types that ``torch.load(weights_only=True)`` rebuilds are written (dict/list/tuple, str, int,
float, bool, None, tensors), so a checkpoint never needs an unsafe load; anything else is refused at
save time with a ``TypeError`` naming the entry. Writes go through a temp file and ``os.replace``: an
interrupted save leaves the previous file intact.

When the stored ``model_config`` names a zoo model (``"name"`` in ``reference.models.MODELS``), loading
builds that model (on the ``meta`` device: no memory, no random numbers drawn) and refuses weights
whose keys or shapes differ from its ``state_dict``; other configs are stored and compared as data only.
"""

from __future__ import annotations

import io
import os
import pickle
import platform
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .models import MODELS, build_model
from .params import Params, check_finite, is_float, key_mismatch

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "config_differences",
    "load_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
]

#: The format marker written into (and required from) every model checkpoint.
CHECKPOINT_FORMAT = "modeconn.checkpoint/1"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets a later run tell a killed writer's leftover from a live writer's file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a result is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode(), path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def _unpickling_reason(message: str) -> str:
    """The line of torch's weights_only error that names what was refused, without its advice."""
    for line in message.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line.startswith(("Unsupported", "Trying to")) or "GLOBAL" in line:
            return line.split(" Please use")[0].rstrip(".")
    return " ".join(message.split())[:300]


def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` with a clear error for missing, corrupt or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests ``weights_only=False``; keep only the reason (the refused global)
        reason = _unpickling_reason(str(e))
        raise ValueError(
            f"checkpoint {path} is corrupt, truncated or not a safe torch file: the weights_only loader "
            f"refused it ({reason}); a checkpoint written by save_checkpoint holds only tensors and plain "
            f"values, so this file was not, or was tampered with"
        ) from e
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"checkpoint {path} is corrupt, truncated or not a safe torch file: {e}") from e


# ----------------------------------------------------------------------------------------------------------
# Model checkpoints
# ----------------------------------------------------------------------------------------------------------

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The content of a model checkpoint file (see the module docstring for the layout)."""

    params: Params
    model_config: dict[str, Any]
    train_config: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] | None = None


def _plain(obj: Any, where: str) -> Any:
    """A copy of ``obj`` made of plain containers, exact scalars and detached CPU tensors.

    Raises ``TypeError`` naming ``where`` (e.g. ``model_config['act']``) for anything the
    ``weights_only`` loader would refuse: numpy scalars/arrays, ``str``/``float`` subclasses, functions,
    arbitrary objects, dict keys that are not str/int.
    """
    if type(obj) in _SCALARS:
        return obj
    if isinstance(obj, Tensor):
        if obj.layout != torch.strided:
            raise TypeError(f"{where}: only dense tensors can be saved, got layout {obj.layout}")
        return obj.detach().cpu().clone()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(
                    f"{where}: dict key {k!r} of type {type(k).__name__} is not allowed in a checkpoint "
                    f"(use str or int keys)"
                )
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if type(obj) in (list, tuple):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if type(obj) is list else tuple(items)
    raise TypeError(
        f"{where}: value {obj!r:.80} of type {type(obj).__module__}.{type(obj).__qualname__} is not allowed "
        f"in a checkpoint (allowed: dict, list, tuple, str, int, float, bool, None, torch.Tensor; convert "
        f"numpy scalars with float()/int() and objects to plain dicts)"
    )


def _versions() -> dict[str, str]:
    from . import __version__ as modeconn_version

    return {
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "modeconn": str(modeconn_version),
    }


def save_checkpoint(
    path: str | Path,
    params: Mapping[str, Tensor],
    *,
    model_config: Mapping[str, Any],
    train_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``params`` and their configs to ``path`` atomically (format ``CHECKPOINT_FORMAT``).

    ``params`` must map str keys to tensors and be finite (NaN/inf -> ``ValueError``), and fit the zoo
    model ``model_config`` names, if it names one (module docstring); tensors are stored on the CPU.
    ``model_config`` is what :func:`load_checkpoint` compares against the expected architecture. Every
    value must be a type the ``weights_only`` loader accepts (``TypeError`` names the offending entry
    otherwise). Arguments are not modified.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
    for k, v in params.items():
        if type(k) is not str:
            raise TypeError(f"params: key {k!r} of type {type(k).__name__} is not a str")
        if not isinstance(v, Tensor):
            raise TypeError(f"params[{k!r}]: expected a torch.Tensor, got {type(v).__name__}")
    check_finite(params, what=f"refusing to save checkpoint {path}")
    if not isinstance(model_config, Mapping):
        raise TypeError(f"model_config must be a dict, got {type(model_config).__name__}")
    for name, value in (("train_config", train_config), ("extra", extra)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}")
    _check_params_fit_config(f"refusing to save checkpoint {path}", params, model_config)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "params": _plain(params, "params"),
        "model_config": _plain(model_config, "model_config"),
        "train_config": None if train_config is None else _plain(train_config, "train_config"),
        "versions": _versions(),
        "extra": None if extra is None else _plain(extra, "extra"),
    }
    atomic_torch_save(payload, Path(path))


def _same(a: Any, b: Any) -> bool:
    """Config equality with tuples and lists alike and tensors compared by value."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python, not in a config
        return type(a) is type(b) and a == b
    return bool(a == b)


def _show(v: Any) -> str:
    return repr(list(v) if isinstance(v, tuple) else v)


def config_differences(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """One line per top-level field where ``found`` and ``expected`` differ (missing fields included)."""
    diffs = []
    for k in list(expected) + [k for k in found if k not in expected]:
        if k not in found:
            diffs.append(f"{k}: missing in checkpoint, expected {_show(expected[k])}")
        elif k not in expected:
            diffs.append(f"{k}: checkpoint has {_show(found[k])}, not in the expected config")
        elif not _same(found[k], expected[k]):
            diffs.append(f"{k}: checkpoint has {_show(found[k])}, expected {_show(expected[k])}")
    return diffs


def _check_params_fit_config(what: str, params: Mapping[str, Tensor], model_config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` (starting with ``what``) unless ``params`` has the keys and shapes of the zoo
    model ``model_config`` builds (nothing to check for a config that names no zoo model)."""
    name = model_config.get("name")
    if not isinstance(name, str) or name not in MODELS:
        return
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            expected = build_model(dict(model_config)).state_dict()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: its model config does not build a {name!r} model ({e})") from e
    diff = key_mismatch(expected, params)
    if diff:
        raise ValueError(f"{what}: its weights do not fit the {name!r} model of its config: {diff}")
    for k, want in expected.items():
        got = params[k]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"{what}: key {k!r} has shape {tuple(got.shape)}, the {name!r} model of its config "
                f"has {tuple(want.shape)}"
            )
        if is_float(got) != is_float(want):
            raise ValueError(
                f"{what}: key {k!r} has dtype {got.dtype}, the {name!r} model of its config has {want.dtype}"
            )


def load_checkpoint(
    path: str | Path,
    expected_model_config: Mapping[str, Any] | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the path for a corrupt,
    truncated or unsafe file, a file without the ``CHECKPOINT_FORMAT`` marker, non-finite weights, a
    ``model_config`` that differs from ``expected_model_config`` (each differing field named), or weights
    whose keys or shapes differ from the zoo model the stored ``model_config`` builds (the key and both
    shapes named; module docstring).
    """
    path = Path(path)
    obj = safe_torch_load(path, map_location=map_location)
    if not isinstance(obj, dict) or "format" not in obj:
        found = f"dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"checkpoint {path} is not a modeconn checkpoint: no {CHECKPOINT_FORMAT!r} format marker "
            f"(found {found})"
        )
    if obj["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {obj['format']!r}; this version reads {CHECKPOINT_FORMAT!r}"
        )
    missing = [k for k in ("params", "model_config") if k not in obj]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {missing}")
    params, model_config = obj["params"], obj["model_config"]
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in params.items()
    ):
        raise ValueError(f"checkpoint {path}: 'params' is not a dict of str -> tensor")
    if not isinstance(model_config, dict):
        raise ValueError(f"checkpoint {path}: 'model_config' is not a dict")
    check_finite(params, what=f"checkpoint {path}")
    if expected_model_config is not None:
        diffs = config_differences(model_config, expected_model_config)
        if diffs:
            arch = model_config.get("arch", model_config.get("name"))
            what = f" is for {arch!s}" if arch is not None else ""
            raise ValueError(f"checkpoint {path}{what} with a different model config: " + "; ".join(diffs))
    _check_params_fit_config(f"checkpoint {path}", params, model_config)
    return Checkpoint(
        params=dict(params),
        model_config=model_config,
        train_config=obj.get("train_config"),
        versions=dict(obj.get("versions") or {}),
        extra=obj.get("extra"),
    )
