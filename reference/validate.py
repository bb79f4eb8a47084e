"""Argument checks shared by every module of ``reference/``: one place, one wording.

Each check returns the value it accepted (converted where that is the point: ``number`` returns a
``float``), so a caller writes ``steps = integer("steps", steps)``. A value of the wrong *type*
raises ``ArgumentTypeError``, which is both a ``TypeError`` and a ``ValueError`` (callers and tests
may catch either); a value of the right type outside its range raises ``ValueError``. ``bool`` is
never accepted where a number is expected (``True`` is an ``int`` in Python, but ``steps=True`` is a
mistake, not 1).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "counts",
    "ArgumentTypeError",
    "choice",
    "flag",
    "generator",
    "integer",
    "integers",
    "leading_size",
    "number",
    "optional_integer",
    "optional_number",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (catch it as ``TypeError`` or as ``ValueError``)."""


def integer(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]`` (``None``: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value}")
    return int(value)


def counts(**values: Any) -> tuple[int, ...]:
    """Each keyword's value checked by :func:`integer` (an ``int`` >= 1), returned in the order given."""
    return tuple(integer(name, v) for name, v in values.items())


def integers(name: str, values: Any, minimum: int | None = 1, maximum: int | None = None) -> list[int]:
    """A list of ``integer(f"{name}[{i}]", v, minimum, maximum)`` over a sequence ``values`` (a list or
    tuple; a ``str`` is refused)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ArgumentTypeError(f"{name} must be a sequence of integers, got {values!r}")
    return [integer(f"{name}[{i}]", v, minimum, maximum) for i, v in enumerate(values)]


def optional_integer(name: str, value: Any, minimum: int | None = 1) -> int | None:
    """``None``, or ``integer(name, value, minimum)``."""
    return None if value is None else integer(name, value, minimum)


def number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    below: float | None = None,
    finite: bool = True,
) -> float:
    """``float(value)`` for a real number (int or float, not bool; a 0-d tensor is not accepted).

    ``minimum``/``maximum``: closed bounds; ``positive``: > 0; ``below``: < that value (an open upper
    bound, e.g. a momentum in [0, 1)); ``finite=False`` admits ±inf (NaN never).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value!r}")
    if below is not None and not v < below:
        raise ValueError(f"{name} must be < {below:g}, got {value!r}")
    return v


def optional_number(name: str, value: Any, **bounds: Any) -> float | None:
    """``None``, or ``number(name, value, **bounds)``."""
    return None if value is None else number(name, value, **bounds)


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (``0``/``1`` and strings are refused: they are usually a slip)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def choice(name: str, value: Any, options: Collection[Any]) -> Any:
    """``value`` if it is one of ``options``; the message lists them."""
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; use one of {tuple(options)}")
    return value


def json_object(name: str, text: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object (e.g. a command line's model keyword arguments)."""
    import json

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON ({e}): {text!r}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r} ({type(obj).__name__})")
    return obj


def generator(value: torch.Generator | int | None, default_seed: int | None = None) -> torch.Generator:
    """A CPU ``torch.Generator``: the one given, one seeded with an int, or for ``None`` one seeded
    with ``default_seed`` (``None``: a fresh, unseeded generator)."""
    if isinstance(value, torch.Generator):
        return value
    if value is None:
        return torch.Generator() if default_seed is None else torch.Generator().manual_seed(int(default_seed))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"generator must be a torch.Generator, an int seed or None, got {value!r}")
    return torch.Generator().manual_seed(value)


def leading_size(stacked: Mapping[str, Tensor], what: str = "stacked_params") -> int:
    """The one leading size of a non-empty dict of stacked tensors (the number of points K)."""
    if not isinstance(stacked, Mapping) or not stacked:
        raise ValueError(f"{what} must be a non-empty dict of stacked tensors (leading dim = points)")
    sizes = {v.shape[0] if v.ndim else None for v in stacked.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{what} need one leading size (the points) on every entry, got {sorted(map(str, sizes))}"
        )
    return int(sizes.pop())
