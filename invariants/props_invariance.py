"""Property 1: permuting hidden units does not change the function a network computes.

Generated architectures (MLP / VGG / ResNet / CNN1D, every norm), weights at several scales, random
permutations of the hand-written spec; train mode (batch statistics) and eval mode (BatchNorm's
running statistics, drawn away from their initial values so that forgetting to permute them shows).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.support import DEVICE, assert_same_function, forward
from reference.permutation import Permutation

_cases = S.model_cases(dtype=S.dtypes, device=DEVICE)


def check_invariance(case: S.ModelCase, perm: Permutation, train: bool) -> None:
    """f(P(θ), x) = f(θ, x) at the dtype/device tolerance of ``invariants.support``."""
    ref = forward(case.model, case.params, case.x, train)
    out = forward(case.model, perm.apply(case.spec, case.params), case.x, train)
    assert_same_function(out, ref, f"f(P(θ)) vs f(θ) in {'train' if train else 'eval'} mode")


@given(case=_cases, seed=S.perm_seeds)
def test_function_invariance_train_mode(case: S.ModelCase, seed: int) -> None:
    """Ainsworth et al. 2023 (Git Re-Basin), Eq. (1); Hecht-Nielsen 1990: f(P(θ), x) = f(θ, x),
    train mode (BatchNorm normalises by batch statistics)."""
    check_invariance(case, Permutation.random(case.spec, seed), train=True)


@given(case=_cases, seed=S.perm_seeds)
def test_function_invariance_eval_mode(case: S.ModelCase, seed: int) -> None:
    """Ainsworth et al. 2023 (Git Re-Basin), Eq. (1): f(P(θ), x) = f(θ, x) in eval mode, where
    BatchNorm's running_mean / running_var are coordinates of the function and must be permuted
    with their channels (DESIGN.md; leaving them out is a known bug of a public PyTorch port)."""
    check_invariance(case, Permutation.random(case.spec, seed), train=False)


@given(case=S.model_cases(families=["resnet"], device=DEVICE), seed=S.perm_seeds, train=st.booleans())
def test_function_invariance_resnets(case: S.ModelCase, seed: int, train: bool) -> None:
    """Ainsworth et al. 2023, Eq. (1) and Appendix (ResNet spec): f(P(θ), x) = f(θ, x) for ResNets,
    whose residual stream is one permutation group shared by every layer added into it."""
    check_invariance(case, Permutation.random(case.spec, seed), train=train)
