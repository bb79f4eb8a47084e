"""Groups of settings that several targets share, each a frozen dataclass: a target's config holds one as a
field (``--set ste.steps=30``) and passes it to its jobs, whose keys then hold its fields.

This module is part of the code version (``context.code_version``): ``SteSettings.run`` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from reference.params import Params

__all__ = ["CycleSettings", "SteSettings"]


@dataclass(frozen=True)
class SteSettings:
    """Git Re-Basin's straight-through estimator as the targets run it (``reference.matching.ste_matching``,
    §3.3): ``steps`` steps of ``batch`` examples at learning rate ``lr`` with ``optimizer``, started from
    weight matching's permutation, re-solving the assignment every 5 steps and scoring 4 times (``run``)."""

    steps: int
    lr: float
    batch: int
    optimizer: str = "sgd"

    def run(self, model: nn.Module, spec: Any, pa: Params, pb: Params, x: Tensor, y: Tensor, *, seed: int,
            init: Any) -> Any:
        """``ste_matching`` of ``pb`` to ``pa`` on ``(x, y)`` from the permutation ``init``."""
        from reference.matching import ste_matching

        return ste_matching(model, spec, pa, pb, x, y, steps=self.steps, lr=self.lr, batch_size=self.batch,
                            optimizer=self.optimizer, seed=seed, init=init, rematch_every=5,
                            eval_every=max(1, self.steps // 4))


@dataclass(frozen=True)
class CycleSettings:
    """How the cycle-consistency of a set of pairwise alignments is measured: the mid barrier on ``grid`` path
    points of up to ``max_triples`` 3-cycles i → j → k → i, and of up to ``max_pairs`` aligned pairs."""

    grid: int = 17
    max_triples: int = 10
    max_pairs: int = 10
