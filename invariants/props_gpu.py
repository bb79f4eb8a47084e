"""Properties 1 and 2 on CUDA: ``HYPOTHESIS_PROFILE=gpu pytest invariants -m gpu``.

Skipped with a reason when CUDA is absent (root ``conftest.py``). Float32 convolutions run in TF32
under cuDNN's default, so the functional tolerance is looser on CUDA (``invariants.support``:
5e-3 relative for float32, 1e-9 for float64); the parameter-level property stays exact.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.props_combination import check_function_commutes, check_params_commute, combination_args
from invariants.props_invariance import check_invariance
from reference.permutation import Permutation

pytestmark = pytest.mark.gpu

CUDA = "cuda"


@given(
    case=S.model_cases(dtype=S.dtypes, device=CUDA),
    seed=S.perm_seeds,
    train=st.booleans(),
)
def test_function_invariance_cuda(case: S.ModelCase, seed: int, train: bool) -> None:
    """Ainsworth et al. 2023, Eq. (1) on CUDA: f(P(θ), x) = f(θ, x) (train and eval mode)."""
    assert case.x.is_cuda
    check_invariance(case, Permutation.random(case.spec, seed), train)


@given(args=combination_args(("convex", "affine", "arbitrary"), device=CUDA))
def test_combination_commutes_with_permutation_cuda(args) -> None:
    """Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ) exactly on CUDA (float64), and f(Σ kᵢ P(θᵢ)) = f(Σ kᵢ θᵢ) in train
    mode for every coefficient family."""
    ps, coeffs, perm = args
    check_params_commute(ps, coeffs, perm)
    check_function_commutes(ps, coeffs, perm, train=True)


@given(args=combination_args(("convex",), device=CUDA))
def test_convex_combination_eval_mode_cuda(args) -> None:
    """f(Σ λᵢ P(θᵢ)) = f(Σ λᵢ θᵢ) in eval mode on CUDA, convex λ (positive running_var)."""
    ps, coeffs, perm = args
    check_function_commutes(ps, coeffs, perm, train=False)
