"""Check a permutation spec on one model: the suite's two invariants, as hypothesis properties.

``verify_spec(model, spec, example_input)`` tests, on examples drawn by ``hypothesis`` (seeded, no
database, no shrinking; called inside another hypothesis test, where ``@given`` cannot nest, the same
draws come from a seeded ``random.Random``), the two facts every method of this suite relies on:

(i) **Permutation invariance** (Eq. (1) of Ainsworth et al. 2023, "Git Re-Basin"; Hecht-Nielsen
    1990): ``f(P(θ), x) = f(θ, x)`` for a random ``P = Permutation.random(spec, seed)`` (blocks and
    head classes respected), in eval and in train mode, in float32 and float64. BatchNorm running
    statistics are randomised first (``running_mean ~ N(0, 0.5²)``, ``running_var ~ U(0.5, 2)``), so
    the eval-mode function depends on them and a spec that forgets to permute them fails. In train
    mode the buffers a forward updates are checked too: the running statistics after a forward at
    ``P(θ)`` must be ``P`` of those after a forward at ``θ``. Dropout is switched off in train mode
    (its masks are random and not permutation-equivariant); a model still random in a mode (dropout
    written as ``F.dropout(..., training=True)``) has that mode skipped, and the report says so.
(ii) **Linearity of P** (Ainsworth et al. 2023, §2; what makes curves and simplexes well defined on
    permutation classes): ``Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ)`` for ``k_points`` points ``θᵢ`` (the model's
    point with seeded noise) and random convex coefficients ``k`` (Σ k = 1), compared bit-exactly
    (``torch.equal``) key by key; and ``f(Σ kᵢ P(θᵢ), x) = f(Σ kᵢ θᵢ, x)`` at the functional tolerance.

Functional comparisons: ``|Δ| ≤ tol · max(1, max|y|)`` over every floating output tensor (outputs
may be tensors or nested tuples / dicts of them); non-finite entries must match exactly (a NaN is
never "close" to a number). ``tol``: 1e-10 for float64, 1e-4 for float32 on CPU (permuted fp32
outputs differ by ~1e-6), 5e-3 for float32 on CUDA (TF32 convolutions), see ``default_tolerance``.

**Localising a violation.** At the first failing example of each check, the permutation is split
into *units*: every group alone (identity elsewhere; for a group of a head class, only its
within-head part) and every head class alone (its groups moving heads, identity within heads). The
first unit that breaks the check alone names the group (units found responsible
for an earlier failure are tried first). The first divergence is then found with forward
hooks on every submodule, run at θ and at the unit's P(θ): in a correct symmetry every module's
output at P(θ) is a rearrangement of its output at θ (the hidden axes are permuted, nothing else),
so the *sorted* values of the two agree to rounding (sorting is 1-Lipschitz in the max norm). The
first module (in the order the hooks fire, innermost first) whose sorted outputs differ is where the
function first diverges; the report lists which of its ``state_dict`` keys the unit's group acts on
and which it does not (for a BatchNorm whose ``running_mean`` the spec forgot, that names the key).
If every module's outputs agree as multisets while the model's output does not, the group permutes
an axis that reaches the output (the output layer's rows, or a positional axis), and the report says
so. For the train-mode buffer check the first divergence is the first updated buffer that differs.

``spec_coverage(spec)`` is a plain-text account of what a spec permutes (group → key and axis; the
keys nothing permutes), for a spec written by hand; ``reference.trace.trace_report`` gives the same
for a traced spec, with the reasons tensors were held fixed.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, Verbosity, currently_in_test_context, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_flatten

from . import validate
from .params import Params, combine, is_float
from .permutation import Permutation, PermutationSpec, entry_groups
from .trace import spec_coverage  # re-exported: the coverage text of a given spec

__all__ = ["MODES", "VerifyReport", "Violation", "default_tolerance", "spec_coverage", "verify_spec"]

MODES: tuple[str, ...] = ("eval", "train")

_TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
_CUDA_FLOAT32 = 5e-3

_CHECKS: dict[str, tuple[str, str]] = {
    # check id -> (invariant, what it compares)
    "perm.function": ("permutation", "(i)  f(P(θ), x) = f(θ, x)"),
    "perm.state": ("permutation", "(i)  train-mode buffer updates at P(θ) = P(those at θ)"),
    "comb.params": ("combination", "(ii) Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ), bit-exact"),
    "comb.function": ("combination", "(ii) f(Σ kᵢ P(θᵢ), x) = f(Σ kᵢ θᵢ, x)"),
}

_MAX_SEED = 2**31 - 1


def default_tolerance(dtype: torch.dtype, device: str | torch.device = "cpu") -> float:
    """The relative tolerance ``tol`` of a functional comparison (``|Δ| ≤ tol · max(1, max|y|)``):
    1e-10 (float64), 1e-4 (float32 on CPU), 5e-3 (float32 on CUDA: TF32), 1e-2 (float16), 5e-2
    (bfloat16). Raises ``ValueError`` for a dtype that is not floating."""
    if dtype not in _TOLERANCES:
        raise ValueError(f"no default tolerance for dtype {dtype}; floating dtypes: {list(_TOLERANCES)}")
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return _CUDA_FLOAT32
    return _TOLERANCES[dtype]


# ============================================================================================
# the report
# ============================================================================================
@dataclass(frozen=True)
class Violation:
    """One check that failed.

    ``invariant``: ``"permutation"`` (i) or ``"combination"`` (ii); ``group``: the group (or
    ``"a+b"``, the groups of a head class) whose permutation alone breaks the check, ``None`` when
    no single one does; ``mode``: ``"eval"``, ``"train"`` or ``"n/a"`` (a parameter-level check);
    ``dtype``: e.g. ``"float64"``; ``detail``: what failed, how often, by how much;
    ``first_divergence``: the first module output (or key) where the two runs differ.
    """

    invariant: str
    group: str | None
    mode: str
    dtype: str
    detail: str
    first_divergence: str | None

    def text(self) -> str:
        where = f"{self.dtype}, {self.mode} mode" if self.mode != "n/a" else self.dtype
        lines = [f"VIOLATION of invariant {self.invariant!r} ({where}): {self.detail}"]
        if self.group is not None:
            lines.append(f"  responsible group: {self.group}")
        else:
            lines.append("  responsible group: none alone (only the whole permutation breaks it)")
        if self.first_divergence:
            lines.append(f"  first divergence: {self.first_divergence}")
        return "\n".join(lines)


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_spec`` tried and found.

    ``ok``: no violation (and something was checked, unless ``examples == 0``: a spec without
    permutation groups, which ``text`` says); ``violations``: the failed checks; ``examples``: how
    many hypothesis examples ran; ``coverage``: ``spec_coverage(spec)``; ``tried``: what each example
    drew; ``checks``: one line per check × dtype × mode (held n/n, worst relative error, tolerance);
    ``notes``: checks skipped and why.
    """

    ok: bool
    violations: list[Violation]
    examples: int
    coverage: str
    tried: str = ""
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self, coverage: bool = True) -> str:
        """The report as text (``coverage=False``: without the coverage section, e.g. when a trace
        report was printed instead)."""
        lines: list[str] = []
        if coverage:
            lines += ["coverage:", *("  " + ln for ln in self.coverage.splitlines()), ""]
        if self.examples == 0:
            lines.append("no permutation groups: nothing to check")
            return "\n".join(lines)
        lines += ["verification:", *("  " + ln for ln in self.tried.splitlines())]
        lines += ["  " + ln for ln in self.checks]
        lines += ["  note: " + n for n in self.notes]
        lines += [v.text() for v in self.violations]
        if self.ok:
            lines.append(f"OK: both invariants held on {self.examples} example(s)")
        else:
            groups = sorted({v.group for v in self.violations if v.group is not None})
            lines.append(
                f"FAILED: {len(self.violations)} violation(s)"
                + (f"; responsible group(s): {', '.join(groups)}" if groups else "")
            )
        return "\n".join(lines)


