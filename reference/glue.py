"""Gluing permuted simplexes into a simplicial complex through permutation equivalence classes.

**Gluing** (``glue``): low-loss simplexes built from overlapping sets of modes, each in its own
labelling, are glued into a simplicial complex by identifying vertices of one permutation
equivalence class θ̄ = {P(θ)} (the note's Figure 2). Two vertices are identified iff one is a
permutation of the other (``permutation_equivalent``: the canonical forms of
``reference.merge.canonical_permutation`` give the candidate map, weight matching is the fallback
for ties, and P(b) = a is then checked entry-wise). ``PermutedComplex`` samples uniformly from the
union of its simplexes (a simplex with probability ∝ its volume, or uniformly per simplex, then
λ ∼ Dir(1) on it) and checks that identified vertices compute the same function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .evaluate import predict_logits
from .matching import weight_matching
from .merge import canonical_permutation
from .params import Params, check_compatible, check_finite, is_float, stack
from .permutation import Permutation, PermutationSpec
from .simplex import sample_dirichlet, simplex_volume
from .simplex_barrier import simplex_points
from .validate import generator as as_generator
from .validate import integer

__all__ = ["PermutedComplex", "glue", "permutation_equivalent", "same_point"]


# ---------------------------------------------------------------------------------------------
# gluing into a simplicial complex


def same_point(a: Mapping[str, Tensor], b: Mapping[str, Tensor], rtol: float, atol: float) -> bool:
    """Whether two parameter dicts are equal entry-wise: floating entries within ``rtol``/``atol``
    (compared in float64), integer entries exactly. ``permutation_equivalent`` accepts a candidate
    map only if this holds for P(b) and a."""
    return all(torch.allclose(a[k].double(), b[k].double().to(a[k].device), rtol=rtol, atol=atol)
               if is_float(a[k]) else torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def permutation_equivalent(
    spec: PermutationSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> Permutation | None:
    """A permutation P with P(b) = a (entry-wise within ``rtol``/``atol``), or ``None`` if there is none.

    Candidate maps: the canonical forms (``canonical_permutation``: P = c_a⁻¹ ∘ c_b, exact when the
    units' weight norms have no ties), then weight matching of b to a (ties, e.g. dead units); a
    candidate counts only if P(b) matches a entry-wise, so a returned P is always a witness. ``None``
    for a pair that is not equivalent; for an equivalent pair with tied norms *and* a weight-matching
    local optimum that misses P, also ``None`` (not observed on trained or generic weights).
    """
    if set(a) != set(b):
        raise ValueError(f"the two points have different keys: {sorted(set(a) ^ set(b))}")
    spec.check_params(a)
    spec.check_params(b)
    if any(a[k].shape != b[k].shape for k in a):
        bad = [k for k in a if a[k].shape != b[k].shape]
        raise ValueError(f"shapes differ at {bad}")
    p = canonical_permutation(spec, a).inverse().compose(canonical_permutation(spec, b))
    if same_point(a, p.apply(spec, b), rtol, atol):
        return p
    p = weight_matching(spec, a, b, init=p).perm
    return p if same_point(a, p.apply(spec, b), rtol, atol) else None


@dataclass(frozen=True)
class PermutedComplex:
    """Permuted simplexes glued along permutation-equivalent vertices (module docstring).

    ``simplices[j]``: the vertex dicts of simplex j, in that simplex's own labelling;
    ``classes[j][v]``: the equivalence class of its vertex v (0 … ``n_classes`` − 1, numbered in order
    of first appearance); ``maps[j][v]``: the permutation P with P(representative) = vertex, the
    representative being the class's first occurrence.
    """

    simplices: tuple[tuple[Params, ...], ...]
    classes: tuple[tuple[int, ...], ...]
    maps: tuple[tuple[Permutation, ...], ...]

    @property
    def n_classes(self) -> int:
        return 1 + max(c for cl in self.classes for c in cl)

    def occurrences(self) -> dict[int, list[tuple[int, int]]]:
        """Class → every (simplex, vertex) it occurs at."""
        out: dict[int, list[tuple[int, int]]] = {}
        for j, cl in enumerate(self.classes):
            for v, c in enumerate(cl):
                out.setdefault(c, []).append((j, v))
        return out

    def shared(self) -> dict[int, list[tuple[int, int]]]:
        """The glued vertices: classes occurring in more than one simplex."""
        return {c: occ for c, occ in self.occurrences().items() if len({j for j, _ in occ}) > 1}

    def volumes(self) -> Tensor:
        return torch.stack([simplex_volume(list(s)) for s in self.simplices])

    def sample(
        self, n_samples: int, generator: torch.Generator | int | None = None, weighting: str = "volume"
    ) -> tuple[Tensor, Tensor, Params]:
        """``n_samples`` points uniform on the complex: a simplex j with probability ∝ its volume
        (``weighting="volume"``, simplexes of one dimension) or uniform (``"uniform"``), then λ ∼
        Dir(1) on it. Returns (simplex index [S], λ [S, k] (zero-padded to the largest k), stacked points)."""
        integer("n_samples", n_samples, 1)
        g = as_generator(generator, default_seed=0)
        ks = [len(s) for s in self.simplices]
        if weighting == "volume":
            if len(set(ks)) != 1:
                raise ValueError("volume weighting needs simplexes of one dimension; use weighting='uniform'")
            w = self.volumes()
            if not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
                raise ValueError(f"degenerate simplex volumes {w.tolist()}; use weighting='uniform'")
        elif weighting == "uniform":
            w = torch.ones(len(ks), dtype=torch.float64)
        else:
            raise ValueError(f"weighting must be 'volume' or 'uniform', got {weighting!r}")
        js = torch.multinomial(w / w.sum(), n_samples, replacement=True, generator=g)
        K = max(ks)
        lams = torch.zeros(n_samples, K, dtype=torch.float64)
        pts = []
        for r, j in enumerate(js.tolist()):
            lam = sample_dirichlet(1, ks[j], g)
            lams[r, : ks[j]] = lam[0]
            pts.append(simplex_points(self.simplices[j], lam))
        return js, lams, {k: torch.cat([p[k] for p in pts]) for k in pts[0]}

    @torch.no_grad()
    def function_gap(self, model: nn.Module, x: Tensor) -> dict[int, float]:
        """Per glued class, the largest |logit difference| between any occurrence and the class's
        representative on inputs ``x`` (0 up to rounding: identified vertices are one function)."""
        out = {}
        for c, occ in self.occurrences().items():
            pts = stack([self.simplices[j][v] for j, v in occ])
            lg = predict_logits(model, pts, x)
            out[c] = float((lg - lg[:1]).abs().max())
        return out


def glue(
    spec: PermutationSpec,
    simplices: Sequence[Sequence[Mapping[str, Tensor]]],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> PermutedComplex:
    """Glue simplexes (each a sequence of vertex dicts in its own labelling) into a ``PermutedComplex``
    by identifying permutation-equivalent vertices (``permutation_equivalent``). Raises ``ValueError``
    for fewer than one simplex, a simplex with fewer than 2 vertices, mismatched architectures, or a
    simplex with two equivalent vertices (a degenerate simplex: its points collapse modulo P)."""
    sims = [list(s) for s in simplices]
    if not sims:
        raise ValueError("nothing to glue: no simplexes")
    for j, s in enumerate(sims):
        if len(s) < 2:
            raise ValueError(f"simplex {j} has {len(s)} vertex; a simplex here needs at least 2")
    check_compatible(*[v for s in sims for v in s])
    reps: list[Mapping[str, Tensor]] = []
    classes, maps = [], []
    for j, s in enumerate(sims):
        cl, mp = [], []
        for v in s:
            spec.check_params(v)
            check_finite(v, f"a vertex of simplex {j}")
            found = None
            for c, r in enumerate(reps):
                p = permutation_equivalent(spec, v, r, rtol=rtol, atol=atol)
                if p is not None:
                    found = (c, p)
                    break
            if found is None:
                reps.append(v)
                found = (len(reps) - 1, Permutation.identity(spec))
            if found[0] in cl:
                raise ValueError(f"simplex {j} holds two permutation-equivalent vertices (class {found[0]}): "
                                 f"a degenerate simplex")
            cl.append(found[0])
            mp.append(found[1])
        classes.append(tuple(cl))
        maps.append(tuple(mp))
    return PermutedComplex(tuple(tuple(dict(v) for v in s) for s in sims), tuple(classes), tuple(maps))
