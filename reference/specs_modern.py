"""Hand-written permutation specs of the modern zoo: ViT, CausalTransformer, MobileNet, DenseNet, UNet.

The same symmetry as ``reference/specs.py`` (Eq. (1) of Ainsworth et al. 2023: f(P(θ), x) = f(θ, x)),
with the three structures ``PermutationSpec`` gained for these architectures (``reference/permutation.py``):

- **Residual streams.** Everything added to one stream, and every norm on it, shares one group: the
  transformers' ``P_stream`` (patch / token / position embeddings, every block's output projections,
  LayerNorm / RMSNorm weights; LayerNorm and RMSNorm over the stream commute with any permutation of
  it), MobileNet's ``P_stem`` / ``P_stage{s}`` (the stem or a stage's first projection, and every
  residual block's projection after it). Parameters read directly in ``forward`` and added along the
  stream (ViT's ``cls_token``, ``pos_embed``) are ``(None, None, P_stream)``; ``nn.Embedding``
  weights ``(None, P_stream)``.
- **Attention heads** (Verma & Elbayad 2024; Imfeld et al. 2024). Per attention layer of block ``i``:
  the Q and K projections' output rows share ``P_block{i}.qk`` (scores ``q·k`` sum over a head's
  channels: any permutation within a head applied to both keeps them), the V projection's rows and
  the output projection's columns share ``P_block{i}.vo``. Both carry ``blocks = head_dim`` (units
  move within a head, heads only as wholes) and the head class ``H_block{i}``: Q/K and V/O must move
  heads the same way (head h's scores weigh head h's values); with one head there is no coupling, with
  heads of one unit Q/K and V/O are one group ``P_block{i}.heads``. GPT's fused ``c_attn`` has rows
  ``[q; k; v]``: the segments ``((qk, D), (qk, D), (vo, D))``. The MLP's hidden units are ``P_block{i}.mlp``.
- **Concatenations** (``torch.cat`` along channels) are segments: a DenseNet layer's norm and conv
  read ``((P_stem, c0), (P_dense{b}.0, growth), ..., (P_dense{b}.{l-1}, growth))`` after block ``b``'s
  first ``l`` layers (or ``P_trans{b-1}`` in place of ``P_stem`` after a transition); a U-Net decoder's
  first conv reads ``((P_up{i}, c_i), (P_enc{i}.b, c_i))`` (``torch.cat([up, skip], 1)``).

Depthwise convs keep their input's group (weight ``(G, None, None, None)``: each filter reads only its
own channel); ``ConvTranspose2d`` weights are ``[in, out, k, k]`` → ``(G_in, G_out, None, None)``.
GroupNorm with ``g`` groups over ``C`` channels adds ``blocks[G] = C / g``. The networks' inputs, the
token / patch axes and the logits are never permuted.

Group names: ViT / CausalTransformer ``P_stream``, ``P_block{i}.qk``, ``P_block{i}.vo`` (or
``P_block{i}.heads``), ``P_block{i}.mlp``, head classes ``H_block{i}``; MobileNet ``P_stem``,
``P_stage{s}`` (a stream opened by a stage's first, non-residual block), ``P_block{b}.expand`` (the
hidden channels of block ``b``, through its depthwise conv); DenseNet ``P_stem``, ``P_dense{b}.{l}``,
``P_trans{b}``; UNet ``P_enc{i}.a`` / ``.b`` (the two convs of encoder level ``i``), ``P_mid.a`` /
``.b``, ``P_up{i}``, ``P_dec{i}.a`` / ``.b``.

``MODERN_SPECS`` maps each class to its spec function; ``reference.specs.spec_for`` looks them up
(this module does not import ``reference.specs``, which imports it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .convnets import DenseNet, MobileNet, UNet
from .permutation import PermutationSpec
from .transformers import CausalTransformer, ViT

__all__ = ["MODERN_SPECS", "norm_axes"]

Axes = dict[str, tuple[Any, ...]]
Entry = Any  # a group name, None, or segments ((group | None, length), ...)


def _linear(prefix: str, out: Entry, inp: Entry, bias: bool = True) -> Axes:
    """A Linear layer ``[out, in]`` at ``prefix``."""
    axes: Axes = {f"{prefix}.weight": (out, inp)}
    if bias:
        axes[f"{prefix}.bias"] = (out,)
    return axes


def _conv(prefix: str, out: Entry, inp: Entry, bias: bool) -> Axes:
    """A 2-D conv ``[out, in, k, k]`` at ``prefix`` (a depthwise conv: ``inp=None``, its one input
    channel per filter)."""
    axes: Axes = {f"{prefix}.weight": (out, inp, None, None)}
    if bias:
        axes[f"{prefix}.bias"] = (out,)
    return axes


def norm_axes(prefix: str, kind: str | None, entry: Entry) -> Axes:
    """The keys of a norm layer at ``prefix`` acting on ``entry``: ``"batch"`` (with running statistics),
    ``"group"`` / ``"layer"`` (weight, bias), ``"rms"`` (weight only), ``None`` (no keys)."""
    if kind is None:
        return {}
    if kind == "batch":
        return {
            f"{prefix}.weight": (entry,),
            f"{prefix}.bias": (entry,),
            f"{prefix}.running_mean": (entry,),
            f"{prefix}.running_var": (entry,),
            f"{prefix}.num_batches_tracked": (),
        }
    if kind in ("group", "layer"):
        return {f"{prefix}.weight": (entry,), f"{prefix}.bias": (entry,)}
    if kind == "rms":
        return {f"{prefix}.weight": (entry,)}
    raise ValueError(f"unknown norm {kind!r} at {prefix!r}")


def _group_blocks(widths: dict[str, int], norm: str | None, groups: int) -> dict[str, int]:
    """``blocks[G] = C / groups`` (when > 1) for every group normalised by a GroupNorm."""
    if norm != "group":
        return {}
    return {g: c // groups for g, c in widths.items() if c // groups > 1}


def _spec(
    model: nn.Module, axes: Axes, blocks: dict[str, int] | None = None, heads: dict[str, str] | None = None
) -> PermutationSpec:
    return PermutationSpec.from_params(axes, model.state_dict(), blocks or {}, heads or {})


# ============================================================================================
# transformers
# ============================================================================================
def _attention_groups(
    i: int, num_heads: int, head_dim: int, blocks: dict[str, int], heads: dict[str, str]
) -> tuple[str, str]:
    """The Q/K and V/O groups of block ``i``'s attention, registered with their head blocks and class.

    Two degenerate cases are written the way ``trace_spec`` writes them: one head (``head_dim = dim``)
    constrains nothing, so Q/K and V/O are two free groups without blocks or class; heads of one unit
    (``head_dim = 1``) leave no within-head freedom, so Q/K and V/O must be the same permutation: one
    group ``P_block{i}.heads``.
    """
    if head_dim == 1:
        g = f"P_block{i}.heads"
        return g, g
    qk, vo = f"P_block{i}.qk", f"P_block{i}.vo"
    if num_heads > 1:
        for g in (qk, vo):
            blocks[g] = head_dim
            heads[g] = f"H_block{i}"
    return qk, vo


def _vit_spec(model: ViT) -> PermutationSpec:
    """ViT: one stream group, per block a Q/K, a V/O (head-coupled) and an MLP group."""
    cfg = model.config
    S = "P_stream"
    axes: Axes = _linear("patch_embed", S, None)
    axes |= {"cls_token": (None, None, S), "pos_embed": (None, None, S)}
    blocks: dict[str, int] = {}
    heads: dict[str, str] = {}
    for p, qk, vo, mlp in _transformer_blocks(cfg, blocks, heads):
        axes |= norm_axes(f"{p}.norm1", "layer", S)
        axes |= _linear(f"{p}.attn.q", qk, S) | _linear(f"{p}.attn.k", qk, S)
        axes |= _linear(f"{p}.attn.v", vo, S) | _linear(f"{p}.attn.out", S, vo)
        axes |= norm_axes(f"{p}.norm2", "layer", S)
        axes |= _linear(f"{p}.mlp.fc1", mlp, S) | _linear(f"{p}.mlp.fc2", S, mlp)
    if cfg["norm_first"]:
        axes |= norm_axes("norm", "layer", S)
    axes |= _linear("head", None, S)
    return _spec(model, axes, blocks, heads)


def _causal_transformer_spec(model: CausalTransformer) -> PermutationSpec:
    """GPT: embeddings and ``lm_head`` on the stream; fused ``c_attn`` rows ``[q; k; v]`` as segments."""
    cfg = model.config
    S, D, norm = "P_stream", cfg["dim"], cfg["norm"]
    axes: Axes = {"wte.weight": (None, S), "wpe.weight": (None, S)}
    blocks: dict[str, int] = {}
    heads: dict[str, str] = {}
    for p, qk, vo, mlp in _transformer_blocks(cfg, blocks, heads):
        qkv = ((qk, D), (qk, D), (vo, D))
        axes |= norm_axes(f"{p}.ln1", norm, S)
        axes |= _linear(f"{p}.attn.c_attn", qkv, S) | _linear(f"{p}.attn.c_proj", S, vo)
        axes |= norm_axes(f"{p}.ln2", norm, S)
        axes |= _linear(f"{p}.mlp.c_fc", mlp, S) | _linear(f"{p}.mlp.c_proj", S, mlp)
    axes |= norm_axes("ln_f", norm, S)
    if not cfg["tie_weights"]:
        axes |= _linear("lm_head", None, S, bias=False)
    return _spec(model, axes, blocks, heads)


def _transformer_blocks(cfg: dict, blocks: dict[str, int], heads: dict[str, str]):
    """Per block: ``(prefix, qk, vo, mlp)``, the block's attention groups registered in ``blocks`` / ``heads``."""
    d = cfg["dim"] // cfg["heads"]
    for i in range(cfg["depth"]):
        qk, vo = _attention_groups(i, cfg["heads"], d, blocks, heads)
        yield f"blocks.{i}", qk, vo, f"P_block{i}.mlp"


