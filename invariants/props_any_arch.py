"""The two invariants on any architecture, with the spec discovered by tracing; mutants that must fail.

Issue #15, item 7. On the generated transformers, concatenation nets and depthwise-conv nets of
``invariants/strategies_arch.py`` (float64), with ``spec = reference.trace.trace_spec(model, x)``
(looked up at call time, so a mutation test can patch it):

(i) ``test_random_permutation_keeps_the_function``: f(P(θ), x) = f(θ, x) for P = Permutation.random(spec,
    seed), in eval mode (BatchNorm running statistics randomised) and train mode, relative error
    ≤ 1e-10 (Ainsworth et al. 2023, Eq. (1)).
(ii) ``test_combination_commutes_with_permutation``: Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ) bit-exactly (``torch.equal``)
    for 2–4 points and convex / affine / arbitrary k, and f(Σ kᵢ P(θᵢ)) = f(Σ kᵢ θᵢ) (train mode; eval
    mode for convex k, or any k without BatchNorm: an affine combination of ``running_var`` can be
    negative).
(iii) ``test_transformer_spec_couples_heads``: the tracer does not "pass" by fixing everything: every
    attention layer has a head class of two groups (Q/K, V/output) with ``blocks = head_dim`` and
    heads × head_dim units each, the stream is one group of ``dim`` units, the number of permuted units
    is what the architecture allows (stream + per block 2·heads·head_dim + MLP hidden), and the traced
    spec has the hand-written symmetry (``model.expected_spec()``); ``test_traced_spec_is_the_hand_written_one``
    checks the same equality on the concatenation and depthwise nets.
(iv) Mutants, built from the traced spec; for each, a random permutation of the mutant changes the
    function (relative error ≫ 1e-10) for some seed among ``MUTANT_SEEDS``, i.e. property (i) catches it,
    while the traced spec keeps the function for the very same seeds:

    (a) ``test_mutant_forgetting_the_qk_coupling_is_caught``: the head class removed and the Q and K
        output axes split into two independent groups (heads move independently too);
    (a′) ``test_mutant_qk_split_within_heads_is_caught``: Q and K split but all three groups in one head
        class (heads move alike; only the within-head orders of Q and K differ; head_dim ≥ 2);
    (a″) ``test_mutant_independent_head_permutations_is_caught``: Q/K coupled, but the head class removed
        (Q/K heads and V/output heads move independently; heads ≥ 2);
    (b) ``test_mutant_single_group_over_concatenation_is_caught``: every axis carrying one segmented
        (concatenated) entry — the consumers of a ``torch.cat`` along channels, or the stacked Q/K/V rows
        of ``nn.MultiheadAttention`` — permuted by one new group spanning it;
    (b′) ``test_mutant_unmerged_position_concatenation_is_caught``: a cat along a positional axis whose
        two branches keep separate groups.

Every mutant is a valid ``PermutationSpec`` (no bypass of the head check is needed). Meta-tests at the
end check that the strategies generate every variant and that the hand-written specs themselves keep
the function (the oracle of (iii) is sound, independently of the tracer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from random import Random
from typing import Any

import pytest
import torch
from hypothesis import Phase, assume, find, given, settings
from hypothesis import strategies as st
from torch.nn.modules.batchnorm import _BatchNorm

import reference.trace as trace  # looked up at call time (mutation tests patch trace_spec / RULES)
from invariants import strategies as S
from invariants import strategies_arch as A
from invariants.support import assert_params_equal, forward
from reference.params import combine
from reference.permutation import Permutation, PermutationSpec

RTOL = 1e-10
"""Relative tolerance of f(P(θ), x) = f(θ, x) in float64 (max |Δ| / max |f(θ, x)|)."""

MUTANT_SEEDS = 32
"""At most this many permutation seeds for a mutant to show itself (it usually does at the first: a
mutant's random permutation is one the architecture allows with probability ≤ 1/2 per seed, e.g. two
heads moved independently, so 32 seeds miss with probability ≤ 2⁻³²)."""

PROBE_BATCH = 32
"""Inputs the mutant properties evaluate on."""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def traced_spec(case: A.NetCase) -> PermutationSpec:
    return trace.trace_spec(case.model, case.x)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref|, both asserted finite first."""
    assert bool(torch.isfinite(ref).all()), "reference output is not finite"
    assert bool(torch.isfinite(out).all()), "output is not finite"
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _has_batchnorm(case: A.NetCase) -> bool:
    return any(isinstance(m, _BatchNorm) for m in case.model.modules())


