"""Properties of the loss Hessian of ``reference/hessian.py`` (HVPs, Lanczos, permutation symmetry).

L(θ) = (1/N) Σₙ CE(f(θ, xₙ), yₙ) over the trainable parameters, eval mode (buffers constant), float64,
on generated architectures and weights (``invariants.strategies``), with labels drawn per example:

- symmetry: ⟨u, Hv⟩ = ⟨v, Hu⟩ (Schwarz: H = ∇²L is symmetric for twice-differentiable L);
- the forward-over-reverse HVP equals the central difference of gradients,
  Hv = (∇L(θ + εv) − ∇L(θ − εv)) / 2ε + O(ε²) (Pearlmutter 1994, Eq. 2), and the double-backward and
  reverse-over-reverse HVPs;
- Lanczos (ARPACK ``eigsh`` on HVPs) top eigenvalues equal those of the dense H's ``eigvalsh``;
- permutation equivariance: L(P(θ)) = L(θ) for every θ (Ainsworth et al. 2023, Eq. 1), so
  ∇²L(P(θ)) = P ∇²L(θ) Pᵀ, and the spectrum at P(θ) equals the spectrum at θ.

ResNets are used only where a property needs HVPs, not the dense H (they have thousands of parameters).
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from torch import Tensor

from invariants import strategies as S
from reference.hessian import (
    LossHessian,
    exact_spectrum,
    hvp_double_backward,
    hvp_reverse_over_reverse,
    loss_hessian,
    top_eigenvalues,
)
from reference.params import flatten
from reference.permutation import Permutation

SMALL = ("mlp", "cnn1d", "vgg")  # dense H affordable (≤ ~300 parameters)
# "large" (×10) weights saturate the softmax in float64: H is then rounding noise (entries ~1e-15,
# measured), where neither symmetry nor a relative comparison means anything. The other kinds stay.
KINDS = ("default", "small", "sgd", "heavy")


def _hessian(case: S.ModelCase, seed: int) -> LossHessian:
    """The Hessian of the case's loss on its inputs, with labels drawn from ``seed``."""
    with torch.no_grad():
        case.model.eval()
        n_cls = torch.func.functional_call(case.model, case.params, (case.x[:1],)).shape[-1]
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_cls, (case.x.shape[0],), generator=g)
    return loss_hessian(case.model, case.params, case.x, y)


def _vecs(d: int, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=torch.float64)


@given(case=S.model_cases(kinds=KINDS, dtype=torch.float64), seed=S.seeds)
def test_hvp_symmetric(case: S.ModelCase, seed: int) -> None:
    """Schwarz's theorem: H = ∇²L is symmetric, so ⟨u, Hv⟩ = ⟨v, Hu⟩ for all u, v (float64,
    relative to ‖u‖‖Hv‖ + ‖v‖‖Hu‖); every architecture, BatchNorm buffers held fixed."""
    H = _hessian(case, seed)
    u, v = _vecs(H.dim, 2, seed + 1)
    hu, hv = H.hvp_many(torch.stack([u, v]))
    scale = float(u.norm() * hv.norm() + v.norm() * hu.norm()) + 1e-300
    assert abs(float(u @ hv - v @ hu)) <= 1e-10 * scale, (float(u @ hv), float(v @ hu))


@given(case=S.model_cases(kinds=KINDS, dtype=torch.float64), seed=S.seeds)
def test_hvp_matches_gradient_differences(case: S.ModelCase, seed: int) -> None:
    """Pearlmutter 1994: Hv = d/dε ∇L(θ + εv)|₀ = (∇L(θ + εv) − ∇L(θ − εv)) / 2ε + O(ε²), ε = 1e-6, float64
    (the network is piecewise smooth: ReLU kinks are crossed with probability O(ε)); and the three HVP
    implementations (forward-over-reverse, double backward, reverse-over-reverse) agree to rounding."""
    H = _hessian(case, seed)
    (v,) = _vecs(H.dim, 1, seed + 2)
    v = v / v.norm()
    hv = H.hvp(v)
    eps = 1e-6
    fd = (H.grad(H.theta + eps * v) - H.grad(H.theta - eps * v)) / (2 * eps)
    scale = float(hv.abs().max()) + float(H.grad().abs().max()) * 1e-4 + 1e-12
    torch.testing.assert_close(fd, hv, rtol=1e-4, atol=1e-4 * scale)
    f = H.loss_fn()
    for other in (hvp_double_backward(f, H.theta, v), hvp_reverse_over_reverse(f, H.theta, v)):
        torch.testing.assert_close(other, hv, rtol=1e-9, atol=1e-9 * (float(hv.abs().max()) + 1e-300))