# ============================================================================================
# convolutional networks
# ============================================================================================
def _mobilenet_spec(model: MobileNet) -> PermutationSpec:
    """MobileNet: residual streams, one hidden group per expanding block (its depthwise conv keeps it)."""
    cfg = model.config
    norm, e = cfg["norm"], cfg["expansion"]
    bias = norm is None
    stream = "P_stem"
    axes: Axes = _conv("stem", stream, None, bias) | norm_axes("stem_norm", norm, stream)
    widths = {stream: cfg["widths"][0]}
    c_in, b = cfg["widths"][0], 0
    for s, (c, stride, r) in enumerate(zip(cfg["widths"], cfg["strides"], cfg["repeats"], strict=True)):
        for j in range(r):
            p = f"blocks.{b}"
            hidden = stream
            if e > 1:
                hidden = f"P_block{b}.expand"
                widths[hidden] = c_in * e
                axes |= _conv(f"{p}.expand", hidden, stream, bias) | norm_axes(f"{p}.norm1", norm, hidden)
            axes |= _conv(f"{p}.dw", hidden, None, bias) | norm_axes(f"{p}.norm2", norm, hidden)
            residual = (stride if j == 0 else 1) == 1 and c_in == c
            if not residual:
                stream = f"P_stage{s}"
                widths[stream] = c
            axes |= _conv(f"{p}.project", stream, hidden, bias) | norm_axes(f"{p}.norm3", norm, stream)
            c_in, b = c, b + 1
    axes |= _linear("head", None, stream)
    return _spec(model, axes, _group_blocks(widths, norm, cfg["groups"]))