def invariance_errors(case: A.NetCase, spec: PermutationSpec, perm: Permutation) -> dict[str, float]:
    """Relative error of f(P(θ), x) against f(θ, x) in eval and train mode."""
    permuted = perm.apply(spec, case.params)
    return {
        mode: relative_error(
            forward(case.model, permuted, case.x, train), forward(case.model, case.params, case.x, train)
        )
        for mode, train in (("eval", False), ("train", True))
    }


def check_invariance(case: A.NetCase, spec: PermutationSpec, perm: Permutation, what: str = "traced spec") -> None:
    errs = invariance_errors(case, spec, perm)
    bad = {m: e for m, e in errs.items() if not e <= RTOL}
    assert not bad, f"{what}: f(P(θ)) ≠ f(θ), relative error {bad} > {RTOL:g}; groups {spec.sizes}"


def check_mutant_caught(case: A.NetCase, spec: PermutationSpec, mutant: PermutationSpec, seed: int, what: str) -> None:
    """For seeds ``seed, seed + 1, …`` (at most ``MUTANT_SEEDS``): the traced spec keeps the function,
    and for one of them a random permutation of the mutant does not (property (i) catches it). Both
    are evaluated on a probe batch of ``PROBE_BATCH`` inputs (a few inputs can miss a difference)."""
    probe = case._replace(x=A.inputs(case, PROBE_BATCH, seed))
    worst = 0.0
    for s in range(seed, seed + MUTANT_SEEDS):
        check_invariance(probe, spec, Permutation.random(spec, s))
        worst = max(worst, *invariance_errors(probe, mutant, Permutation.random(mutant, s)).values())
        if worst > RTOL:
            return
    raise AssertionError(
        f"mutant {what} was not caught: relative error {worst:.3g} ≤ {RTOL:g} for all {MUTANT_SEEDS} seeds "
        f"(mutant groups {mutant.sizes})"
    )


Entry = Any  # a spec axis entry: None, a group, or segments


def respec(
    spec: PermutationSpec,
    rename: Callable[[str, int, int | None, str], str | None],
    blocks: dict[str, int] | None = None,
    heads: dict[str, str] | None = None,
) -> PermutationSpec:
    """``spec`` with every group occurrence (key, axis, segment offset or None, group) renamed by
    ``rename``; blocks and head classes of the new names from ``blocks`` / ``heads`` (default: the
    old ones, for names that survive)."""
    axes: dict[str, tuple[Entry, ...]] = {}
    for k, entries in spec.axes.items():
        new = []
        for ax, e in enumerate(entries):
            if e is None:
                new.append(None)
            elif isinstance(e, str):
                new.append(rename(k, ax, None, e))
            else:
                segs, off = [], 0
                for g, n in e:
                    segs.append((None if g is None else rename(k, ax, off, g), n))
                    off += n
                new.append(tuple(segs))
        axes[k] = tuple(new)
    return _spec_with(
        axes, spec.shapes, spec.blocks if blocks is None else blocks, spec.heads if heads is None else heads
    )


def _spec_with(
    axes: dict[str, tuple[Entry, ...]], shapes: Any, blocks: dict[str, int], heads: dict[str, str]
) -> PermutationSpec:
    """A spec over ``axes``, keeping the blocks and head classes of the groups that occur in it."""
    present = PermutationSpec(axes, shapes).sizes
    return PermutationSpec(
        axes,
        shapes,
        {g: b for g, b in blocks.items() if g in present},
        {g: h for g, h in heads.items() if g in present},
    )


