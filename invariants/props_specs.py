"""Property 6: spec discovery by tracing agrees with the hand-written specs.

``trace_spec(model, x)`` (``reference.trace``) derives the permutation symmetry from a ``torch.fx``
trace (union-find over channel spaces, one rule per operation in ``reference.trace.RULES``; residual
additions merge spaces); ``spec_for(model)`` is written by hand from Git Re-Basin's specs. Both are
looked up as ``reference.specs.<name>`` at call time (``reference.specs`` re-exports the tracer).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import reference.specs as specs
from invariants import strategies as S
from invariants.props_invariance import check_invariance
from invariants.support import DEVICE
from reference.permutation import Permutation


@given(arch=S.archs(), seed=S.seeds)
def test_traced_spec_has_the_hand_written_symmetry(arch: S.Arch, seed: int) -> None:
    """Ainsworth et al. 2023, §2 / Appendix (permutation specs of MLP, VGG, ResNet): the symmetry
    discovered from the computation graph equals the hand-written one, up to group names:
    trace_spec(m, x).same_symmetry(spec_for(m)) (axes, shapes and GroupNorm blocks)."""
    model = arch.build()
    x = S.example_input(arch, 2, seed, torch.float32)
    traced, hand = specs.trace_spec(model, x), specs.spec_for(model)
    assert traced.same_symmetry(hand), (
        f"traced groups {traced.sizes} blocks {dict(traced.blocks)} vs hand {hand.sizes} blocks {dict(hand.blocks)}"
    )


@given(
    case=S.model_cases(dtype=S.dtypes, spec_kind="traced", device=DEVICE),
    seed=S.perm_seeds,
    train=st.booleans(),
)
def test_traced_spec_preserves_the_function(case: S.ModelCase, seed: int, train: bool) -> None:
    """Ainsworth et al. 2023, Eq. (1) with the traced spec: f(P(θ), x) = f(θ, x) for P drawn from
    trace_spec(model, x) (train and eval mode)."""
    check_invariance(case, Permutation.random(case.spec, seed), train)
