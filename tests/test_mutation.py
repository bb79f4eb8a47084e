"""Mutation tests: inject a known bug, and check that the property meant to catch it fails.

Each test plants one bug in ``reference/`` (or in the strategies) through a *public* seam — a public
function or class attribute replaced with ``monkeypatch.setattr``, or an entry of a public registry
(``reference.matching.SOLVERS``, ``reference.trace.RULES``) replaced with ``monkeypatch.setitem`` —
runs a property of ``invariants/`` under fixed settings (``MUTATION_SETTINGS``: derandomized, no
shrinking, no example database) and asserts that it raises ``AssertionError`` (the property's own
check, not a crash). ``test_properties_pass_unmutated`` runs the same properties with the same
settings and no mutant: the failures are the mutants'. ``test_mutation_tests_use_public_seams_only``
checks that this file never patches or reads a private name.

Hypothesis is driven through its public API only. A ``@given`` test keeps the settings that were
current when it was decorated, and ``@settings`` may be applied to it only once, so
``run_property`` imports a *fresh copy* of the property's module while a registered settings
profile (``settings.register_profile`` / ``load_profile``) holds ``MUTATION_SETTINGS``, restores
the session's profile, points the copy's ``hypothesis.inner_test`` (the documented hook for
custom execution) at the *original* property's body, and runs the copy. So the examples come from
the copy's ``@given`` (same source: the same derandomized examples as the original would draw with
these settings) and every example runs the original body, with the original module's globals (a
mutant planted there, or in ``reference/``, is seen as it always was); the modules the session
collected are never modified. (``prop.hypothesis.fuzz_one_input`` would need no copy, but hypothesis 6.155's bytestring
provider never offsets a bounded integer draw by its lower bound — ``st.integers(16, 20)`` never
yields a valid example, HypothesisWorks/hypothesis#4847 — so most strategies here fail under it.)

The table of mutants and the properties that catch them is in ``invariants/README.md``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import sys
from pathlib import Path

import numpy
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import NoSuchExample
from scipy.optimize import linear_sum_assignment

import reference.barrier
import reference.matching
import reference.params
import reference.specs
import reference.trace
from invariants import (
    props_any_arch,
    props_barrier,
    props_group,
    props_invariance,
    props_matching,
    props_params,
    props_specs,
    props_strategies,
)
from invariants import strategies as S
from reference.barrier import Barrier
from reference.permutation import Permutation, PermutationSpec

pytestmark = pytest.mark.mutation

MUTATION_SETTINGS = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: the first failure is enough
    report_multiple_bugs=False,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one intra-op thread (see invariants/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mutation_copy(monkeypatch: pytest.MonkeyPatch, prop, max_examples: int):
    """``prop`` as decorated in a fresh import of its module under ``MUTATION_SETTINGS`` (with
    ``max_examples``). The session's settings profile is restored before this returns."""
    assert getattr(prop, "is_hypothesis_test", False), f"{prop.__name__} is not a @given property"
    original = sys.modules[prop.__module__]
    name = f"{original.__name__}.mutation_copy"
    spec = importlib.util.spec_from_file_location(name, original.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it executes
    profile = f"mutation-{max_examples}"
    settings.register_profile(profile, MUTATION_SETTINGS, max_examples=max_examples)
    before = settings.get_current_profile_name()
    settings.load_profile(profile)
    try:
        spec.loader.exec_module(module)
    finally:
        settings.load_profile(before)
    copy = getattr(module, prop.__name__)
    assert copy is not prop and getattr(copy, "is_hypothesis_test", False)
    copy.hypothesis.inner_test = prop.hypothesis.inner_test  # the original body and globals
    return copy


def run_property(monkeypatch: pytest.MonkeyPatch, prop, max_examples: int = 60) -> None:
    """Run the ``@given`` property ``prop`` under ``MUTATION_SETTINGS`` (see the module docstring)."""
    mutation_copy(monkeypatch, prop, max_examples)()


def assert_caught(monkeypatch: pytest.MonkeyPatch, prop, max_examples: int = 60) -> AssertionError:
    with pytest.raises(AssertionError) as info:
        run_property(monkeypatch, prop, max_examples)
    return info.value


# ---------------------------------------------------------------------------------------------
# spec mutants (a), (b), (c)
# ---------------------------------------------------------------------------------------------
_hand_spec = reference.specs.spec_for


def _respec(spec: PermutationSpec, axes: dict, blocks: dict | None = None) -> PermutationSpec:
    return PermutationSpec(axes, spec.shapes, spec.blocks if blocks is None else blocks)


def spec_without_running_stats(model) -> PermutationSpec:
    """(a) BatchNorm's running_mean / running_var left unpermuted (a public PyTorch port's bug)."""
    spec = _hand_spec(model)
    stats = ("running_mean", "running_var")
    return _respec(spec, {k: (None,) * len(g) if k.endswith(stats) else g for k, g in spec.axes.items()})


def spec_with_transposed_weights(model) -> PermutationSpec:
    """(b) A permutation on the wrong axis: weights written in JAX's [in, out] layout, i.e. the
    output group applied to PyTorch's input axis and vice versa (wherever the shapes allow it:
    square layers, e.g. every ResNet ``conv2`` [c, c, 3, 3])."""
    spec = _hand_spec(model)
    axes = {}
    for k, g in spec.axes.items():
        shape = spec.shapes[k]
        if len(g) >= 2 and None not in g[:2] and g[0] != g[1] and shape[0] == shape[1]:
            g = (g[1], g[0], *g[2:])
        axes[k] = g
    return _respec(spec, axes)


def spec_with_split_residual_stream(model) -> PermutationSpec:
    """(c) The residual stream of stage 1 given two independent groups, as a spec written layer by
    layer would: the stem (conv, norm, and the first block's conv1 reading it) gets its own group,
    although its output is added to layer1.0.conv2's."""
    spec = _hand_spec(model)
    if type(model).__name__ != "ResNet":
        return spec
    stream = spec.axes["layer1.0.conv2.weight"][0]
    stem = f"{stream}_stem"

    def rename(k: str, g: tuple) -> tuple:
        if k.startswith(("conv.", "norm.")) or k == "layer1.0.conv1.weight":
            return tuple(stem if x == stream else x for x in g)
        return g

    blocks = dict(spec.blocks)
    if stream in blocks:
        blocks[stem] = blocks[stream]
    return _respec(spec, {k: rename(k, g) for k, g in spec.axes.items()}, blocks)


# (mutant spec, the property that must catch it, a phrase its failure names)
SPEC_MUTANTS = {
    "a-unpermuted-running-stats-eval-mode": (spec_without_running_stats,
                                             props_invariance.test_function_invariance_eval_mode, "eval mode"),
    "b-wrong-axis-resnets": (spec_with_transposed_weights, props_invariance.test_function_invariance_resnets, ""),
    "b-wrong-axis-train-mode": (spec_with_transposed_weights,
                                props_invariance.test_function_invariance_train_mode, ""),
    "c-split-stream-resnets": (spec_with_split_residual_stream,
                               props_invariance.test_function_invariance_resnets, ""),
    # the traced spec merges the stream; a hand spec that splits it disagrees with it
    "c-split-stream-spec-discovery": (spec_with_split_residual_stream,
                                      props_specs.test_traced_spec_has_the_hand_written_symmetry, ""),
}


@pytest.mark.parametrize("name", list(SPEC_MUTANTS))
def test_spec_mutant_caught(monkeypatch, name):
    mutant, prop, phrase = SPEC_MUTANTS[name]
    monkeypatch.setattr(reference.specs, "spec_for", mutant)
    err = assert_caught(monkeypatch, prop)
    assert phrase in str(err)


def test_a_unpermuted_running_stats_invisible_in_train_mode(monkeypatch):
    """Why eval mode is a separate property: batch statistics hide mutant (a)."""
    monkeypatch.setattr(reference.specs, "spec_for", spec_without_running_stats)
    run_property(monkeypatch, props_invariance.test_function_invariance_train_mode)


# ---------------------------------------------------------------------------------------------
# matching mutants (d) and others
# ---------------------------------------------------------------------------------------------
def test_d_matching_skips_a_group_caught_by_recovery(monkeypatch):
    """Weight matching whose passes never visit the first group (it is never updated); the order of
    the others is the one the seeded generator draws."""
    real = reference.matching.group_order

    def skip_first(groups, rng):
        return [g for g in real(groups, rng) if g != groups[0]]

    monkeypatch.setattr(reference.matching, "group_order", skip_first)
    err = assert_caught(monkeypatch, props_matching.test_weight_matching_recovers_inverse_one_group)
    assert "misaligned" in str(err)
    assert_caught(monkeypatch, props_matching.test_weight_matching_recovers_inverse)


def test_matching_ignores_init_caught_by_equivariance(monkeypatch):
    """Weight matching that always starts at the identity (``init`` dropped)."""
    real = reference.matching.starting_permutation
    monkeypatch.setattr(reference.matching, "starting_permutation", lambda spec, init: real(spec, None))
    assert_caught(monkeypatch, props_matching.test_weight_matching_equivariance)


def test_matching_permutes_the_solved_axis_caught_by_history(monkeypatch):
    """The similarity S_g computed with P_g already applied to θ_b (``permute_except`` ignoring
    the axis being solved): each step solves the wrong assignment."""
    real = reference.matching.permute_except

    def permute_all(spec, perm, key, w, skip):
        return real(spec, perm, key, w, -1)

    monkeypatch.setattr(reference.matching, "permute_except", permute_all)
    assert_caught(monkeypatch, props_matching.test_weight_matching_objective_never_decreases)


def test_lap_minimises_caught_by_activation_matching(monkeypatch):
    """A sign error: the default assignment solver minimises the correlation instead of maximising it."""

    def minimise(S):
        return linear_sum_assignment(S, maximize=False)[1]

    monkeypatch.setitem(reference.matching.SOLVERS, "scipy", minimise)
    assert_caught(monkeypatch, props_matching.test_activation_matching_recovers_inverse_mlp)


# ---------------------------------------------------------------------------------------------
# barrier mutants (e) and others
# ---------------------------------------------------------------------------------------------
_real_barrier = reference.barrier.barrier


def barrier_with_swapped_chord(values, t, kind="max_chord", *, metric="loss", split="train") -> Barrier:
    """(e) max_chord measured against the wrong chord: v(0) and v(1) swapped."""
    if kind != "max_chord":
        return _real_barrier(values, t, kind, metric=metric, split=split)
    v = torch.as_tensor(values, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    gap = v - ((1 - t) * v[-1] + t * v[0])
    i = int(torch.argmax(gap))
    return Barrier(float(gap[i]), float(t[i]), kind, metric, split, int(t.numel()))


def test_e_wrong_chord_caught_by_barrier_properties(monkeypatch):
    monkeypatch.setattr(reference.barrier, "barrier", barrier_with_swapped_chord)
    assert_caught(monkeypatch, props_barrier.test_max_chord_barrier_invariant_under_affine_trend)
    assert_caught(monkeypatch, props_barrier.test_curve_below_its_chord_has_zero_barrier)


def test_mid_lower_bound_without_half_caught(monkeypatch):
    real = reference.barrier.barrier_lower_bound

    def bound(values, kind):
        return 2 * real(values, kind)

    monkeypatch.setattr(reference.barrier, "barrier_lower_bound", bound)
    assert_caught(monkeypatch, props_barrier.test_barrier_never_below_lower_bound)


_VMAP_FALLBACK = "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning"


@pytest.mark.filterwarnings(_VMAP_FALLBACK)
def test_barrier_on_unpermuted_running_stats_caught(monkeypatch):
    """Mutant (a) seen through barriers: a common P without its BatchNorm statistics changes the
    path's eval-mode losses."""
    monkeypatch.setattr(reference.specs, "spec_for", spec_without_running_stats)
    assert_caught(monkeypatch, props_barrier.test_barrier_invariant_under_common_permutation)


# ---------------------------------------------------------------------------------------------
# group-law mutants
# ---------------------------------------------------------------------------------------------
def test_compose_in_the_wrong_order_caught(monkeypatch):
    """``P ∘ Q`` built as ``Q ∘ P`` (index p[q] instead of q[p]); ``P @ Q`` calls ``compose``."""

    def compose(self, other):
        return Permutation({g: self[g][other[g]] for g in self})

    monkeypatch.setattr(Permutation, "compose", compose)
    assert_caught(monkeypatch, props_group.test_action_of_composition)


def test_inverse_not_inverted_caught(monkeypatch):
    """``inverse`` that returns the same index (argsort forgotten)."""
    monkeypatch.setattr(Permutation, "inverse", lambda self: Permutation(self.to_dict()))
    assert_caught(monkeypatch, props_group.test_inverse_law)


def test_identity_not_identity_caught(monkeypatch):
    monkeypatch.setattr(Permutation, "identity", classmethod(lambda cls, spec: Permutation.random(spec, 1)))
    assert_caught(monkeypatch, props_group.test_identity_law)


def test_serialisation_of_the_inverse_caught(monkeypatch):
    """save / to_json writing the other index convention (the inverse)."""
    monkeypatch.setattr(Permutation, "to_dict", lambda self: {g: torch.argsort(v) for g, v in self.items()})
    monkeypatch.setattr(
        Permutation, "to_json", lambda self: json.dumps({g: torch.argsort(v).tolist() for g, v in self.items()})
    )
    assert_caught(monkeypatch, props_group.test_save_load_round_trip)
    assert_caught(monkeypatch, props_group.test_json_round_trip)


# ---------------------------------------------------------------------------------------------
# params and spec-discovery mutants
# ---------------------------------------------------------------------------------------------
def test_integer_buffers_averaged_caught(monkeypatch):
    """Every tensor treated as a coordinate: num_batches_tracked gets averaged."""
    monkeypatch.setattr(reference.params, "is_float", lambda t: True)
    assert_caught(monkeypatch, props_params.test_integer_buffers_are_never_averaged)


def test_combine_in_float32_caught(monkeypatch):
    """A combination accumulated in float32 (loses float64 points' precision and dtype)."""
    real = reference.params.combine

    def combine32(coeffs, points, int_policy="first"):
        out = real(coeffs, points, int_policy)
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}

    monkeypatch.setattr(reference.params, "combine", combine32)
    assert_caught(monkeypatch, props_params.test_combine_one_point_is_identity)


def test_linear_path_reversed_caught(monkeypatch):
    """linear_path with coefficients (t, 1 − t): the path runs from b to a."""
    real = reference.barrier.linear_path

    def reversed_path(a, b, num_points):
        return real(b, a, num_points)

    monkeypatch.setattr(reference.barrier, "linear_path", reversed_path)
    assert_caught(monkeypatch, props_params.test_lerp_endpoints)


def test_combine_batch_reversed_coefficients_caught(monkeypatch):
    real = reference.params.combine_batch
    monkeypatch.setattr(reference.params, "combine_batch", lambda coeffs, points: real(coeffs.flip(1), points))
    assert_caught(monkeypatch, props_params.test_lerp_matches_combine_batch)


def test_trace_spec_without_residual_merge_caught(monkeypatch):
    """Spec discovery that does not merge the channel spaces of an addition: every target whose rule
    is ``residual_add`` gets a rule that keeps the first operand's spaces only."""

    def first_operand(tracer, n, result):
        return list(tracer.axes[tracer.tensor_inputs(n)[0]])

    additions = [t for t, rule in reference.trace.RULES.items() if rule is reference.trace.residual_add]
    assert len(additions) >= 2  # operator.add and friends
    for target in additions:
        monkeypatch.setitem(reference.trace.RULES, target, first_operand)
    assert_caught(monkeypatch, props_specs.test_traced_spec_has_the_hand_written_symmetry)
    assert_caught(monkeypatch, props_specs.test_traced_spec_preserves_the_function)


def test_trace_spec_without_contraction_merge_caught(monkeypatch):
    """Spec discovery whose matrix product forgets to merge the contracted axes: ``q @ kᵀ`` no longer
    couples Q with K inside each head (heads still move together), so the traced spec of a
    hand-written attention permutes Q and K independently and changes the function."""

    def no_contraction(tracer, n, result):
        xa, xb = tracer.axes[n.args[0]], tracer.axes[n.args[1]]
        for a, b in zip(xa[:-2], xb[:-2], strict=True):  # batch (head) axes still merged
            tracer.spaces.union(a, b)
        return [*xa[:-2], xa[-2], xb[-1]]

    matmuls = [t for t, rule in reference.trace.RULES.items() if rule is reference.trace.matmul]
    assert operator.matmul in matmuls
    for target in matmuls:
        monkeypatch.setitem(reference.trace.RULES, target, no_contraction)
    with pytest.raises(AssertionError):
        mutation_copy(monkeypatch, props_any_arch.test_random_permutation_keeps_the_function, 60)(
            family="transformer"
        )


# ---------------------------------------------------------------------------------------------
# a strategy mutant: the meta-tests can fail too
# ---------------------------------------------------------------------------------------------
def test_strategies_without_batchnorm_caught_by_meta_test(monkeypatch):
    monkeypatch.setattr(S, "NORMS", (None, "layer", "group"))
    monkeypatch.setattr(S, "RESNET_NORMS", (None, "layer", "group"))
    with pytest.raises(NoSuchExample):
        props_strategies.test_generates_batchnorm()


# ---------------------------------------------------------------------------------------------
# control: the same properties, same settings, no mutant
# ---------------------------------------------------------------------------------------------
_PROPERTIES = [
    props_invariance.test_function_invariance_eval_mode,
    props_invariance.test_function_invariance_train_mode,
    props_invariance.test_function_invariance_resnets,
    props_specs.test_traced_spec_has_the_hand_written_symmetry,
    props_specs.test_traced_spec_preserves_the_function,
    props_matching.test_weight_matching_recovers_inverse_one_group,
    props_matching.test_weight_matching_recovers_inverse,
    props_matching.test_weight_matching_equivariance,
    props_matching.test_weight_matching_global_optimum_is_only_the_inverse,
    props_matching.test_weight_matching_objective_never_decreases,
    props_matching.test_activation_matching_recovers_inverse_mlp,
    props_barrier.test_max_chord_barrier_invariant_under_affine_trend,
    props_barrier.test_curve_below_its_chord_has_zero_barrier,
    props_barrier.test_barrier_never_below_lower_bound,
    props_barrier.test_barrier_invariant_under_common_permutation,
    props_group.test_action_of_composition,
    props_group.test_inverse_law,
    props_group.test_identity_law,
    props_group.test_save_load_round_trip,
    props_group.test_json_round_trip,
    props_params.test_integer_buffers_are_never_averaged,
    props_params.test_combine_one_point_is_identity,
    props_params.test_lerp_endpoints,
    props_params.test_lerp_matches_combine_batch,
]


@pytest.mark.filterwarnings(_VMAP_FALLBACK)
@pytest.mark.parametrize("prop", _PROPERTIES, ids=lambda p: p.__name__)
def test_properties_pass_unmutated(monkeypatch, prop):
    run_property(monkeypatch, prop)


# --- mutants of the Git Re-Basin extensions (Sinkhorn, universe alignment) ------------------------


def test_mutant_sinkhorn_without_column_step(monkeypatch):
    """Sinkhorn that only normalises rows (a softmax): caught by the doubly-stochastic property."""
    from invariants import props_ste_sinkhorn

    def rows_only(log_alpha, iters=100, *, tol=None):
        return torch.softmax(log_alpha.double(), dim=-1).to(log_alpha.dtype)

    monkeypatch.setattr(props_ste_sinkhorn, "sinkhorn", rows_only)
    assert_caught(monkeypatch, props_ste_sinkhorn.test_sinkhorn_is_doubly_stochastic)


def test_mutant_universe_maps_composed_in_the_wrong_order(monkeypatch):
    """P_ij = U_j⁻¹ ∘ U_i instead of U_i⁻¹ ∘ U_j: caught by the cycle-consistency property."""
    from invariants import props_merge

    def swapped(U, i, j):
        us = U.to_universe if hasattr(U, "to_universe") else list(U)
        return us[j].inverse().compose(us[i])

    monkeypatch.setattr(props_merge, "pairwise_from_universe", swapped)
    assert_caught(monkeypatch, props_merge.test_sync_universe_is_cycle_consistent, max_examples=30)


# --- mutants of the permuted-simplex machinery -------------------------------------------------


def test_mutant_glue_never_identifies_caught(monkeypatch):
    """Gluing whose equivalence check never succeeds (every vertex its own class): caught by the
    gluing property (classes must be the models)."""
    import reference.glue
    from invariants import props_permuted_simplex

    monkeypatch.setattr(reference.glue, "same_point", lambda a, b, rtol, atol: False)
    assert_caught(monkeypatch, props_permuted_simplex.test_glue_identifies_exactly_the_equivalent_vertices,
                  max_examples=30)


def test_mutant_asymmetric_barycentric_grid_caught(monkeypatch):
    """A grid that misses the points with λ₁ > λ₂ (not symmetric under relabelling): caught by the
    relabelling-invariance property of the simplex barrier."""
    import reference.simplex_barrier
    from invariants import props_permuted_simplex

    full = reference.simplex_barrier.barycentric_grid

    def half(n, resolution):
        g = full(n, resolution)
        return g[(g[:, 0] <= g[:, 1]) | (g == 1).any(1)] if n > 1 else g

    monkeypatch.setattr(reference.simplex_barrier, "barycentric_grid", half)
    assert_caught(monkeypatch, props_permuted_simplex.test_simplex_barrier_invariant_to_relabelling_vertices,
                  max_examples=30)


# ---------------------------------------------------------------------------------------------
# the seams themselves, and this file's use of them
# ---------------------------------------------------------------------------------------------
def _small_pair():
    from reference.models import MLP

    model = MLP(5, [6, 4], 3)
    spec = reference.specs.spec_for(model)
    gen = torch.Generator().manual_seed(0)
    a, b = ({k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in model.state_dict().items()}
            for _ in range(2))
    return spec, a, b


def test_solver_registry_is_read_at_call_time(monkeypatch):
    """``solve_lap`` / ``weight_matching`` / ``activation_matching`` find ``SOLVERS["scipy"]`` when
    they run; ``solver=`` takes a name or a callable; every assignment (within blocks, of blocks)
    goes through the solver."""
    m = reference.matching
    calls: list[tuple[int, ...]] = []

    def counting(S):
        calls.append(S.shape)
        return m.scipy_solver(S)

    gen = torch.Generator().manual_seed(1)
    S6 = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    expected = m.solve_lap(S6)
    expected_blocks = m.solve_lap(S6, block=3)
    monkeypatch.setitem(m.SOLVERS, "scipy", counting)
    assert torch.equal(m.solve_lap(S6), expected) and calls == [(6, 6)]
    calls.clear()
    assert torch.equal(m.solve_lap(S6, 3), expected_blocks) and calls == [(3, 3)] * 4 + [(2, 2)]

    spec, a, b = _small_pair()
    calls.clear()
    monkeypatch.setitem(m.SOLVERS, m.fastest_solver(), counting)  # weight matching's "auto"
    default = m.weight_matching(spec, a, b, seed=2)
    assert len(calls) >= len(spec.sizes)
    assert m.weight_matching(spec, a, b, seed=2, solver="scipy").history == default.history
    monkeypatch.setitem(m.SOLVERS, "scipy", m.scipy_solver)
    monkeypatch.setitem(m.SOLVERS, m.fastest_solver(), m.SOLVERS[m.fastest_solver()])
    monkeypatch.setitem(m.SOLVERS, "counting", counting)
    calls.clear()
    named = m.weight_matching(spec, a, b, seed=2, solver="counting")
    assert named.perm == default.perm and named.history == default.history and calls
    calls.clear()
    assert m.weight_matching(spec, a, b, seed=2, solver=counting).history == default.history and calls
    with pytest.raises(ValueError, match="unknown solver"):
        m.solve_lap(S6, solver="nope")
    with pytest.raises(TypeError, match="solver"):
        m.weight_matching(spec, a, b, solver=3)
    with pytest.raises(ValueError, match="does not divide"):
        m.solve_lap(S6, block=4)


def test_group_order_draws_one_numpy_permutation_per_pass():
    """The visiting order is ``rng.permutation(len(groups))`` (the draws of the seeded orders)."""
    names = ["P_0", "P_1", "P_2", "P_3", "P_4"]
    mine, ref = numpy.random.default_rng(3), numpy.random.default_rng(3)
    for _ in range(4):
        assert reference.matching.group_order(names, mine) == [names[i] for i in ref.permutation(len(names))]


def test_weight_matching_reads_its_pieces_at_call_time(monkeypatch):
    """One ``starting_permutation`` per restart, one ``group_order`` per pass, ``permute_except`` for
    every entry of every visited group: all found in ``reference.matching`` when they run."""
    m = reference.matching
    spec, a, b = _small_pair()
    init = Permutation.random(spec, 4)
    seen: dict[str, int] = {"start": 0, "order": 0, "except": 0}
    real_start, real_order, real_except = m.starting_permutation, m.group_order, m.permute_except

    def start(spec_, init_):
        assert init_ is init
        seen["start"] += 1
        return real_start(spec_, init_)

    def order(groups, rng):
        seen["order"] += 1
        return real_order(groups, rng)

    def permute(*args):
        seen["except"] += 1
        return real_except(*args)

    monkeypatch.setattr(m, "starting_permutation", start)
    monkeypatch.setattr(m, "group_order", order)
    monkeypatch.setattr(m, "permute_except", permute)
    r = m.weight_matching(spec, a, b, seed=5, restarts=2, init=init)
    passes = sum(len(x.history) - 1 for x in r.restarts)
    assert seen["start"] == 2 and seen["order"] == passes
    # every entry of every group at least once per restart; later passes reuse terms whose inputs did not change
    members = sum(len(ms) for ms in spec.groups.values())
    assert 2 * members <= seen["except"] <= passes * members


def test_starting_permutation_and_permute_except():
    m = reference.matching
    spec, a, b = _small_pair()
    P = Permutation.random(spec, 7)
    start = m.starting_permutation(spec, P)
    assert Permutation(start, spec) == P
    start["P_0"][:] = 0  # a copy: the caller may update it
    assert Permutation(m.starting_permutation(spec, P), spec) == P
    assert Permutation(m.starting_permutation(spec, None), spec).is_identity()
    with pytest.raises(ValueError):
        m.starting_permutation(spec, Permutation({"P_0": torch.arange(6)}))
    moved = P.apply(spec, b)
    for k in b:
        assert torch.equal(m.permute_except(spec, P, k, b[k], -1), moved[k])
    w = m.permute_except(spec, P, "layers.1.weight", b["layers.1.weight"], 0)
    assert torch.equal(w, b["layers.1.weight"].index_select(1, P["P_0"]))


_PENDING_REWRITE: set[str] = set()  # tests exempt from the check below (none)
_PATCHING_CALLS = {"setattr", "delattr", "getattr", "setitem", "delitem", "patch", "object"}
_INTERNAL = "_hypothesis" + "_internal"


def private_uses(source: str, skip: set[str] = frozenset()) -> list[str]:
    """Where ``source`` reaches a private name: an attribute ``x._name`` (dunders other than
    ``__dict__`` excepted), a name starting with ``_`` passed as a string to setattr / getattr /
    monkeypatch.setattr / patch / setitem (dunders included), ``vars(...)``, an import of a ``_`` name,
    or hypothesis' ``_hypothesis_internal`` attributes in any form. Top-level functions in ``skip``
    are not read."""
    found: list[str] = []

    def private(part: str, dunders: bool) -> bool:
        if part == "__dict__":
            return True
        return part.startswith("_") and (dunders or not (part.startswith("__") and part.endswith("__")))

    tree = ast.parse(source)
    body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name in skip)]
    nodes = [n for top in body for n in ast.walk(top)]
    docstrings = {id(n.value) for n in nodes if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in nodes:
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and private(node.attr, dunders=False):
            found.append(f"{where}: attribute {node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _INTERNAL in node.value:
            if id(node) not in docstrings:
                found.append(f"{where}: string {node.value!r}")
        elif isinstance(node, ast.ImportFrom):
            modules = [p for p in (node.module or "").split(".") if private(p, dunders=False)]
            names = [a.name for a in node.names if private(a.name, dunders=True)]
            found += [f"{where}: import {p}" for p in modules + names]
        elif isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn == "vars":
                found.append(f"{where}: vars()")
            if fn in _PATCHING_CALLS:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found += [f"{where}: {fn} {p}" for p in arg.value.split(".") if private(p, dunders=True)]
    return found


def test_private_uses_finds_the_old_seams():
    """The checker flags the patches this file used to make."""
    old = (
        "import reference.matching as m\n"
        "def t(monkeypatch, prop):\n"
        "    monkeypatch.setattr(reference.matching, '_weight_matching_once', f)\n"
        "    monkeypatch.setattr(reference.specs._SpecInterpreter, 'run', f)\n"
        "    monkeypatch.setattr('reference.matching._permute_except', f)\n"
        "    monkeypatch.setattr(Permutation, '__matmul__', f)\n"
        "    monkeypatch.setitem(vars(m), 'np', f)\n"
        f"    monkeypatch.setattr(prop, '{_INTERNAL}_use_settings', s)\n"
        f"    prop.{_INTERNAL}_use_settings = s\n"
        f"    key = '{_INTERNAL}_use_settings'\n"
        "from reference.matching import _validate_pair\n"
        "from reference._private import spec\n"
    )
    found = private_uses(old)
    for what in ("_weight_matching_once", "_SpecInterpreter", "_permute_except", "__matmul__", "vars()",
                 "_validate_pair", "import _private", f"attribute {_INTERNAL}_use_settings",
                 f"setattr {_INTERNAL}_use_settings", f"string '{_INTERNAL}_use_settings'"):
        assert any(what in f for f in found), (what, found)
    fine = "from __future__ import annotations\nx.__name__\nmonkeypatch.setattr(reference.matching, 'group_order', f)\n"
    assert private_uses(f'"""A docstring may say {_INTERNAL}."""\n' + fine) == []


def test_mutation_tests_use_public_seams_only():
    """This file plants its mutants through public names only, and drives hypothesis through its
    public API only (no ``_hypothesis_internal`` attributes)."""
    source = Path(__file__).read_text(encoding="utf-8")
    assert private_uses(source, _PENDING_REWRITE) == []


# ---------------------------------------------------------------------------------------------
# mutants of reference/universe.py: maps composed the wrong way round
# ---------------------------------------------------------------------------------------------
def pairwise_the_wrong_way_round(U, i, j):
    """``P_ij = Uⱼ ∘ Uᵢ⁻¹`` instead of ``Uᵢ⁻¹ ∘ Uⱼ`` (θⱼ into θᵢ's labels)."""
    us = U.to_universe if hasattr(U, "to_universe") else list(U)
    return us[j].compose(us[i].inverse())


def to_anchor_the_wrong_way_round(us, anchor=0):
    """``Uᵢ ∘ Uₐ⁻¹`` instead of ``Uₐ⁻¹ ∘ Uᵢ``: the a-th map is still the identity, but the universe is
    conjugated, so the pairwise maps (and J) change."""
    g = us[anchor].inverse()
    return [u.compose(g) for u in us]


def test_mutant_pairwise_map_composed_the_wrong_way_round(monkeypatch):
    """The public ``reference.merge.pairwise_from_universe`` builds ``Uⱼ ∘ Uᵢ⁻¹``: caught by the all-pairs
    identity J(U) = Σ_{i<j} WM_obj(θᵢ, θⱼ; P_ij) and by cycle consistency of the joint methods."""
    import reference.merge
    from invariants import props_universe

    monkeypatch.setattr(reference.merge, "pairwise_from_universe", pairwise_the_wrong_way_round)
    assert_caught(monkeypatch, props_universe.test_all_pairs_objective_is_the_sum_of_pairwise_objectives,
                  max_examples=30)
    assert_caught(monkeypatch, props_universe.test_joint_universe_is_cycle_consistent, max_examples=30)


def test_mutant_to_anchor_composed_the_wrong_way_round(monkeypatch):
    """The public ``reference.universe.to_anchor`` (which ``frank_wolfe_universe`` and ``sync_ascent`` call
    to express their result in model 0's labels) composes on the wrong side: caught by the relabelling
    property (P_ij unchanged). (Frank–Wolfe holds model 0's map at the identity by default, so there the
    wrong side composes with the identity and changes nothing.)"""
    import reference.universe
    from invariants import props_universe

    monkeypatch.setattr(reference.universe, "to_anchor", to_anchor_the_wrong_way_round)
    assert_caught(monkeypatch, props_universe.test_to_anchor_changes_no_pairwise_map, max_examples=30)


_UNIVERSE_PROPERTIES = [
    "test_all_pairs_objective_is_the_sum_of_pairwise_objectives",
    "test_joint_universe_is_cycle_consistent",
    "test_to_anchor_changes_no_pairwise_map",
    "test_frank_wolfe_never_decreases_the_relaxed_objective",
]


@pytest.mark.parametrize("name", _UNIVERSE_PROPERTIES)
def test_universe_properties_pass_unmutated(monkeypatch, name):
    """Control of the two mutants above: the same properties, same settings (30 examples), no mutant."""
    from invariants import props_universe

    run_property(monkeypatch, getattr(props_universe, name), max_examples=30)
