"""Mutation tests: inject a known bug, and check that the property meant to catch it fails.

Each test monkeypatches one bug into ``reference/`` (or into the strategies), runs a property of
``invariants/`` directly (a ``@given`` function called with no arguments) under fixed settings —
derandomized, no shrinking, no example database — and asserts that it raises ``AssertionError``
(the property's own check, not a crash). ``test_properties_pass_unmutated`` runs the same
properties with the same settings and no mutant: the failures are the mutants'.

The table of mutants and the properties that catch them is in ``invariants/README.md``.
"""

from __future__ import annotations

import json
import types

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
from invariants import (
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


def run_property(monkeypatch: pytest.MonkeyPatch, prop, max_examples: int = 60) -> None:
    """Run the ``@given`` property ``prop`` under ``MUTATION_SETTINGS``.

    ``@settings(...)`` would overwrite the property's settings for the rest of the session; the
    same attribute is set through ``monkeypatch`` instead, which restores it after the test.
    """
    assert getattr(prop, "is_hypothesis_test", False), f"{prop.__name__} is not a @given property"
    monkeypatch.setattr(
        prop, "_hypothesis_internal_use_settings", settings(MUTATION_SETTINGS, max_examples=max_examples)
    )
    prop()


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


def test_a_unpermuted_running_stats_caught_by_eval_mode_invariance(monkeypatch):
    monkeypatch.setattr(reference.specs, "spec_for", spec_without_running_stats)
    err = assert_caught(monkeypatch, props_invariance.test_function_invariance_eval_mode)
    assert "eval mode" in str(err)


def test_a_unpermuted_running_stats_invisible_in_train_mode(monkeypatch):
    """Why eval mode is a separate property: batch statistics hide mutant (a)."""
    monkeypatch.setattr(reference.specs, "spec_for", spec_without_running_stats)
    run_property(monkeypatch, props_invariance.test_function_invariance_train_mode)


def test_b_wrong_axis_caught_by_invariance(monkeypatch):
    monkeypatch.setattr(reference.specs, "spec_for", spec_with_transposed_weights)
    assert_caught(monkeypatch, props_invariance.test_function_invariance_resnets)
    assert_caught(monkeypatch, props_invariance.test_function_invariance_train_mode)


def test_c_split_residual_stream_caught_by_resnet_invariance(monkeypatch):
    monkeypatch.setattr(reference.specs, "spec_for", spec_with_split_residual_stream)
    assert_caught(monkeypatch, props_invariance.test_function_invariance_resnets)


def test_c_split_residual_stream_caught_by_spec_discovery(monkeypatch):
    """The traced spec merges the stream; a hand spec that splits it disagrees with it."""
    monkeypatch.setattr(reference.specs, "spec_for", spec_with_split_residual_stream)
    assert_caught(monkeypatch, props_specs.test_traced_spec_has_the_hand_written_symmetry)


# ---------------------------------------------------------------------------------------------
# matching mutants (d) and others
# ---------------------------------------------------------------------------------------------
class _NumpySkippingFirstGroup(types.ModuleType):
    """``numpy`` as ``reference.matching`` sees it, except that the group order drawn by
    ``np.random.default_rng(seed).permutation(n)`` never contains group 0: that group is never
    updated by weight matching."""

    def __init__(self) -> None:
        super().__init__("numpy")
        self.random = types.SimpleNamespace(default_rng=self._rng)

    def __getattr__(self, name: str):
        return getattr(numpy, name)

    @staticmethod
    def _rng(seed):
        rng = numpy.random.default_rng(seed)
        return types.SimpleNamespace(permutation=lambda n: [int(i) for i in rng.permutation(n) if i != 0])


def test_d_matching_skips_a_group_caught_by_recovery(monkeypatch):
    monkeypatch.setattr(reference.matching, "np", _NumpySkippingFirstGroup())
    err = assert_caught(monkeypatch, props_matching.test_weight_matching_recovers_inverse_one_group)
    assert "misaligned" in str(err)
    assert_caught(monkeypatch, props_matching.test_weight_matching_recovers_inverse)


def test_matching_ignores_init_caught_by_equivariance(monkeypatch):
    """Weight matching that always starts at the identity (``init`` dropped)."""
    real = reference.matching._weight_matching_once

    def from_identity(spec, a, b, seed, max_passes, init, keys):
        return real(spec, a, b, seed, max_passes, None, keys)

    monkeypatch.setattr(reference.matching, "_weight_matching_once", from_identity)
    assert_caught(monkeypatch, props_matching.test_weight_matching_equivariance)


def test_matching_permutes_the_solved_axis_caught_by_history(monkeypatch):
    """The similarity S_g computed with P_g already applied to θ_b (``_permute_except`` ignoring
    the axis being solved): each step solves the wrong assignment."""
    real = reference.matching._permute_except

    def permute_all(spec, perm, key, w, skip):
        return real(spec, perm, key, w, -1)

    monkeypatch.setattr(reference.matching, "_permute_except", permute_all)
    assert_caught(monkeypatch, props_matching.test_weight_matching_objective_never_decreases)


def test_lap_minimises_caught_by_activation_matching(monkeypatch):
    """A sign error: the assignment minimises the correlation instead of maximising it."""

    def minimise(cost, maximize=False):
        return linear_sum_assignment(cost, maximize=not maximize)

    monkeypatch.setattr(reference.matching, "linear_sum_assignment", minimise)
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
    """``P ∘ Q`` built as ``Q ∘ P`` (index p[q] instead of q[p])."""

    def compose(self, other):
        return Permutation({g: self[g][other[g]] for g in self})

    monkeypatch.setattr(Permutation, "compose", compose)
    monkeypatch.setattr(Permutation, "__matmul__", compose)
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
    """Spec discovery that does not merge the channel spaces of an addition."""

    def first_operand(self, n, result):
        tensors = [a for a in reference.specs._tensor_nodes((n.args, n.kwargs)) if a in self.axes]
        return list(self.axes[tensors[0]])

    monkeypatch.setattr(reference.specs._SpecInterpreter, "_add", first_operand)
    assert_caught(monkeypatch, props_specs.test_traced_spec_has_the_hand_written_symmetry)
    assert_caught(monkeypatch, props_specs.test_traced_spec_preserves_the_function)


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
    import reference.permuted_simplex as ps
    from invariants import props_permuted_simplex

    monkeypatch.setattr(ps, "_allclose", lambda a, b, rtol, atol: False)
    assert_caught(monkeypatch, props_permuted_simplex.test_glue_identifies_exactly_the_equivalent_vertices,
                  max_examples=30)


def test_mutant_asymmetric_barycentric_grid_caught(monkeypatch):
    """A grid that misses the points with λ₁ > λ₂ (not symmetric under relabelling): caught by the
    relabelling-invariance property of the simplex barrier."""
    import reference.permuted_simplex as ps
    from invariants import props_permuted_simplex

    full = ps.barycentric_grid

    def half(n, resolution):
        g = full(n, resolution)
        return g[(g[:, 0] <= g[:, 1]) | (g == 1).any(1)] if n > 1 else g

    monkeypatch.setattr(ps, "barycentric_grid", half)
    assert_caught(monkeypatch, props_permuted_simplex.test_simplex_barrier_invariant_to_relabelling_vertices,
                  max_examples=30)
