"""Hypothesis strategies for architectures outside the zoo: transformers, concatenations, depthwise convs.

The properties of ``props_any_arch.py`` run the two invariants of Git Re-Basin (Ainsworth et al. 2023,
Eq. (1): f(P(θ), x) = f(θ, x); §2: Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ)) with the spec *discovered* by
``reference.trace.trace_spec`` on networks written the way people write them, not the zoo's:

- ``transformers()``: depth 1–2, heads 1–4, head_dim 1–4, pre-norm or post-norm residual blocks
  (Xiong et al. 2020), GELU or ReLU MLPs, LayerNorm or RMSNorm (Zhang & Sennrich 2019); attention
  (Vaswani et al. 2017, Eq. (1)) written by hand (``.view(B, T, H, d).transpose(1, 2)`` head split,
  ``q @ k.transpose(-2, -1) / √d``, softmax, ``@ v``), by ``F.scaled_dot_product_attention``, or by
  ``nn.MultiheadAttention(batch_first=True)``; optional causal mask (a registered buffer, persistent or
  not, ``is_causal`` for SDPA); tokens from a ``Linear`` over features or an ``nn.Embedding`` over ids;
  optional learned position embedding (``[1, T, D]`` or ``[T, D]``) and class token (ViT, Dosovitskiy
  et al. 2021: ``torch.cat`` along the token axis); readout: mean over tokens, the class token, the last
  token, or per-token logits (GPT-style).
- ``concat_nets()`` (ReLU or GELU): MLP branches joined by ``torch.cat`` along features (optionally
  with the raw input as a fixed segment, optionally normalised after the cat); Inception-style conv
  branches (Szegedy et al. 2015) with a pooled pass-through branch; DenseNet-style growth (Huang et
  al. 2017: every layer reads ``torch.cat`` of all earlier feature maps, a one-tensor cat included);
  two conv branches joined along a *positional* axis (their channels must then share one permutation).
- ``depthwise_nets()``: MobileNet-style (Howard et al. 2017; Sandler et al. 2018) stems and blocks:
  depthwise-separable, inverted residual (expand → depthwise → project, ``+ x``) and ConvNeXt-style
  (Liu et al. 2022: depthwise conv → channels-last LayerNorm → Linear MLP → ``+ x``), all with BatchNorm
  (or LayerNorm), optionally a grouped conv (``groups=2``: held fixed by convention); pooling
  ``x.mean((2, 3))``, ``x.amax((2, 3))`` or ``F.adaptive_avg_pool2d(x, 1).flatten(1)``.
- ``any_archs()``: one of the three.

Each draw is a ``NetCase(model, params, x, family, config)``: the module in float64 with its state
already at a random point (BatchNorm running statistics and every 1-D parameter moved off their
initial values, so an unpermuted buffer or a norm weight left in place shows), its ``state_dict``, an
example input (float64 features, or int64 token ids) and the drawn choices. ``random_point(model,
seed)`` draws further points of the same architecture (for combinations), ``inputs(case, batch, seed)``
further inputs.

Every generated module also has ``expected_spec()``: its permutation symmetry written by hand, in the
conventions of ``reference.trace`` (one stream group ``S`` over a residual stream; per attention layer
one Q/K group and one V/output group, both with ``blocks = head_dim`` and one shared head class;
a concatenated axis as segments; a depthwise conv keeps its input's group; grouped convs fixed).
``props_any_arch.py`` checks the traced spec against it.

Short aliases: ``nets = any_archs``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from reference.params import Params
from reference.permutation import PermutationSpec

__all__ = [
    "ARCH_FAMILIES",
    "ATTENTION_IMPLS",
    "BLOCK_KINDS",
    "CONCAT_KINDS",
    "POOLS",
    "READOUTS",
    "STREAM_NORMS",
    "ConcatMLP",
    "DenseNet",
    "DepthwiseNet",
    "InceptionNet",
    "NetCase",
    "PositionConcatNet",
    "TinyTransformer",
    "any_archs",
    "concat_nets",
    "depthwise_nets",
    "inputs",
    "nets",
    "random_point",
    "transformers",
]

ARCH_FAMILIES = ("transformer", "concat", "depthwise")
ATTENTION_IMPLS = ("manual", "sdpa", "mha")
CONCAT_KINDS = ("mlp", "inception", "dense", "positions")
BLOCK_KINDS = ("separable", "inverted", "convnext", "grouped")
POOLS = ("mean", "amax", "adaptive")
READOUTS = ("mean", "cls", "last", "tokens")
STREAM_NORMS = ("layer", "rms") if hasattr(nn, "RMSNorm") else ("layer",)  # nn.RMSNorm: torch ≥ 2.4


# ---------------------------------------------------------------------------------------------
# named tuple
# ---------------------------------------------------------------------------------------------
class NetCase(NamedTuple):
    """A generated module (float64, state at a random point), its state, an example input, its choices."""

    model: nn.Module
    params: Params
    x: Tensor
    family: str
    config: dict[str, Any]

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return f"NetCase({self.family}, {self.config}, x={tuple(self.x.shape)} {self.x.dtype})"


# ---------------------------------------------------------------------------------------------
# hand-written symmetries
# ---------------------------------------------------------------------------------------------
class _Symmetry:
    """A hand-written spec under construction: named groups, merges (residual additions, a cat along
    positions), fixed groups (grouped convs), axis entries per key, blocks and head classes.

    ``spec(model)`` resolves every group to its merged representative (``None`` if the merged class
    holds a fixed group) and returns the ``PermutationSpec`` over ``model.state_dict()``'s shapes.
    """

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._fixed: set[str] = set()
        self._axes: dict[str, tuple[Any, ...]] = {}
        self._blocks: dict[str, int] = {}
        self._heads: dict[str, str] = {}

    def new(self, name: str) -> str:
        if name in self._parent:
            raise ValueError(f"group {name!r} declared twice")
        self._parent[name] = name
        return name

    def _find(self, g: str) -> str:
        while self._parent[g] != g:
            g = self._parent[g]
        return g

    def merge(self, a: str, b: str) -> str:
        ra, rb = self._find(a), self._find(b)
        self._parent[rb] = ra
        return ra

    def fix(self, g: str) -> None:
        self._fixed.add(g)

    def put(self, key: str, *axes: Any) -> None:
        if key in self._axes:
            raise ValueError(f"key {key!r} given twice")
        self._axes[key] = axes

    def attention(self, qk: str, vo: str, head_dim: int, head_class: str) -> None:
        for g in (qk, vo):
            self._blocks[g] = head_dim
            self._heads[g] = head_class

    def spec(self, model: nn.Module) -> PermutationSpec:
        fixed = {self._find(g) for g in self._fixed}

        def res(g: str | None) -> str | None:
            if g is None:
                return None
            r = self._find(g)
            return None if r in fixed else r

        def entry(e: Any) -> Any:
            if e is None or isinstance(e, str):
                return res(e)
            return tuple((res(g), n) for g, n in e)

        axes = {k: tuple(entry(e) for e in es) for k, es in self._axes.items()}
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        blocks = {res(g): b for g, b in self._blocks.items() if res(g) is not None}
        heads = {res(g): h for g, h in self._heads.items() if res(g) is not None}
        return PermutationSpec(axes, shapes, blocks, heads)


def _linear(sym: _Symmetry, key: str, m: nn.Linear, out: str | None, inp: Any) -> None:
    sym.put(f"{key}.weight", out, inp)
    if m.bias is not None:
        sym.put(f"{key}.bias", out)


def _conv(sym: _Symmetry, key: str, m: nn.Conv2d, out: str | None, inp: Any) -> None:
    sym.put(f"{key}.weight", out, inp, None, None)
    if m.bias is not None:
        sym.put(f"{key}.bias", out)


def _norm(sym: _Symmetry, key: str, m: nn.Module, g: Any) -> None:
    """Affine parameters (and BatchNorm's running statistics) of a norm over channel group ``g``."""
    for name, _ in m.named_parameters(recurse=False):
        sym.put(f"{key}.{name}", g)
    for name, _ in m.named_buffers(recurse=False):
        sym.put(f"{key}.{name}", *([] if name == "num_batches_tracked" else [g]))


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def _stream_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return nn.RMSNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; use 'layer' or 'rms'")


class HandAttention(nn.Module):
    """Multi-head self-attention written out (Vaswani et al. 2017, Eq. (1); nanoGPT's layout):
    ``softmax(q kᵀ / √d) v`` per head, heads split by ``.view(B, T, H, d).transpose(1, 2)``;
    ``impl="sdpa"`` computes the same with ``F.scaled_dot_product_attention``."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, impl: str, causal: bool, tokens: int, bias: bool, persistent: bool
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.impl, self.causal = heads, head_dim, impl, causal
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, dim, bias=bias)
        self.mask_in_state = causal and impl == "manual" and persistent
        if causal and impl == "manual":  # True above the diagonal: a query never sees a later key
            self.register_buffer("mask", torch.ones(tokens, tokens, dtype=torch.bool).triu(1), persistent=persistent)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            y = y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if self.causal:
                att = att.masked_fill(self.mask, float("-inf"))
            att = att.softmax(dim=-1)
            y = (att @ v).transpose(1, 2).contiguous().view(B, T, -1)
        return self.out_proj(y)

    def symmetry(self, sym: _Symmetry, key: str, stream: str) -> None:
        qk, vo = sym.new(f"{key}.QK"), sym.new(f"{key}.VO")
        _linear(sym, f"{key}.q_proj", self.q_proj, qk, stream)
        _linear(sym, f"{key}.k_proj", self.k_proj, qk, stream)
        _linear(sym, f"{key}.v_proj", self.v_proj, vo, stream)
        _linear(sym, f"{key}.out_proj", self.out_proj, stream, vo)
        if self.mask_in_state:
            sym.put(f"{key}.mask", None, None)
        sym.attention(qk, vo, self.head_dim, f"{key}.heads")


class MHAttention(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` as self-attention (its ``in_proj_weight`` stacks the
    Q, K and V rows: one axis, three segments); causal through a boolean ``attn_mask`` buffer."""

    def __init__(self, dim: int, heads: int, causal: bool, tokens: int, bias: bool, persistent: bool) -> None:
        super().__init__()
        self.causal = causal
        self.mask_in_state = causal and persistent
        self.mha = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=True)
        if causal:
            self.register_buffer("mask", torch.ones(tokens, tokens, dtype=torch.bool).triu(1), persistent=persistent)

    def forward(self, x: Tensor) -> Tensor:
        if self.causal:
            return self.mha(x, x, x, need_weights=False, attn_mask=self.mask, is_causal=True)[0]
        return self.mha(x, x, x, need_weights=False)[0]

    def symmetry(self, sym: _Symmetry, key: str, stream: str) -> None:
        qk, vo = sym.new(f"{key}.QK"), sym.new(f"{key}.VO")
        n = self.mha.embed_dim
        rows = ((qk, n), (qk, n), (vo, n))
        sym.put(f"{key}.mha.in_proj_weight", rows, stream)
        if self.mha.in_proj_bias is not None:
            sym.put(f"{key}.mha.in_proj_bias", rows)
        _linear(sym, f"{key}.mha.out_proj", self.mha.out_proj, stream, vo)
        if self.mask_in_state:
            sym.put(f"{key}.mask", None, None)
        sym.attention(qk, vo, n // self.mha.num_heads, f"{key}.heads")


class TransformerBlock(nn.Module):
    """A residual block: attention then MLP, pre-norm (``x + f(norm(x))``) or post-norm (``norm(x + f(x))``)."""

    def __init__(self, dim: int, hidden: int, attn: nn.Module, norm: str, act: str, prenorm: bool) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.norm1 = _stream_norm(norm, dim)
        self.attn = attn
        self.norm2 = _stream_norm(norm, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.prenorm:
            x = x + self.attn(self.norm1(x))
            return x + self.fc2(self.act(self.fc1(self.norm2(x))))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.fc2(self.act(self.fc1(x))))

    def symmetry(self, sym: _Symmetry, key: str, stream: str) -> None:
        _norm(sym, f"{key}.norm1", self.norm1, stream)
        self.attn.symmetry(sym, f"{key}.attn", stream)
        _norm(sym, f"{key}.norm2", self.norm2, stream)
        hidden = sym.new(f"{key}.mlp")
        _linear(sym, f"{key}.fc1", self.fc1, hidden, stream)
        _linear(sym, f"{key}.fc2", self.fc2, stream, hidden)


class TinyTransformer(nn.Module):
    """A small transformer encoder / decoder-only model over a residual stream of width ``dim``.

    Tokens: ``Linear(features, dim)`` over ``[B, T, features]`` or ``nn.Embedding(vocab, dim)`` over
    ``[B, T]`` ids; an optional class token is prepended (``torch.cat`` along tokens) and a learned
    position embedding added; blocks; a final norm for pre-norm models; a linear head on the
    token mean, the class token, the last token, or every token.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        D, T = cfg["dim"], cfg["tokens"] + int(cfg["cls"])
        if cfg["embedding"]:
            self.embed: nn.Module = nn.Embedding(cfg["vocab"], D)
        else:
            self.embed = nn.Linear(cfg["features"], D)
        if cfg["cls"]:
            self.cls = nn.Parameter(torch.zeros(1, 1, D))
        if cfg["pos"] is not None:
            self.pos = nn.Parameter(torch.zeros(1, T, D) if cfg["pos"] == "1TD" else torch.zeros(T, D))
        blocks = []
        for _ in range(cfg["depth"]):
            if cfg["attention"] == "mha":
                attn: nn.Module = MHAttention(D, cfg["heads"], cfg["causal"], T, cfg["bias"], cfg["persistent"])
            else:
                attn = HandAttention(
                    D, cfg["heads"], cfg["head_dim"], cfg["attention"], cfg["causal"], T, cfg["bias"], cfg["persistent"]
                )
            blocks.append(TransformerBlock(D, cfg["hidden"], attn, cfg["norm"], cfg["act"], cfg["prenorm"]))
        self.blocks = nn.ModuleList(blocks)
        self.norm = _stream_norm(cfg["norm"], D) if cfg["prenorm"] else nn.Identity()
        self.head = nn.Linear(D, cfg["classes"])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The class token and position embedding: N(0, 0.5²) (``random_point`` calls this too)."""
        with torch.no_grad():
            for p in (getattr(self, "cls", None), getattr(self, "pos", None)):
                if p is not None:
                    p.normal_(0.0, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        if self.cfg["cls"]:
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        if self.cfg["pos"] is not None:
            h = h + self.pos
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        readout = self.cfg["readout"]
        if readout == "mean":
            h = h.mean(dim=1)
        elif readout == "cls":
            h = h[:, 0]
        elif readout == "last":
            h = h[:, -1]
        return self.head(h)

    def expected_spec(self) -> PermutationSpec:
        """The symmetry of this transformer, written by hand (module docstring's conventions)."""
        sym = _Symmetry()
        S = sym.new("S")
        if isinstance(self.embed, nn.Embedding):
            sym.put("embed.weight", None, S)
        else:
            _linear(sym, "embed", self.embed, S, None)
        if self.cfg["cls"]:
            sym.put("cls", None, None, S)
        if self.cfg["pos"] is not None:
            sym.put("pos", *([None] * (self.pos.ndim - 1)), S)
        for i, block in enumerate(self.blocks):
            block.symmetry(sym, f"blocks.{i}", S)
        _norm(sym, "norm", self.norm, S)
        _linear(sym, "head", self.head, None, S)
        return sym.spec(self)

    def permuted_units(self) -> int:
        """How many units the architecture can permute, counted as in ``props_any_arch.normal_form``:
        the stream (``dim``), and per block the Q/K and V/O units (heads × head_dim each) and the MLP's
        hidden units; a group of one unit admits only the identity (0), and with head_dim 1 the
        coupled Q/K and V/O groups are one permutation of the heads (heads units)."""

        def free(n: int) -> int:
            return n if n >= 2 else 0

        H, d = self.cfg["heads"], self.cfg["head_dim"]
        attn = 2 * H * d if d >= 2 else free(H)
        return free(self.cfg["dim"]) + self.cfg["depth"] * (attn + free(self.cfg["hidden"]))


@st.composite
def transformers(
    draw: st.DrawFn,
    depths: tuple[int, int] = (1, 2),
    heads: tuple[int, int] = (1, 4),
    head_dims: tuple[int, int] = (1, 4),
    tokens: tuple[int, int] = (1, 4),
    attention: Sequence[str] = ATTENTION_IMPLS,
    dims: tuple[int, int] = (2, 8),
    batch: tuple[int, int] = (2, 4),
) -> NetCase:
    """A ``TinyTransformer`` case (module docstring); ``tokens`` bounds the sequence length *with* the
    class token, so ``tokens=(2, 4)`` guarantees that attention mixes at least two positions; ``dims``
    bounds the stream width (for ``nn.MultiheadAttention`` it is heads × head_dim, drawn in ``dims``
    where ``heads`` and ``head_dims`` allow)."""
    impl = draw(st.sampled_from(list(attention)))
    H, d = draw(st.integers(*heads)), draw(st.integers(*head_dims))
    if impl == "mha":  # the stream is heads × head_dim: bring it into ``dims`` if the ranges allow
        while H * d < dims[0] and (H < heads[1] or d < head_dims[1]):
            H, d = (H + 1, d) if H < heads[1] else (H, d + 1)
    causal = draw(st.booleans())
    T_total = draw(st.integers(*tokens))
    cls = (not causal) and T_total >= 2 and draw(st.booleans())
    readouts = ["mean", "last", "tokens"] + (["cls"] if cls else [])
    embedding = draw(st.booleans())
    cfg = {
        "attention": impl,
        "depth": draw(st.integers(*depths)),
        "heads": H,
        "head_dim": d,
        "dim": H * d if impl == "mha" else draw(st.integers(*dims)),
        "hidden": draw(st.integers(2, 8)),
        "tokens": T_total - int(cls),
        "cls": cls,
        "pos": draw(st.sampled_from([None, "1TD", "TD"])),
        "causal": causal,
        "persistent": draw(st.booleans()),
        "prenorm": draw(st.booleans()),
        "norm": draw(st.sampled_from(list(STREAM_NORMS))),
        "act": draw(st.sampled_from(["gelu", "relu"])),
        "bias": draw(st.booleans()),
        "embedding": embedding,
        "vocab": draw(st.integers(3, 6)) if embedding else None,
        "features": None if embedding else draw(st.integers(2, 4)),
        "readout": draw(st.sampled_from(readouts)),
        "classes": draw(st.integers(2, 3)),
    }
    seed, b = draw(_seeds), draw(st.integers(*batch))
    model = _build(TinyTransformer, cfg, seed)
    x = _tokens(cfg, b, seed + 1)
    return NetCase(model, _state(model), x, "transformer", cfg)


def _tokens(cfg: dict[str, Any], batch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if cfg["embedding"]:
        return torch.randint(0, cfg["vocab"], (batch, cfg["tokens"]), generator=g)
    return torch.randn(batch, cfg["tokens"], cfg["features"], generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# concatenations
# ---------------------------------------------------------------------------------------------
def _act(h: Tensor, kind: str) -> Tensor:
    return F.gelu(h) if kind == "gelu" else F.relu(h)


def _pool(h: Tensor, kind: str) -> Tensor:
    if kind == "mean":
        return h.mean((2, 3))
    if kind == "amax":
        return h.amax((2, 3))
    return F.adaptive_avg_pool2d(h, 1).flatten(1)


class ConcatMLP(nn.Module):
    """MLP branches on one input joined by ``torch.cat`` along features (the raw input optionally one
    of the parts: a never-permuted segment), an optional BatchNorm / LayerNorm over the concatenation,
    then an MLP head."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        F_in, widths = cfg["features"], cfg["widths"]
        self.branches = nn.ModuleList(nn.Linear(F_in, w) for w in widths)
        total = sum(widths) + (F_in if cfg["with_input"] else 0)
        if cfg["norm"] == "batch":
            self.norm: nn.Module = nn.BatchNorm1d(total)
        elif cfg["norm"] == "layer":
            self.norm = nn.LayerNorm(total)
        else:
            self.norm = nn.Identity()
        self.fc = nn.Linear(total, cfg["hidden"])
        self.out = nn.Linear(cfg["hidden"], cfg["classes"])

    def forward(self, x: Tensor) -> Tensor:
        parts = [_act(branch(x), self.cfg["act"]) for branch in self.branches]
        if self.cfg["with_input"]:
            parts.insert(self.cfg["input_at"], x)
        h = self.norm(torch.cat(parts, dim=self.cfg["dim"]))
        return self.out(_act(self.fc(h), self.cfg["act"]))

    def expected_spec(self) -> PermutationSpec:
        sym = _Symmetry()
        segs: list[tuple[str | None, int]] = []
        for i, b in enumerate(self.branches):
            g = sym.new(f"branch{i}")
            _linear(sym, f"branches.{i}", b, g, None)
            segs.append((g, b.out_features))
        if self.cfg["with_input"]:
            segs.insert(self.cfg["input_at"], (None, self.cfg["features"]))
        _norm(sym, "norm", self.norm, tuple(segs))
        hidden = sym.new("hidden")
        _linear(sym, "fc", self.fc, hidden, tuple(segs))
        _linear(sym, "out", self.out, None, hidden)
        return sym.spec(self)


class InceptionNet(nn.Module):
    """Inception-style (Szegedy et al. 2015): a stem, then 1×1 and 3×3 conv branches (and optionally a
    3×3 max-pool pass-through of the stem) joined by ``torch.cat(dim=1)``, BatchNorm, a 1×1 conv,
    global pooling, a linear head."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        c0, a, b = cfg["stem"], cfg["widths"][0], cfg["widths"][1]
        self.stem = nn.Conv2d(cfg["in_channels"], c0, 3, padding=1)
        self.b1 = nn.Conv2d(c0, a, 1)
        self.b3 = nn.Conv2d(c0, b, 3, padding=1)
        total = a + b + (c0 if cfg["pool_branch"] else 0)
        self.bn = nn.BatchNorm2d(total)
        self.mix = nn.Conv2d(total, cfg["hidden"], 1)
        self.head = nn.Linear(cfg["hidden"], cfg["classes"])

    def forward(self, x: Tensor) -> Tensor:
        act = self.cfg["act"]
        s = _act(self.stem(x), act)
        parts = [_act(self.b1(s), act), _act(self.b3(s), act)]
        if self.cfg["pool_branch"]:
            parts.append(F.max_pool2d(s, 3, stride=1, padding=1))
        h = _act(self.mix(_act(self.bn(torch.cat(parts, dim=1)), act)), act)
        return self.head(_pool(h, self.cfg["pool"]))

    def expected_spec(self) -> PermutationSpec:
        sym = _Symmetry()
        s, a, b, hid = sym.new("stem"), sym.new("b1"), sym.new("b3"), sym.new("mix")
        _conv(sym, "stem", self.stem, s, None)
        _conv(sym, "b1", self.b1, a, s)
        _conv(sym, "b3", self.b3, b, s)
        segs = [(a, self.b1.out_channels), (b, self.b3.out_channels)]
        if self.cfg["pool_branch"]:
            segs.append((s, self.stem.out_channels))
        _norm(sym, "bn", self.bn, tuple(segs))
        _conv(sym, "mix", self.mix, hid, tuple(segs))
        _linear(sym, "head", self.head, None, hid)
        return sym.spec(self)


class DenseLayer(nn.Module):
    """BN → ReLU (or GELU) → 3×3 conv producing ``growth`` new channels (Huang et al. 2017, Eq. (2))."""

    def __init__(self, c_in: int, growth: int, norm: bool, act: str) -> None:
        super().__init__()
        self.act = act
        self.bn = nn.BatchNorm2d(c_in) if norm else nn.Identity()
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=not norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_act(self.bn(x), self.act))


class DenseNet(nn.Module):
    """DenseNet-style growth: feature maps ``[stem(x)]`` (or ``[x, stem(x)]``, U-Net-like: the input is a
    never-permuted segment); each layer reads ``torch.cat(features, 1)`` — a one-tensor cat for the first
    layer without the input — and appends its output; BN, ReLU, pooling and a head read the last cat."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        c = cfg["stem"] + (cfg["in_channels"] if cfg["with_input"] else 0)
        self.stem = nn.Conv2d(cfg["in_channels"], cfg["stem"], 3, padding=1)
        layers = []
        for g in cfg["growth"]:
            layers.append(DenseLayer(c, g, cfg["norm"], cfg["act"]))
            c += g
        self.layers = nn.ModuleList(layers)
        self.bn = nn.BatchNorm2d(c) if cfg["norm"] else nn.Identity()
        self.head = nn.Linear(c, cfg["classes"])

    def forward(self, x: Tensor) -> Tensor:
        features = [x, self.stem(x)] if self.cfg["with_input"] else [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        h = _act(self.bn(torch.cat(features, 1)), self.cfg["act"])
        return self.head(_pool(h, self.cfg["pool"]))

    def expected_spec(self) -> PermutationSpec:
        sym = _Symmetry()
        stem = sym.new("stem")
        _conv(sym, "stem", self.stem, stem, None)
        segs: list[tuple[str | None, int]] = [(stem, self.stem.out_channels)]
        if self.cfg["with_input"]:
            segs.insert(0, (None, self.cfg["in_channels"]))
        for i, layer in enumerate(self.layers):
            g = sym.new(f"layer{i}")
            _norm(sym, f"layers.{i}.bn", layer.bn, tuple(segs))
            _conv(sym, f"layers.{i}.conv", layer.conv, g, tuple(segs))
            segs.append((g, layer.conv.out_channels))
        _norm(sym, "bn", self.bn, tuple(segs))
        _linear(sym, "head", self.head, None, tuple(segs))
        return sym.spec(self)


class PositionConcatNet(nn.Module):
    """Two conv branches on one input joined by ``torch.cat`` along a *positional* axis (height or
    width): the next conv reads both halves with one kernel, so the branches' channels must share one
    permutation (the tracer merges their groups)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        c = cfg["widths"][0]
        self.conv_a = nn.Conv2d(cfg["in_channels"], c, 3, padding=1)
        self.conv_b = nn.Conv2d(cfg["in_channels"], c, 1)
        self.bn = nn.BatchNorm2d(c) if cfg["norm"] else nn.Identity()
        self.conv = nn.Conv2d(c, cfg["hidden"], 3, padding=1)
        self.head = nn.Linear(cfg["hidden"], cfg["classes"])

    def forward(self, x: Tensor) -> Tensor:
        act = self.cfg["act"]
        h = torch.cat([_act(self.conv_a(x), act), _act(self.conv_b(x), act)], dim=self.cfg["dim"])
        h = _act(self.conv(self.bn(h)), act)
        return self.head(_pool(h, self.cfg["pool"]))

    def expected_spec(self) -> PermutationSpec:
        sym = _Symmetry()
        a, b, hid = sym.new("a"), sym.new("b"), sym.new("conv")
        sym.merge(a, b)
        _conv(sym, "conv_a", self.conv_a, a, None)
        _conv(sym, "conv_b", self.conv_b, b, None)
        _norm(sym, "bn", self.bn, a)
        _conv(sym, "conv", self.conv, hid, a)
        _linear(sym, "head", self.head, None, hid)
        return sym.spec(self)


_CONCAT_CLASSES = {"mlp": ConcatMLP, "inception": InceptionNet, "dense": DenseNet, "positions": PositionConcatNet}


@st.composite
def concat_nets(
    draw: st.DrawFn,
    kinds: Sequence[str] = CONCAT_KINDS,
    acts: Sequence[str] = ("relu", "gelu"),
    batch: tuple[int, int] = (3, 4),
) -> NetCase:
    """A concatenation net (module docstring) of one of ``kinds``, activations ReLU or GELU (``acts``:
    GELU only for the mutant properties: a ReLU unit dead on every input hides any relabelling)."""
    kind = draw(st.sampled_from(list(kinds)))
    w = st.integers(1, 4)
    cfg: dict[str, Any] = {
        "kind": kind,
        "act": draw(st.sampled_from(list(acts))),
        "classes": draw(st.integers(2, 3)),
        "hidden": draw(st.integers(2, 5)),
    }
    if kind == "mlp":
        with_input = draw(st.booleans())
        n = draw(st.integers(1 if with_input else 2, 3))
        cfg |= {
            "features": draw(st.integers(2, 4)),
            "widths": draw(st.lists(w, min_size=n, max_size=n)),
            "with_input": with_input,
            "input_at": draw(st.integers(0, n)),
            "norm": draw(st.sampled_from([None, "batch", "layer"])),
            "dim": draw(st.sampled_from([1, -1])),
        }
        shape: tuple[int, ...] = (cfg["features"],)
    else:
        cfg |= {"in_channels": draw(st.integers(1, 3)), "pool": draw(st.sampled_from(list(POOLS)))}
        if kind == "inception":
            cfg |= {
                "stem": draw(w),
                "widths": draw(st.lists(w, min_size=2, max_size=2)),
                "pool_branch": draw(st.booleans()),
            }
        elif kind == "dense":
            cfg |= {
                "stem": draw(w),
                "growth": draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)),
                "with_input": draw(st.booleans()),
                "norm": draw(st.booleans()),
            }
        else:
            cfg |= {
                "widths": [draw(st.integers(2, 4))],
                "dim": draw(st.sampled_from([2, 3])),
                "norm": draw(st.booleans()),
            }
        size = draw(st.integers(2, 4))
        shape = (cfg["in_channels"], size, size)
    seed, b = draw(_seeds), draw(st.integers(*batch))
    model = _build(_CONCAT_CLASSES[kind], cfg, seed)
    x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return NetCase(model, _state(model), x, "concat", cfg)


# ---------------------------------------------------------------------------------------------
# depthwise convolutions
# ---------------------------------------------------------------------------------------------
def _depthwise(c: int, k: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=bias)


class SeparableBlock(nn.Module):
    """MobileNet's depthwise-separable block (Howard et al. 2017, Fig. 3): depthwise k×k → BN → ReLU →
    pointwise 1×1 → BN → ReLU; ``+ x`` when ``residual`` (widths equal)."""

    def __init__(self, c_in: int, c_out: int, k: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.dw = _depthwise(c_in, k, bias=True)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))
        return x + h if self.residual else h

    def symmetry(self, sym: _Symmetry, key: str, g: str) -> str:
        _conv(sym, f"{key}.dw", self.dw, g, None)
        _norm(sym, f"{key}.bn1", self.bn1, g)
        out = sym.new(f"{key}.pw")
        _conv(sym, f"{key}.pw", self.pw, out, g)
        _norm(sym, f"{key}.bn2", self.bn2, out)
        return sym.merge(g, out) if self.residual else out


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual (Sandler et al. 2018, Table 1): 1×1 expand → BN → ReLU6 →
    depthwise → BN → ReLU6 → 1×1 project → BN, ``+ x``."""

    def __init__(self, c: int, expand: int, k: int) -> None:
        super().__init__()
        e = c * expand
        self.expand = nn.Conv2d(c, e, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.dw = _depthwise(e, k, bias=False)
        self.bn2 = nn.BatchNorm2d(e)
        self.project = nn.Conv2d(e, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        return x + self.bn3(self.project(h))

    def symmetry(self, sym: _Symmetry, key: str, g: str) -> str:
        e, out = sym.new(f"{key}.expand"), sym.new(f"{key}.project")
        _conv(sym, f"{key}.expand", self.expand, e, g)
        _norm(sym, f"{key}.bn1", self.bn1, e)
        _conv(sym, f"{key}.dw", self.dw, e, None)
        _norm(sym, f"{key}.bn2", self.bn2, e)
        _conv(sym, f"{key}.project", self.project, out, e)
        _norm(sym, f"{key}.bn3", self.bn3, out)
        return sym.merge(g, out)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (Liu et al. 2022, Fig. 4): depthwise k×k → channels-last LayerNorm → Linear
    (×2) → GELU → Linear → channels-first, ``+ x``."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.dw = _depthwise(c, k, bias=True)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)

    def symmetry(self, sym: _Symmetry, key: str, g: str) -> str:
        hid, out = sym.new(f"{key}.fc1"), sym.new(f"{key}.fc2")
        _conv(sym, f"{key}.dw", self.dw, g, None)
        _norm(sym, f"{key}.norm", self.norm, g)
        _linear(sym, f"{key}.fc1", self.fc1, hid, g)
        _linear(sym, f"{key}.fc2", self.fc2, out, hid)
        return sym.merge(g, out)


class GroupedBlock(nn.Module):
    """A grouped 3×3 conv (``groups=2``, as in ResNeXt) → BN → ReLU: by the tracer's convention its input
    and output channels are held fixed (a permutation would have to respect the two channel groups)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))

    def symmetry(self, sym: _Symmetry, key: str, g: str) -> str:
        out = sym.new(f"{key}.conv")
        sym.fix(g)
        sym.fix(out)
        _conv(sym, f"{key}.conv", self.conv, None, None)
        _norm(sym, f"{key}.bn", self.bn, out)
        return out