# ============================================================================================
# comparisons
# ============================================================================================
def _tensor_error(a: Tensor, b: Tensor) -> float:
    """``max|a − b| / max(1, max|b|)`` over finite entries; ``inf`` if shapes, dtypes or the
    non-finite entries differ."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return math.inf
    if not is_float(b):
        return 0.0 if torch.equal(a, b) else math.inf
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return math.inf
    if not bool(fb.all()):
        na, nb = a[~fb], b[~fb]
        if not (torch.equal(na.isnan(), nb.isnan()) and torch.equal(na.nan_to_num(0.0), nb.nan_to_num(0.0))):
            return math.inf
    if not bool(fb.any()):
        return 0.0
    wide = torch.complex128 if b.is_complex() else torch.float64
    a64, b64 = a[fb].to(wide), b[fb].to(wide)
    return float((a64 - b64).abs().max() / max(1.0, float(b64.abs().max())))


def _error(out: Any, ref: Any, key: Callable[[Tensor], Tensor] | None = None) -> float:
    """The largest ``_tensor_error`` over the leaves of two outputs (any nesting of tuples / lists /
    dicts); ``inf`` if their structures differ. ``key`` maps each tensor first (e.g. sorting)."""
    lo, so = tree_flatten(out)
    lr, sr = tree_flatten(ref)
    if so != sr:
        return math.inf
    worst = 0.0
    for a, b in zip(lo, lr, strict=True):
        if isinstance(b, Tensor):
            if not isinstance(a, Tensor):
                return math.inf
            if key is not None:
                a, b = key(a), key(b)
            worst = max(worst, _tensor_error(a, b))
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            return math.inf
    return worst


def _sorted_values(t: Tensor) -> Tensor:
    """The entries of ``t`` in sorted order (magnitudes for complex): invariant under any reindexing."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = flat.abs()
    if is_float(flat):
        return torch.sort(flat).values
    return torch.sort(flat.to(torch.int64)).values if flat.dtype != torch.bool else torch.sort(flat.int()).values