def attention_groups(spec: PermutationSpec) -> list[tuple[str, str, str]]:
    """(head class, Q/K group, V/output group) per head class of two groups: the Q/K group is the one
    that never acts on an input axis (axis ≥ 1) of a weight."""
    out = []
    for h, gs in spec.head_classes.items():
        assert len(gs) == 2, f"head class {h!r} has groups {gs}; expected Q/K and V/output"
        on_inputs = [any(ax >= 1 for _, ax, _ in spec.members[g]) for g in gs]
        assert sorted(on_inputs) == [False, True], f"head class {h!r}: cannot tell Q/K from V/O in {gs}"
        qk, vo = (gs[0], gs[1]) if not on_inputs[0] else (gs[1], gs[0])
        out.append((h, qk, vo))
    return out


def projection(spec: PermutationSpec, key: str, ax: int, offset: int | None) -> str | None:
    """``"q"`` / ``"k"`` where (``key``, ``ax``, segment ``offset``) is the output axis of a query / key
    projection of the generated transformers (``q_proj`` / ``k_proj``, or the first / second third of
    ``nn.MultiheadAttention``'s stacked ``in_proj`` rows), else ``None``."""
    if ax != 0:
        return None
    if ".q_proj." in key:
        return "q"
    if ".k_proj." in key:
        return "k"
    if ".in_proj_" in key:
        return {0: "q", spec.shapes[key][0] // 3: "k"}.get(offset)  # type: ignore[arg-type]
    return None


def split_qk(spec: PermutationSpec, keep_heads: bool) -> PermutationSpec:
    """Mutants (a) / (a′): the query rows of every group on them move by a group ``<g>~q``, the key rows
    by ``<g>~k`` (the old group's block size); ``keep_heads``: each head class keeps its groups and
    gains the new ones (heads still move alike), else every head class is dropped."""
    blocks, heads = dict(spec.blocks), dict(spec.heads) if keep_heads else {}

    def rename(key: str, ax: int, off: int | None, g: str) -> str:
        p = projection(spec, key, ax, off)
        if p is None:
            return g
        blocks[f"{g}~{p}"] = spec.block(g)
        if keep_heads and g in spec.heads:
            heads[f"{g}~{p}"] = spec.heads[g]
        return f"{g}~{p}"

    mutant = respec(spec, rename, blocks, heads)
    assert len(mutant.sizes) > len(spec.sizes), f"no query / key projection found in {spec.axes}"
    return mutant


def normal_form(spec: PermutationSpec) -> PermutationSpec:
    """The same symmetry group in one representation (so that ``same_symmetry`` compares groups, not
    encodings): a group of one unit admits only the identity (→ ``None``); a head class whose groups
    all have blocks of 1 (head_dim 1: heads are units) says its groups move alike (→ one group);
    a block spanning its whole group, and a head class with one head, constrain nothing (dropped)."""
    sizes = spec.sizes
    merged: dict[str, str] = {}
    for gs in spec.head_classes.values():
        if all(spec.block(g) == 1 for g in gs):
            merged.update({g: gs[0] for g in gs})

    def rename(key: str, ax: int, off: int | None, g: str) -> str | None:
        return None if sizes[g] == 1 else merged.get(g, g)

    blocks = {g: b for g, b in spec.blocks.items() if 1 < b < sizes[g] and g not in merged}
    heads = {g: h for g, h in spec.heads.items() if g in blocks}
    classes: dict[str, int] = {}
    for h in heads.values():
        classes[h] = classes.get(h, 0) + 1
    heads = {g: h for g, h in heads.items() if classes[h] >= 2}
    return respec(spec, rename, blocks, heads)


def segmented_entries(spec: PermutationSpec) -> list[tuple[Entry, ...]]:
    """The distinct segmented axis entries of ``spec`` (in key order)."""
    out: list[tuple[Entry, ...]] = []
    for k in sorted(spec.axes):
        for e in spec.axes[k]:
            if isinstance(e, tuple) and e not in out:
                out.append(e)
    return out


def single_group_over(spec: PermutationSpec, segments: tuple[Entry, ...], name: str = "CAT") -> PermutationSpec:
    """Mutant (b): every axis whose entry is ``segments`` permuted by one new group ``name`` spanning it
    (groups that no longer occur lose their blocks and head classes)."""
    axes = {k: tuple(name if e == segments else e for e in es) for k, es in spec.axes.items()}
    return _spec_with(axes, spec.shapes, dict(spec.blocks), dict(spec.heads))


# ---------------------------------------------------------------------------------------------
# (i) a random permutation keeps the function
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", A.ARCH_FAMILIES)
@given(data=st.data(), seed=S.perm_seeds)
def test_random_permutation_keeps_the_function(family: str, data: st.DataObject, seed: int) -> None:
    """Ainsworth et al. 2023 (Git Re-Basin), Eq. (1): f(P(θ), x) = f(θ, x) for P = Permutation.random(
    trace_spec(m, x), seed), eval mode (random BatchNorm running statistics) and train mode, float64,
    relative error ≤ 1e-10; transformers (heads as blocks, Q/K and V/O coupled per head, Verma & Elbayad
    2024), concatenations (direct sums of groups) and depthwise convs."""
    case = data.draw(A.any_archs([family]), label="case")
    spec = traced_spec(case)
    check_invariance(case, spec, Permutation.random(spec, seed))


# ---------------------------------------------------------------------------------------------
# (ii) combinations commute with permutations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", A.ARCH_FAMILIES)
@given(data=st.data(), seed=S.perm_seeds, n=st.integers(2, 4))
def test_combination_commutes_with_permutation(family: str, data: st.DataObject, seed: int, n: int) -> None:
    """Linearity of P (Ainsworth et al. 2023, §2): Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ) bit-exactly for 2–4 points,
    convex / affine / arbitrary k, with the traced spec; and f(Σ kᵢ P(θᵢ)) = f(Σ kᵢ θᵢ) (≤ 1e-10) in
    train mode, and in eval mode for convex k or a model without BatchNorm."""
    case = data.draw(A.any_archs([family]), label="case")
    seeds = data.draw(st.lists(S.seeds, min_size=n - 1, max_size=n - 1), label="point seeds")
    points = [case.params, *(A.random_point(case.model, s) for s in seeds)]
    coeffs = data.draw(S.coefficients(n), label="coefficients")
    spec = traced_spec(case)
    perm = Permutation.random(spec, seed)
    left = combine(coeffs.values, [perm.apply(spec, p) for p in points])
    mixed = combine(coeffs.values, points)
    assert_params_equal(left, perm.apply(spec, mixed), f"Σ kᵢ P(θᵢ) vs P(Σ kᵢ θᵢ), {coeffs}")
    modes = [True] + ([False] if coeffs.family == "convex" or not _has_batchnorm(case) else [])
    for train in modes:
        err = relative_error(forward(case.model, left, case.x, train), forward(case.model, mixed, case.x, train))
        assert err <= RTOL, f"f(Σ kᵢ P(θᵢ)) vs f(Σ kᵢ θᵢ), {'train' if train else 'eval'} mode, {coeffs}: {err:.3g}"


# ---------------------------------------------------------------------------------------------
# (iii) the traced spec is the architecture's whole symmetry
# ---------------------------------------------------------------------------------------------
@given(case=A.transformers())
def test_transformer_spec_couples_heads(case: A.NetCase) -> None:
    """Verma & Elbayad 2024, §3; Imfeld et al. 2024 (attention heads permute as blocks, Q and K share
    one permutation, V and the output projection another, both following one head permutation): in
    the traced spec of every generated transformer (``normal_form``), each attention layer with ≥ 2
    heads of ≥ 2 units has a head class {Q/K, V/O} with blocks = head_dim and heads·head_dim units
    each, the stream is one group of ``dim`` units, the number of permuted units is what the
    architecture allows (``permuted_units``), and the symmetry is the hand-written one."""
    cfg, spec = case.config, normal_form(traced_spec(case))
    H, d = cfg["heads"], cfg["head_dim"]
    if H >= 2 and d >= 2:
        pairs = attention_groups(spec)
        assert len(pairs) == cfg["depth"], f"{len(pairs)} head classes for {cfg['depth']} attention layers"
        for h, qk, vo in pairs:
            for g in (qk, vo):
                assert spec.sizes[g] == H * d and spec.block(g) == d, (
                    f"head class {h!r}: group {g!r} has {spec.sizes[g]} units in blocks of {spec.block(g)}; "
                    f"expected {H} heads of {d}"
                )
    if cfg["dim"] >= 2:
        stream = spec.axes["head.weight"][1]
        assert isinstance(stream, str) and spec.sizes[stream] == cfg["dim"], (
            f"stream not permuted as one group of {cfg['dim']}: the head reads {stream!r}"
        )
    units, allowed = sum(spec.sizes.values()), case.model.permuted_units()
    assert units == allowed, f"{units} permuted units; the architecture allows {allowed}"
    expected = normal_form(case.model.expected_spec())
    assert spec.same_symmetry(expected), f"traced {spec.canonical()} vs hand-written {expected.canonical()}"


@pytest.mark.parametrize("family", ["concat", "depthwise"])
@given(data=st.data())
def test_traced_spec_is_the_hand_written_one(family: str, data: st.DataObject) -> None:
    """The symmetry discovered from the graph equals the one written by hand (Ainsworth et al. 2023,
    Appendix specs): a concatenation along channels is the direct sum of its parts' groups, a cat along
    positions merges them, a depthwise conv keeps its input's group, a grouped conv is held fixed."""
    case = data.draw(A.any_archs([family]), label="case")
    spec, expected = normal_form(traced_spec(case)), normal_form(case.model.expected_spec())
    assert spec.same_symmetry(expected), f"traced {spec.canonical()} vs hand-written {expected.canonical()}"


# ---------------------------------------------------------------------------------------------
# (iv) mutants are caught
# ---------------------------------------------------------------------------------------------
def _mixing(**kw: Any) -> st.SearchStrategy[A.NetCase]:
    """Transformers in which a mutant can show: attention mixes ≥ 2 positions (over one key softmax is
    1 whatever the queries and keys) and the stream has ≥ 3 units (a LayerNorm over 2 units outputs
    ±(1, −1) only: a post-norm block would hide almost any change)."""
    return A.transformers(tokens=(2, 4), dims=(3, 8), **kw).filter(lambda c: c.config["dim"] >= 3)


@given(case=_mixing(), seed=S.perm_seeds)
def test_mutant_forgetting_the_qk_coupling_is_caught(case: A.NetCase, seed: int) -> None:
    """Mutant (a): head class removed, Q and K output axes in two independent groups. Property (i)
    (Ainsworth et al. 2023, Eq. (1)) must catch it: q_π·k_σ ≠ q·k unless π = σ."""
    assume(case.config["heads"] * case.config["head_dim"] >= 2)
    spec = traced_spec(case)
    check_mutant_caught(case, spec, split_qk(spec, keep_heads=False), seed, "(a) Q/K coupling forgotten")


@given(case=_mixing(head_dims=(2, 4)), seed=S.perm_seeds)
def test_mutant_qk_split_within_heads_is_caught(case: A.NetCase, seed: int) -> None:
    """Mutant (a′): Q and K split, all groups still in one head class (heads move alike, the orders
    within a head differ between Q and K): caught by property (i) whenever head_dim ≥ 2."""
    spec = traced_spec(case)
    check_mutant_caught(case, spec, split_qk(spec, keep_heads=True), seed, "(a′) Q/K split within heads")


@given(case=_mixing(heads=(2, 4), head_dims=(2, 4)), seed=S.perm_seeds)
def test_mutant_independent_head_permutations_is_caught(case: A.NetCase, seed: int) -> None:
    """Mutant (a″): Q/K coupled but the head class removed, so the V/O heads move independently of the
    Q/K heads (head i's attention pattern would mix head j's values): caught whenever heads ≥ 2 (and
    head_dim ≥ 2: with head_dim 1 the coupled groups are one group, and there is no class to drop)."""
    spec = traced_spec(case)
    mutant = respec(spec, lambda k, ax, off, g: g, heads={})
    check_mutant_caught(case, spec, mutant, seed, "(a″) head class removed")


_concatenations = st.one_of(
    A.concat_nets(kinds=("mlp", "inception", "dense"), acts=("gelu",)), _mixing(attention=("mha",))
)
"""Concatenations along channels (GELU: a ReLU unit dead on every input would hide a relabelling) and
``nn.MultiheadAttention``'s stacked Q/K/V rows."""


@given(case=_concatenations, seed=S.perm_seeds, pick=st.integers(0, 7))
def test_mutant_single_group_over_concatenation_is_caught(case: A.NetCase, seed: int, pick: int) -> None:
    """Mutant (b): a concatenated axis (segments: a ``torch.cat`` along channels, or the stacked
    Q/K/V rows of ``nn.MultiheadAttention``) permuted as one group spanning it, i.e. independently of
    the parts it is made of: caught by property (i)."""
    spec = traced_spec(case)
    entries = segmented_entries(spec)
    assert entries, f"the traced spec has no concatenated (segmented) axis: {spec.axes}"
    segments = entries[pick % len(entries)]
    check_mutant_caught(case, spec, single_group_over(spec, segments), seed, f"(b) one group over {segments}")


@given(case=A.concat_nets(kinds=("positions",), acts=("gelu",)), seed=S.perm_seeds)
def test_mutant_unmerged_position_concatenation_is_caught(case: A.NetCase, seed: int) -> None:
    """Mutant (b′): the two branches of a cat along a positional axis keep separate groups (the next
    conv reads both with one kernel, so their channels must move alike): caught by property (i)."""
    spec = traced_spec(case)

    def rename(key: str, ax: int, off: int | None, g: str) -> str:
        return f"{g}~b" if key.startswith("conv_b.") else g

    mutant = respec(spec, rename)
    assert len(mutant.sizes) == len(spec.sizes) + 1, f"conv_a and conv_b do not share a group in {spec.axes}"
    check_mutant_caught(case, spec, mutant, seed, "(b′) cat along positions not merged")


# ---------------------------------------------------------------------------------------------
# meta-tests: the strategies generate every variant; the hand-written oracle is sound
# ---------------------------------------------------------------------------------------------
def _find(strategy: st.SearchStrategy, condition: Callable[[Any], bool], max_examples: int = 500) -> Any:
    cfg = settings(max_examples=max_examples, database=None, phases=[Phase.generate], deadline=None)
    return find(strategy, condition, settings=cfg, random=Random(0))


_T, _C, _D = A.transformers(), A.concat_nets, A.depthwise_nets()
_VARIANTS: dict[str, tuple[st.SearchStrategy[A.NetCase], Callable[[dict[str, Any]], bool]]] = {
    **{f"attention-{a}": (_T, lambda c, a=a: c["attention"] == a) for a in A.ATTENTION_IMPLS},
    **{f"readout-{r}": (_T, lambda c, r=r: c["readout"] == r) for r in A.READOUTS},
    "causal-manual-persistent-mask": (_T, lambda c: c["causal"] and c["attention"] == "manual" and c["persistent"]),
    "causal-mha": (_T, lambda c: c["causal"] and c["attention"] == "mha"),
    "causal-sdpa": (_T, lambda c: c["causal"] and c["attention"] == "sdpa"),
    "class-token-and-position": (_T, lambda c: c["cls"] and c["pos"] is not None),
    "position-TD": (_T, lambda c: c["pos"] == "TD"),
    "embedding-ids": (_T, lambda c: c["embedding"]),
    **{f"post-norm-{n}": (_T, lambda c, n=n: not c["prenorm"] and c["norm"] == n) for n in A.STREAM_NORMS},
    "pre-norm-layernorm-gelu": (_T, lambda c: c["prenorm"] and c["norm"] == "layer" and c["act"] == "gelu"),
    "4-heads-depth-2": (_T, lambda c: c["heads"] == 4 and c["depth"] == 2),
    "head-dim-4-no-bias": (_T, lambda c: c["head_dim"] == 4 and not c["bias"]),
    "dim-not-heads-times-head-dim": (_T, lambda c: c["dim"] != c["heads"] * c["head_dim"]),
    **{f"concat-{k}": (_C(kinds=(k,)), lambda c: True) for k in A.CONCAT_KINDS},
    "concat-gelu": (_C(), lambda c: c["act"] == "gelu"),
    "mlp-cat-with-input-batchnorm": (_C(kinds=("mlp",)), lambda c: c["with_input"] and c["norm"] == "batch"),
    "inception-pool-branch": (_C(kinds=("inception",)), lambda c: c["pool_branch"]),
    "dense-one-tensor-cat": (_C(kinds=("dense",)), lambda c: not c["with_input"]),
    "dense-with-input-3-layers": (_C(kinds=("dense",)), lambda c: c["with_input"] and len(c["growth"]) == 3),
    "cat-along-width": (_C(kinds=("positions",)), lambda c: c["dim"] == 3),
    **{f"block-{b}": (_D, lambda c, b=b: b in c["blocks"]) for b in A.BLOCK_KINDS},
    **{f"pool-{p}": (_D, lambda c, p=p: c["pool"] == p) for p in A.POOLS},
    "separable-residual": (_D, lambda c: c["residual"] and "separable" in c["blocks"]),
    "3-blocks": (_D, lambda c: len(c["blocks"]) == 3),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_strategies_generate(variant: str) -> None:
    """Each variant the properties must cover is drawn (``hypothesis.find``, fixed seed)."""
    strategy, condition = _VARIANTS[variant]
    _find(strategy, lambda case: condition(case.config))


@given(case=A.any_archs(), seed=S.perm_seeds)
def test_hand_written_specs_keep_the_function(case: A.NetCase, seed: int) -> None:
    """The oracle of (iii) is sound without the tracer: f(P(θ), x) = f(θ, x) for P drawn from
    ``model.expected_spec()`` (eval and train mode, ≤ 1e-10)."""
    spec = case.model.expected_spec()
    check_invariance(case, spec, Permutation.random(spec, seed), "hand-written spec")


@given(case=A.any_archs(), seed=S.seeds)
def test_points_are_seeded_and_off_init(case: A.NetCase, seed: int) -> None:
    """``random_point`` is a function of the seed; BatchNorm buffers and 1-D parameters are moved
    (running_var > 0 and ≠ 1, running_mean ≠ 0, norm weights ≠ 1); every generated state is finite."""
    p, q = A.random_point(case.model, seed), A.random_point(case.model, seed)
    assert_params_equal(p, q, "same seed")
    for point in (case.params, p):
        for k, v in point.items():
            if k.endswith("running_var"):
                assert bool((v > 0).all()) and bool((v != 1).all()), k
            elif k.endswith("running_mean") or (v.is_floating_point() and v.ndim == 1):
                assert bool((v != 0).all()) and bool((v != 1).all()), k
            if v.is_floating_point():
                assert v.dtype == torch.float64 and bool(torch.isfinite(v).all()), k


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture families"):
        A.any_archs(["rnn"])


def _segment_counts(spec: PermutationSpec) -> Sequence[int]:
    return [len(e) for e in segmented_entries(spec)]


def test_hand_written_specs_have_the_structures_the_mutants_need() -> None:
    """The mutants have something to act on: MHA's Q/K/V rows and a DenseNet's cat are segmented axes
    (three and ≥ 2 segments), a transformer's spec has a head class, a cat along positions merges its
    branches into one group (hand-written specs, so this holds whatever the tracer does)."""
    mha = _find(A.transformers(attention=("mha",)), lambda c: True).model.expected_spec()
    assert 3 in _segment_counts(mha) and attention_groups(mha)
    dense = _find(A.concat_nets(kinds=("dense",)), lambda c: True).model.expected_spec()
    assert max(_segment_counts(dense)) >= 2
    pos = _find(A.concat_nets(kinds=("positions",)), lambda c: True).model.expected_spec()
    assert pos.axes["conv_a.weight"][0] == pos.axes["conv_b.weight"][0] is not None