class DepthwiseNet(nn.Module):
    """A stem (3×3 conv → BN → ReLU), MobileNet / ConvNeXt-style blocks, global pooling, a linear head."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        c = cfg["width"]
        self.stem = nn.Conv2d(cfg["in_channels"], c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        blocks: list[nn.Module] = []
        for kind, k, c_out in zip(cfg["blocks"], cfg["kernels"], cfg["widths"], strict=True):
            if kind == "separable":
                blocks.append(SeparableBlock(c, c_out, k, residual=c_out == c and cfg["residual"]))
                c = c_out
            elif kind == "inverted":
                blocks.append(InvertedResidual(c, 2, k))
            elif kind == "convnext":
                blocks.append(ConvNeXtBlock(c, k))
            else:
                blocks.append(GroupedBlock(c))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, cfg["classes"])

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(_pool(h, self.cfg["pool"]))

    def expected_spec(self) -> PermutationSpec:
        sym = _Symmetry()
        g = sym.new("stem")
        _conv(sym, "stem", self.stem, g, None)
        _norm(sym, "bn", self.bn, g)
        for i, block in enumerate(self.blocks):
            g = block.symmetry(sym, f"blocks.{i}", g)
        _linear(sym, "head", self.head, None, g)
        return sym.spec(self)


@st.composite
def depthwise_nets(
    draw: st.DrawFn, blocks: Sequence[str] = BLOCK_KINDS, max_blocks: int = 3, batch: tuple[int, int] = (3, 4)
) -> NetCase:
    """A ``DepthwiseNet`` case: 1–``max_blocks`` blocks of ``blocks`` kinds, kernels 1 / 3, widths 2–6
    (4 or 6 throughout where a grouped conv reads them)."""
    n = draw(st.integers(1, max_blocks))
    kinds = draw(st.lists(st.sampled_from(list(blocks)), min_size=n, max_size=n))
    # a grouped conv (groups=2) needs an even width of ≥ 4: with 2 channels it would be depthwise
    c = width = 2 * draw(st.integers(2, 3)) if "grouped" in kinds else draw(st.integers(2, 6))
    widths = []
    for kind in kinds:  # a separable block may change the width, unless a grouped conv needs it even
        if kind == "separable" and "grouped" not in kinds and draw(st.booleans()):
            c = draw(st.integers(2, 6))
        widths.append(c)
    cfg = {
        "in_channels": draw(st.integers(1, 3)),
        "width": width,
        "blocks": kinds,
        "kernels": draw(st.lists(st.sampled_from([1, 3]), min_size=n, max_size=n)),
        "widths": widths,
        "residual": draw(st.booleans()),
        "pool": draw(st.sampled_from(list(POOLS))),
        "classes": draw(st.integers(2, 3)),
    }
    size = draw(st.integers(2, 4))
    seed, b = draw(_seeds), draw(st.integers(*batch))
    model = _build(DepthwiseNet, cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, cfg["in_channels"], size, size, generator=g, dtype=torch.float64)
    return NetCase(model, _state(model), x, "depthwise", cfg)


# ---------------------------------------------------------------------------------------------
# points
# ---------------------------------------------------------------------------------------------
_seeds = st.integers(0, 2**31 - 1)


def _moved(state: Params, g: torch.Generator) -> Params:
    """Every 1-D floating parameter + 0.2·N(0, 1) (norm weights ≠ 1, biases ≠ 0); BatchNorm
    ``running_mean`` ~ N(0, 0.5²), ``running_var`` = exp(N(0, 0.5²)), ``num_batches_tracked`` random."""
    out: Params = {}
    for k, v in state.items():
        if k.endswith("running_mean"):
            out[k] = 0.5 * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
        elif k.endswith("running_var"):
            out[k] = torch.exp(0.5 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 1000, v.shape, generator=g, dtype=v.dtype)
        elif v.is_floating_point() and v.ndim == 1:
            out[k] = v + 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def random_point(model: nn.Module, seed: int) -> Params:
    """A fresh point of ``model``'s architecture, a function of ``seed`` only: PyTorch's default
    initialisation (every submodule's ``reset_parameters``, or ``nn.MultiheadAttention``'s
    ``_reset_parameters``, on a copy under ``torch.random.fork_rng``, as
    ``reference.models.init_params`` does for the zoo), then 1-D parameters and BatchNorm buffers moved
    off their initial values (``_moved``). ``model`` and the global RNG are untouched."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for mod in fresh.modules():
            reset = getattr(mod, "reset_parameters", None)
            if isinstance(mod, nn.MultiheadAttention):
                reset = mod._reset_parameters  # its public reset is private; it resets out_proj too
            if callable(reset):
                reset()
    return _moved(_state(fresh), torch.Generator().manual_seed(seed))


def _build(cls: type[nn.Module], cfg: dict[str, Any], seed: int) -> nn.Module:
    """``cls(cfg)`` in float64 with its state at ``random_point(·, seed)``; the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg).double()
    model.load_state_dict(random_point(model, seed))
    return model


def _state(model: nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def inputs(case: NetCase, batch: int, seed: int) -> Tensor:
    """Another input batch for ``case``'s model: ``batch`` examples of the example input's kind (float64
    features / images, or token ids), a function of ``seed``."""
    if case.family == "transformer":
        return _tokens(case.config, batch, seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *case.x.shape[1:], generator=g, dtype=torch.float64)


def any_archs(families: Sequence[str] = ARCH_FAMILIES) -> st.SearchStrategy[NetCase]:
    """A case from any of ``families`` (``"transformer"``, ``"concat"``, ``"depthwise"``)."""
    table = {"transformer": transformers, "concat": concat_nets, "depthwise": depthwise_nets}
    unknown = sorted(set(families) - set(table))
    if unknown:
        raise ValueError(f"unknown architecture families {unknown}; known: {list(table)}")
    return st.one_of([table[f]() for f in families])


nets = any_archs