def _densenet_spec(model: DenseNet) -> PermutationSpec:
    """DenseNet: the concatenated features are segments, one per layer that wrote them."""
    cfg = model.config
    norm, growth = cfg["norm"], cfg["growth"]
    axes: Axes = _conv("stem", "P_stem", None, False)
    segs: list[tuple[str, int]] = [("P_stem", cfg["init_channels"])]
    for b, n in enumerate(cfg["block_layers"]):
        for l in range(n):
            p, g = f"blocks.{b}.{l}", f"P_dense{b}.{l}"
            axes |= norm_axes(f"{p}.norm", norm, tuple(segs)) | _conv(f"{p}.conv", g, tuple(segs), False)
            segs.append((g, growth))
        if b < len(cfg["block_layers"]) - 1:
            p, g = f"transitions.{b}", f"P_trans{b}"
            axes |= norm_axes(f"{p}.norm", norm, tuple(segs)) | _conv(f"{p}.conv", g, tuple(segs), False)
            segs = [(g, sum(c for _, c in segs) // 2)]
    axes |= norm_axes("norm", norm, tuple(segs)) | _linear("head", None, tuple(segs))
    return _spec(model, axes)


def _double_conv(prefix: str, group: str, inp: Entry, norm: str | None) -> Axes:
    bias = norm is None
    a, b = f"{group}.a", f"{group}.b"
    axes = _conv(f"{prefix}.conv1", a, inp, bias) | norm_axes(f"{prefix}.norm1", norm, a)
    return axes | _conv(f"{prefix}.conv2", b, a, bias) | norm_axes(f"{prefix}.norm2", norm, b)


def _unet_spec(model: UNet) -> PermutationSpec:
    """U-Net: two groups per double conv, one per up-convolution; decoder convs read ``[up; skip]``."""
    cfg = model.config
    norm, levels = cfg["norm"], cfg["levels"]
    c = [cfg["base"] * 2**i for i in range(levels)]
    axes: Axes = {}
    widths: dict[str, int] = {}
    prev: str | None = None
    for i in range(levels):
        axes |= _double_conv(f"enc.{i}", f"P_enc{i}", prev, norm)
        widths |= {f"P_enc{i}.a": c[i], f"P_enc{i}.b": c[i]}
        prev = f"P_enc{i}.b"
    axes |= _double_conv("mid", "P_mid", prev, norm)
    widths |= {"P_mid.a": 2 * c[-1], "P_mid.b": 2 * c[-1]}
    prev = "P_mid.b"
    for i in reversed(range(levels)):
        up = f"P_up{i}"
        axes |= {f"up.{i}.weight": (prev, up, None, None), f"up.{i}.bias": (up,)}
        axes |= _double_conv(f"dec.{i}", f"P_dec{i}", ((up, c[i]), (f"P_enc{i}.b", c[i])), norm)
        widths |= {f"P_dec{i}.a": c[i], f"P_dec{i}.b": c[i]}
        prev = f"P_dec{i}.b"
    axes |= _conv("out", None, prev, True)
    return _spec(model, axes, _group_blocks(widths, norm, cfg["groups"]))


MODERN_SPECS: dict[type, Callable[[Any], PermutationSpec]] = {
    ViT: _vit_spec,
    CausalTransformer: _causal_transformer_spec,
    MobileNet: _mobilenet_spec,
    DenseNet: _densenet_spec,
    UNet: _unet_spec,
}
"""Zoo class → its hand-written spec (merged into ``reference.specs.spec_for``'s registry)."""