# ============================================================================================
# the checker
# ============================================================================================
@dataclass
class _Stat:
    """Counts of one check × dtype × mode, and the diagnosis of its first failure."""

    n: int = 0
    failed: int = 0
    worst: float = 0.0
    first: dict[str, Any] | None = None


@dataclass
class _Unit:
    """A part of a permutation tested alone: one group, or the heads of one head class."""

    label: str  # the Violation.group it names
    groups: list[str]
    what: str
    perm: Permutation


class _Checker:
    def __init__(
        self,
        model: nn.Module,
        spec: PermutationSpec,
        inputs: tuple[Tensor, ...],
        dtypes: list[torch.dtype],
        modes: list[str],
        k_points: int,
        tolerances: Mapping[torch.dtype, float],
    ):
        self.spec, self.inputs, self.dtypes, self.modes, self.k_points = spec, inputs, dtypes, modes, k_points
        self.name = type(model).__name__
        state = model.state_dict()
        self.device = next(iter(state.values())).device
        self.rng_devices = [] if self.device.type == "cpu" else [self.device]
        try:
            self.models = {d: copy.deepcopy(model).to(d) for d in dtypes}
        except Exception as e:  # a module deepcopy cannot copy
            raise ValueError(f"verify_spec: cannot copy {self.name} (copy.deepcopy failed: {e})") from e
        self.tol = dict(tolerances)
        self.state64 = {  # on the CPU: every draw is made there, then cast to each dtype on the model's device
            k: (v.detach().cpu().to(torch.float64) if is_float(v) else v.detach().cpu()).clone()
            for k, v in state.items()
        }
        self.float_keys = {k for k, v in state.items() if is_float(v)}
        self.ties = _tie_groups(model, state)
        self.secondary = {k for names in self.ties for k in names[1:]}
        self.stats_pairs: list[tuple[str, str]] = []  # (running_mean key, running_var key)
        for name, m in model.named_modules():
            if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None:
                pair = (
                    f"{name}.running_mean" if name else "running_mean",
                    f"{name}.running_var" if name else "running_var",
                )
                if all(k in state for k in pair):
                    self.stats_pairs.append(pair)
        self.positive = {v for _, v in self.stats_pairs}
        self.has_float_buffers = any(is_float(b) and k in state for k, b in model.named_buffers(remove_duplicate=False))
        self.stats: dict[tuple[str, str, torch.dtype], _Stat] = {}
        self.skipped: dict[str, str] = {}
        self.suspects: set[str] = set()
        self.examples = 0
        self.error: BaseException | None = None
        self.source = "hypothesis"

    # --- evaluation -------------------------------------------------------------------------
    def forward(self, dtype: torch.dtype, params: Params, x: tuple[Tensor, ...], mode: str, rng: int = 0):
        """``(f(params, x), state after the forward)``: on a clone of ``params`` (train mode
        updates BatchNorm buffers in place), dropout off in train mode, the RNG seeded with ``rng``."""
        module = self.models[dtype]
        module.train(mode == "train")
        if mode == "train":
            for m in module.modules():
                if isinstance(m, _DropoutNd) or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0):
                    m.eval()
        p = {k: v.clone() for k, v in params.items()}
        call = {k: v for k, v in p.items() if k not in self.secondary}
        with torch.no_grad(), torch.random.fork_rng(devices=self.rng_devices):
            torch.manual_seed(rng)
            out = functional_call(module, call, x)
        return out, p

    def reference(self, dtype: torch.dtype, params: Params, x: tuple[Tensor, ...], mode: str):
        try:
            return self.forward(dtype, params, x, mode)
        except Exception as e:
            shapes = [tuple(t.shape) for t in x]
            raise ValueError(
                f"verify_spec: the {mode}-mode forward of {self.name} in {_dtype_name(dtype)} failed on inputs of "
                f"shape {shapes}: {type(e).__name__}: {e}"
            ) from e

    def attempt(self, dtype, params, x, mode) -> tuple[Any, Params | None, str]:
        """``(output, state after, "")`` of a forward at a permuted point, or ``(None, None, why)`` if it raised."""
        try:
            out, after = self.forward(dtype, params, x, mode)
        except Exception as e:
            return None, None, f"the forward at the permuted point raised {type(e).__name__}: {e}"
        return out, after, ""

    def function_error(self, dtype, ref_params, perm_params, x, mode) -> tuple[float, str]:
        ref, _ = self.reference(dtype, ref_params, x, mode)
        out, _, why = self.attempt(dtype, perm_params, x, mode)
        return (math.inf, why) if why else (_error(out, ref), "")

    def after_error(self, perm: Permutation, after: Params, after_p: Params) -> tuple[float, str]:
        """The state after a train-mode forward at P(θ) vs P(the state after one at θ): the worst
        relative error and its key."""
        expect = perm.apply(self.spec, after)
        worst, key = 0.0, ""
        for k in expect:
            e = _tensor_error(after_p[k], expect[k])
            if e > worst:
                worst, key = e, k
        return worst, key

    def state_error(self, dtype, theta, perm: Permutation, x) -> tuple[float, str]:
        _, after = self.reference(dtype, theta, x, "train")
        _, after_p, why = self.attempt(dtype, perm.apply(self.spec, theta), x, "train")
        return (math.inf, "") if why else self.after_error(perm, after, after_p)

    # --- drawing ----------------------------------------------------------------------------
    def draw_inputs(self, gen: torch.Generator) -> tuple[Tensor, ...]:
        out = []
        for x in self.inputs:
            if is_float(x):
                out.append(torch.randn(x.shape, generator=gen, dtype=torch.float64))
            elif x.dtype == torch.bool:
                out.append(torch.randint(0, 2, x.shape, generator=gen).bool())
            else:
                lo = min(0, int(x.min())) if x.numel() else 0
                hi = int(x.max()) + 1 if x.numel() else 1
                out.append(torch.randint(lo, max(hi, lo + 1), x.shape, generator=gen, dtype=x.dtype))
        return tuple(out)

    def randomise_stats(self, state: Params, gen: torch.Generator) -> Params:
        """BatchNorm (and tracked InstanceNorm) running statistics off their initial values."""
        out = dict(state)
        for mean_k, var_k in self.stats_pairs:
            out[mean_k] = 0.5 * torch.randn(state[mean_k].shape, generator=gen, dtype=torch.float64)
            out[var_k] = 0.5 + 1.5 * torch.rand(state[var_k].shape, generator=gen, dtype=torch.float64)
        return out

    def perturb(self, state: Params, gen: torch.Generator) -> Params:
        """A nearby point: θ + 0.1·mean|θ|·ε per float tensor (running variances ·exp(0.2 ε): they stay
        positive); tied keys keep one value."""
        out: Params = {}
        for k, v in state.items():
            if k in self.secondary or not is_float(v):
                out[k] = v
                continue
            eps = torch.randn(v.shape, generator=gen, dtype=torch.float64)
            if k in self.positive:
                out[k] = v * torch.exp(0.2 * eps)
            else:
                scale = max(float(v.abs().mean()) if v.numel() else 0.0, 1e-2)
                out[k] = v + 0.1 * scale * eps
        for names in self.ties:
            for k in names[1:]:
                out[k] = out[names[0]]
        return out

    def cast(self, params: Params, dtype: torch.dtype) -> Params:
        return {
            k: (v.to(device=self.device, dtype=dtype) if is_float(v) else v.to(self.device)) for k, v in params.items()
        }

    def cast_inputs(self, xs: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
        return tuple(x.to(device=self.device, dtype=dtype) if is_float(x) else x.to(self.device) for x in xs)

    # --- one example ------------------------------------------------------------------------
    def example(self, perm_seed: int, point_seed: int, raw_coeffs: Sequence[float]) -> None:
        index = self.examples
        self.examples += 1
        perm = Permutation.random(self.spec, perm_seed)
        gen = torch.Generator().manual_seed(point_seed)
        x64 = tuple(x.detach().cpu() for x in self.inputs) if index == 0 else self.draw_inputs(gen)
        theta64 = self.randomise_stats(self.state64, gen)
        points64 = [self.perturb(theta64, gen) for _ in range(self.k_points)]
        total = sum(raw_coeffs)
        coeffs = [c / total for c in raw_coeffs]
        where = {"example": index + 1, "perm_seed": perm_seed, "point_seed": point_seed}
        if index == 0:
            self.check_determinism(theta64, x64)
        for dtype in self.dtypes:
            x = self.cast_inputs(x64, dtype)
            theta = self.cast(theta64, dtype)
            points = [self.cast(p, dtype) for p in points64]
            mixed = combine(coeffs, points)
            left = combine(coeffs, [perm.apply(self.spec, p) for p in points])
            right = perm.apply(self.spec, mixed)
            bad = next((k for k in right if not torch.equal(left[k], right[k])), None)
            st = self.record("comb.params", "n/a", dtype, 0.0 if bad is None else math.inf, where)
            if st is not None:
                st.first |= self.diagnose_params(bad)
            for mode in self.modes:
                if mode in self.skipped:
                    continue
                ref, after = self.reference(dtype, theta, x, mode)
                out, after_p, why = self.attempt(dtype, perm.apply(self.spec, theta), x, mode)
                st = self.record("perm.function", mode, dtype, math.inf if why else _error(out, ref), where)
                if st is not None:
                    st.first |= self.diagnose(perm, dtype, mode, x, partial(_permuted_pair, self.spec, theta), why)
                if mode == "train" and self.has_float_buffers and not why:
                    err, key = self.after_error(perm, after, after_p)
                    st = self.record("perm.state", mode, dtype, err, where)
                    if st is not None:
                        st.first |= self.diagnose_state(perm, dtype, theta, x, key)
                err, why = self.function_error(dtype, mixed, left, x, mode)
                st = self.record("comb.function", mode, dtype, err, where)
                if st is not None:
                    pair = partial(_combined_pair, self.spec, coeffs, points, mixed)
                    st.first |= self.diagnose(perm, dtype, mode, x, pair, why)

    def check_determinism(self, theta64: Params, x64: tuple[Tensor, ...]) -> None:
        """Skip a mode in which the model's output depends on the RNG (it cannot be compared)."""
        dtype = self.dtypes[0]
        theta, x = self.cast(theta64, dtype), self.cast_inputs(x64, dtype)
        for mode in self.modes:
            a, _ = self.reference(dtype, theta, x, mode)
            b, _ = self.forward(dtype, theta, x, mode, rng=1)
            if _error(a, b) > self.tol[dtype]:
                self.skipped[mode] = (
                    f"{mode} mode skipped: {self.name}'s output in {mode} mode changes with the random seed "
                    "(dropout or noise outside an nn.Dropout module?), so it cannot be compared"
                )

    def record(self, check: str, mode: str, dtype: torch.dtype, err: float, where: dict) -> _Stat | None:
        """Count one comparison; returns its ``_Stat`` at the check's first failure (to be diagnosed)."""
        st = self.stats.setdefault((check, mode, dtype), _Stat())
        st.n += 1
        st.worst = max(st.worst, err)
        tol = 0.0 if check == "comb.params" else self.tol[dtype]
        if err <= tol:
            return None
        st.failed += 1
        if st.first is not None:
            return None
        st.first = {**where, "error": err}
        return st

    # --- diagnosis --------------------------------------------------------------------------
    def units(self, perm: Permutation) -> list[_Unit]:
        """Every group alone (within-head part for a head-class group), then every head class's heads;
        the units found responsible for an earlier failure first (a diagnosis is one forward pair per
        unit tried)."""
        spec = self.spec
        ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
        out: list[_Unit] = []
        for g in spec.sizes:
            idx = perm[g]
            if g in spec.heads:
                b = spec.block(g)
                idx = (torch.arange(idx.numel() // b)[:, None] * b + idx.view(-1, b) % b).reshape(-1)
                what = f"group {g!r} alone, within its heads"
            else:
                what = f"group {g!r} alone"
            if not torch.equal(idx, ident[g]):
                out.append(_Unit(g, [g], what, Permutation({**ident, g: idx}, spec)))
        for h, gs in spec.head_classes.items():
            d = dict(ident)
            for g in gs:
                b = spec.block(g)
                heads = perm[g].view(-1, b)[:, 0] // b
                d[g] = (heads[:, None] * b + torch.arange(b)).reshape(-1)
            if any(not torch.equal(d[g], ident[g]) for g in gs):
                out.append(
                    _Unit("+".join(gs), gs, f"the heads of head class {h!r} (groups {gs})", Permutation(d, spec))
                )
        return sorted(out, key=lambda u: u.label not in self.suspects)

    def diagnose(self, perm, dtype, mode, x, pair: Callable[[Permutation], tuple[Params, Params]], why: str) -> dict:
        """The first unit of ``perm`` that breaks the functional check alone, and the first module
        output where its two runs diverge."""
        tol = self.tol[dtype]
        for unit in self.units(perm):
            ref_p, perm_p = pair(unit.perm)
            err, why_u = self.function_error(dtype, ref_p, perm_p, x, mode)
            if err > tol:
                self.suspects.add(unit.label)
                return {
                    "group": unit.label,
                    "unit": unit.what,
                    "divergence": why_u or self.first_divergence(dtype, ref_p, perm_p, x, mode, unit.groups),
                }
        ref_p, perm_p = pair(perm)
        return {
            "group": None,
            "unit": "",
            "divergence": why or self.first_divergence(dtype, ref_p, perm_p, x, mode, list(perm)),
        }

    def diagnose_state(self, perm, dtype, theta, x, key: str) -> dict:
        tol = self.tol[dtype]
        for unit in self.units(perm):
            err, k = self.state_error(dtype, theta, unit.perm, x)
            if err > tol:
                self.suspects.add(unit.label)
                return {"group": unit.label, "unit": unit.what, "divergence": self.state_divergence(k, unit.groups)}
        return {"group": None, "unit": "", "divergence": self.state_divergence(key, list(perm))}

    def state_divergence(self, key: str, groups: list[str]) -> str:
        axes = self.spec.axes[key]
        acting = set(groups) & {g for e in axes for g in entry_groups(e)}
        label = "+".join(groups) if len(groups) <= 3 else "the permutation"
        return f"buffer {key!r} as updated by the train-mode forward (spec axes {axes}" + (
            f"; {label} does not act on it)" if not acting else ")"
        )

    def diagnose_params(self, key: str | None) -> dict:
        groups = sorted({g for e in self.spec.axes[key] for g in entry_groups(e)}) if key else []
        return {
            "group": "+".join(groups) if groups else None,
            "unit": "",
            "divergence": f"key {key!r} (Σ kᵢ P(θᵢ) and P(Σ kᵢ θᵢ) differ; spec axes {self.spec.axes.get(key)})",
        }

    def record_events(self, dtype, params, x, mode) -> list[tuple[str, str, str, str, int, list[Any]]]:
        """Every module call's input and output, in execution order: ``(kind, name, class, owner,
        call, leaves)``; ``kind`` is ``"in"`` (``owner``: the module whose forward makes the call) or
        ``"out"`` (``owner``: the module itself); ``call`` counts the module's calls."""
        module = self.models[dtype]
        events: list[tuple[str, str, str, str, int, list[Any]]] = []
        stack: list[tuple[str, str]] = []
        calls: dict[str, int] = {}

        def leaves(obj: Any) -> list[Any]:
            return [t.detach().clone() if isinstance(t, Tensor) else t for t in tree_flatten(obj)[0]]

        def pre(name: str):
            def fn(mod, args):
                calls[name] = calls.get(name, 0) + 1
                owner = stack[-1][0] if stack else name
                events.append(("in", name, type(mod).__name__, owner, calls[name], leaves(args)))
                stack.append((name, type(mod).__name__))

            return fn

        def post(name: str):
            def fn(mod, args, out):
                if stack:
                    stack.pop()
                events.append(("out", name, type(mod).__name__, name, calls.get(name, 1), leaves(out)))

            return fn

        handles = []
        for name, m in module.named_modules():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        try:
            self.forward(dtype, params, x, mode)
        finally:
            for h in handles:
                h.remove()
        return events

    def first_divergence(self, dtype, ref_p, perm_p, x, mode, groups: list[str]) -> str:
        """Where the runs at ``ref_p`` and ``perm_p`` first differ beyond a rearrangement of entries
        (module docstring): the first module input or output whose sorted values differ."""
        tol = self.tol[dtype]
        ref = self.record_events(dtype, ref_p, x, mode)
        out = self.record_events(dtype, perm_p, x, mode)
        classes = {name: cls for kind, name, cls, *_ in ref if kind == "out"}
        for (kind, name, cls, owner, call, a), (kind_p, name_p, _, _, _, b) in zip(ref, out, strict=False):
            if (kind, name) != (kind_p, name_p):
                return f"the two runs call different modules ({name!r} vs {name_p!r}): control flow depends on values"
            if _error(b, a, key=_sorted_values) > tol:
                nth = f" (call {call})" if call > 1 else ""
                if kind == "out":
                    what = f"the output of module {name!r} ({cls}){nth}" if name else f"the output of {cls}"
                    return what + ", made in its own forward" + self.describe(name, groups)
                return (
                    f"the input of module {name!r} ({cls}){nth}, made by an operation in the forward of "
                    + (f"{owner!r} ({classes.get(owner, '?')})" if owner else f"{classes.get(owner, 'the model')}")
                    + self.describe(owner, groups)
                )
        return (
            "every module's output at P(θ) is a rearrangement of its output at θ, but the model's output is not "
            "the same: the group permutes an axis that reaches the output (the output layer's rows, or a "
            "positional axis)"
        )

    def describe(self, name: str, groups: list[str]) -> str:
        """Which tensors of module ``name`` the ``groups`` act on, and which float ones they do not."""
        if name:
            keys = [k for k in self.spec.axes if k.startswith(name + ".")]
        else:  # the model's own forward: the tensors it reads directly, if any
            keys = [k for k in self.spec.axes if "." not in k] or list(self.spec.axes)
        if not keys:
            return (
                "; it has no parameters: it combines tensors the spec permutes differently "
                "(a residual sum, a concatenation, a product)"
            )
        gs = set(groups)
        acted = [f"{k} axis {ax}" for k in keys for ax, e in enumerate(self.spec.axes[k]) if gs & set(entry_groups(e))]
        not_acted = [
            k for k in keys if k in self.float_keys and not any(gs & set(entry_groups(e)) for e in self.spec.axes[k])
        ]
        label = "+".join(groups) if len(groups) <= 3 else "the permutation"
        return f"; of its tensors, {label} acts on: {_short(acted)}; not on: {_short(not_acted)}"


def _permuted_pair(spec: PermutationSpec, theta: Params, q: Permutation) -> tuple[Params, Params]:
    """(θ, Q(θ)): the points compared by invariant (i) under the permutation ``q``."""
    return theta, q.apply(spec, theta)


def _combined_pair(
    spec: PermutationSpec, coeffs: list[float], points: list[Params], mixed: Params, q: Permutation
) -> tuple[Params, Params]:
    """(Σ kᵢ θᵢ, Σ kᵢ Q(θᵢ)): the points compared by the functional half of invariant (ii)."""
    return mixed, combine(coeffs, [q.apply(spec, p) for p in points])


def _short(items: list[str], n: int = 6) -> str:
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tie_groups(model: nn.Module, state: Mapping[str, Tensor]) -> list[list[str]]:
    """``state_dict`` keys naming one tensor (tied weights), in state order, groups of two or more."""
    by_id: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if name in state:
            by_id.setdefault(id(t), []).append(name)
    order = {k: i for i, k in enumerate(state)}
    return [sorted(set(ns), key=order.__getitem__) for ns in by_id.values() if len(set(ns)) > 1]


# ============================================================================================
# the entry point
# ============================================================================================
def _check_arguments(model, spec, example_input, examples, seed, dtypes, modes, k_points, tolerances):
    if not isinstance(model, nn.Module):
        raise validate.ArgumentTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(spec, PermutationSpec):
        raise validate.ArgumentTypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise validate.ArgumentTypeError(
            f"example_input must be a Tensor or a tuple of Tensors, got {type(example_input).__name__}"
        )
    for i, x in enumerate(inputs):
        if x.is_complex():
            raise ValueError(f"example_input[{i}]: complex inputs are not supported")
    examples = validate.integer("examples", examples)
    seed = validate.integer("seed", seed, minimum=0)
    k_points = validate.integer("k_points", k_points, minimum=2)
    if isinstance(dtypes, torch.dtype) or not isinstance(dtypes, Sequence) or not dtypes:
        raise validate.ArgumentTypeError(f"dtypes must be a non-empty sequence of torch dtypes, got {dtypes!r}")
    for d in dtypes:
        if not isinstance(d, torch.dtype) or not d.is_floating_point:
            raise ValueError(f"dtypes must be floating torch dtypes, got {d!r}")
    if len(set(dtypes)) != len(dtypes):
        raise ValueError(f"dtypes repeat an entry: {list(dtypes)}")
    if isinstance(modes, str) or not isinstance(modes, Sequence) or not modes:
        raise validate.ArgumentTypeError(f"modes must be a non-empty sequence of {MODES}, got {modes!r}")
    for m in modes:
        validate.choice("mode", m, MODES)
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes repeat an entry: {list(modes)}")
    state = model.state_dict()
    try:
        spec.check_params(state)
    except ValueError as e:
        raise ValueError(f"verify_spec: the spec does not fit {type(model).__name__}: {e}") from e
    device = next(iter(state.values())).device if state else torch.device("cpu")
    tol = {}
    for d in dtypes:
        given = (tolerances or {}).get(d)
        tol[d] = (
            default_tolerance(d, device)
            if given is None
            else validate.number(f"tolerance of {d}", given, positive=True)
        )
    return inputs, examples, seed, list(dtypes), list(modes), k_points, tol


def verify_spec(
    model: nn.Module,
    spec: PermutationSpec,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    examples: int = 25,
    seed: int = 0,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    modes: Sequence[str] = MODES,
    k_points: int = 3,
    tolerances: Mapping[torch.dtype, float] | None = None,
) -> VerifyReport:
    """Test invariants (i) and (ii) of the module docstring for ``spec`` on ``model``.

    ``example_input``: one batch (a tensor, or a tuple of tensors for a forward taking several);
    the first example uses it as given, the others draw inputs of its shapes and dtypes (floats
    ~ N(0, 1); integers, e.g. token ids, uniform in ``[min(0, min x), max x + 1)``). ``examples``
    hypothesis examples are drawn deterministically from ``seed``; each is checked in every dtype of
    ``dtypes`` and every mode of ``modes``. ``tolerances``: per-dtype overrides of
    ``default_tolerance``. ``model`` is never modified (copies are evaluated).

    Returns a ``VerifyReport``; a spec without a group of two or more units returns ``ok=True``,
    ``examples=0`` and a text saying there was nothing to check. Raises ``TypeError`` /
    ``ValueError`` for bad arguments, a spec that does not fit ``model.state_dict()``, a model
    whose own forward fails on the inputs, or one whose output is random in every mode checked.
    """
    inputs, examples, seed, dtypes, modes, k_points, tol = _check_arguments(
        model, spec, example_input, examples, seed, dtypes, modes, k_points, tolerances
    )
    coverage = spec_coverage(spec)
    if not any(n > 1 for n in spec.sizes.values()):
        return VerifyReport(True, [], 0, coverage, notes=["no permutation group has two or more units"])

    checker = _Checker(model, spec, inputs, dtypes, modes, k_points, tol)
    violations = _tied_violations(spec, checker.ties)

    def one(perm_seed: int, point_seed: int, coeffs: list[float]) -> None:
        if checker.error is not None:
            return
        try:
            checker.example(perm_seed, point_seed, coeffs)
        except Exception as e:  # kept, and raised after hypothesis returns (no shrinking of a usage error)
            checker.error = e

    if currently_in_test_context():  # hypothesis refuses a nested @given: the same draws, from random.Random
        checker.source = "a seeded random.Random (called inside a hypothesis test, where @given cannot nest)"
        rnd = random.Random(seed)
        for _ in range(examples):
            one(rnd.randint(0, _MAX_SEED), rnd.randint(0, _MAX_SEED), [rnd.uniform(0.05, 1.0) for _ in range(k_points)])
    else:
        checker.source = "hypothesis"
        run = given(
            perm_seed=st.integers(0, _MAX_SEED),
            point_seed=st.integers(0, _MAX_SEED),
            coeffs=st.lists(st.floats(0.05, 1.0), min_size=k_points, max_size=k_points),
        )(one)
        run = settings(
            max_examples=examples,
            database=None,
            derandomize=True,
            deadline=None,
            phases=(Phase.generate,),
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
            print_blob=False,
        )(run)
        hypothesis_seed(seed)(run)()
    if checker.error is not None:
        raise checker.error
    if len(checker.skipped) == len(modes):
        raise ValueError(
            f"verify_spec: {checker.name}'s output changes with the random seed in every mode {modes} "
            "(dropout or noise outside an nn.Dropout module?): the function cannot be compared"
        )

    checks: list[str] = []
    order = list(_CHECKS)

    def rank(item):
        (check, mode, dtype), _ = item
        return order.index(check), dtypes.index(dtype), modes.index(mode) if mode in modes else -1

    for (check, mode, dtype), s in sorted(checker.stats.items(), key=rank):
        invariant, label = _CHECKS[check]
        t = 0.0 if check == "comb.params" else tol[dtype]
        where = f"{_dtype_name(dtype)} {mode}" if mode != "n/a" else f"{_dtype_name(dtype)} params"
        err = "exact" if check == "comb.params" and s.worst == 0 else f"worst {s.worst:.1e} (tol {t:.0e})"
        checks.append(f"{label:<58} {where:<15} held {s.n - s.failed}/{s.n}  {err}")
        if s.failed:
            f = s.first
            what = label.split(" ", 1)[1].strip()
            unit = f" — {f['unit']} breaks it" if f["unit"] else ""
            violations.append(
                Violation(
                    invariant=invariant,
                    group=f["group"],
                    mode=mode,
                    dtype=_dtype_name(dtype),
                    detail=(
                        f"{what} failed in {s.failed} of {s.n} examples (first: example {f['example']}, "
                        f"permutation seed {f['perm_seed']}, point seed {f['point_seed']}, relative error "
                        f"{f['error']:.3g} > tol {t:.0e}){unit}"
                    ),
                    first_divergence=f["divergence"],
                )
            )
    tried = _tried_text(checker, examples, seed, tol)
    notes = list(checker.skipped.values())
    return VerifyReport(not violations, violations, checker.examples, coverage, tried, checks, notes)


def _tied_violations(spec: PermutationSpec, ties: list[list[str]]) -> list[Violation]:
    """Tied keys (one tensor under several names) that the spec permutes differently."""
    out = []
    for names in ties:
        first = spec.axes[names[0]]
        for k in names[1:]:
            if spec.axes[k] != first:
                groups = sorted({g for n in (names[0], k) for e in spec.axes[n] for g in entry_groups(e)})
                out.append(
                    Violation(
                        "permutation",
                        "+".join(groups) or None,
                        "n/a",
                        "any",
                        f"keys {names[0]!r} and {k!r} are one tensor (tied weights) but the spec permutes them "
                        f"differently: {first} vs {spec.axes[k]}",
                        f"key {k!r}",
                    )
                )
    return out


def _tried_text(c: _Checker, examples: int, seed: int, tol: Mapping[torch.dtype, float]) -> str:
    shapes = ", ".join(f"{list(x.shape)} {_dtype_name(x.dtype)}" for x in c.inputs)
    stats = (
        f"running statistics of {len(c.stats_pairs)} BatchNorm layer(s) randomised "
        "(running_mean ~ N(0, 0.5²), running_var ~ U(0.5, 2))"
        if c.stats_pairs
        else "no BatchNorm running statistics"
    )
    dts = ", ".join(f"{_dtype_name(d)} (tol {tol[d]:.0e})" for d in c.dtypes)
    return "\n".join(
        [
            f"{c.name}: {c.examples} of {examples} example(s) drawn by {c.source} (seed {seed}, no shrinking)",
            f"each example: a random permutation of all {len(c.spec.sizes)} group(s) (Permutation.random: blocks "
            "and head classes respected)",
            f"  inputs {shapes} (example 1: the example input itself, then random ones)",
            f"  {stats}",
            f"  {c.k_points} points θᵢ = θ + seeded noise, random convex coefficients k (Σ k = 1)",
            f"checked in {dts} × {', '.join(c.modes)} mode (dropout off in train mode); |Δ| ≤ tol · max(1, max|y|)",
        ]
    )