@given(case=S.model_cases(families=SMALL, kinds=KINDS, dtype=torch.float64), seed=S.seeds)
def test_lanczos_matches_exact_spectrum(case: S.ModelCase, seed: int) -> None:
    """Lanczos (ARPACK implicitly restarted Lanczos, ``eigsh`` on HVPs) top-k eigenvalues equal the k
    largest of ``eigvalsh`` of the dense H (d HVPs), to 1e-7 · max|λ|."""
    H = _hessian(case, seed)
    D = H.dense()
    assume(H.dim >= 6 and float(D.abs().max()) > 0)  # an all-dead ReLU net has H = 0 (eigsh: ValueError)
    k = min(3, H.dim - 3)
    exact_all = torch.linalg.eigvalsh(0.5 * (D + D.T))
    exact = exact_all.flip(0)[:k]
    got, vecs = top_eigenvalues(H, k, seed=seed % 1000, tol=1e-12)
    scale = float(exact_all.abs().max()) + 1e-300
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-7 * scale)
    # the returned vectors are eigenvectors: ‖Hq − λq‖ small
    res = H.hvp_many(vecs.T.contiguous()) - got.unsqueeze(1) * vecs.T
    assert float(res.norm(dim=1).max()) <= 1e-6 * scale


def _flat_index_map(H: LossHessian, perm: Permutation, case: S.ModelCase) -> Tensor:
    """π with flatten(P(θ))ᵢ = flatten(θ)_{π(i)}, from P applied to a point holding each coordinate's index."""
    idx = {k: v.clone() for k, v in case.params.items()}
    off = 0
    for k in H.keys:
        n = case.params[k].numel()
        idx[k] = torch.arange(off, off + n, dtype=torch.float64).reshape(case.params[k].shape)
        off += n
    return flatten(perm.apply(case.spec, idx), H.keys).round().long()


@given(case=S.model_cases(families=SMALL, kinds=KINDS, dtype=torch.float64), seed=S.seeds, pseed=S.perm_seeds)
def test_hessian_permutation_equivariant(case: S.ModelCase, seed: int, pseed: int) -> None:
    """Ainsworth et al. 2023, Eq. (1): L(P(θ)) = L(θ) with P(θ) = Πθ linear, so by the chain rule
    ∇²L(P(θ)) = Π ∇²L(θ) Πᵀ, i.e. H(P(θ))ᵢⱼ = H(θ)_{π(i)π(j)}; the spectrum is invariant."""
    perm = Permutation.random(case.spec, pseed)
    H = _hessian(case, seed)
    permuted = perm.apply(case.spec, case.params)
    Hp = loss_hessian(case.model, permuted, H.x, H.y, keys=H.keys)
    pi = _flat_index_map(H, perm, case)
    assert torch.equal(Hp.theta, H.theta[pi]), "flatten(P(θ)) is not θ[π]"
    D, Dp = H.dense(), Hp.dense()
    scale = float(D.abs().max()) + 1e-300
    torch.testing.assert_close(Dp, D[pi][:, pi], rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(exact_spectrum(Hp), exact_spectrum(H), rtol=1e-9, atol=1e-9 * scale)


@given(case=S.model_cases(families=("resnet", "vgg"), kinds=KINDS, dtype=torch.float64), seed=S.seeds,
       pseed=S.perm_seeds)
def test_hvp_permutation_equivariant(case: S.ModelCase, seed: int, pseed: int) -> None:
    """The HVP form of the equivariance, for nets too large for the dense H (ResNets with BatchNorm,
    LayerNorm, GroupNorm): H(P(θ)) (Πv) = Π (H(θ) v) (Ainsworth et al. 2023, Eq. 1 and the chain rule)."""
    perm = Permutation.random(case.spec, pseed)
    H = _hessian(case, seed)
    Hp = loss_hessian(case.model, perm.apply(case.spec, case.params), H.x, H.y, keys=H.keys)
    pi = _flat_index_map(H, perm, case)
    (v,) = _vecs(H.dim, 1, seed + 3)
    hv = H.hvp(v)
    got = Hp.hvp(v[pi])
    torch.testing.assert_close(got, hv[pi], rtol=1e-9, atol=1e-9 * (float(hv.abs().max()) + 1e-300))

