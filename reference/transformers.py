"""Small transformers for the zoo: a Vision Transformer and a GPT-style causal language model.

- ``ViT``: the Vision Transformer of Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words"), small
  enough for 8×8 digits (``[B, 64]`` or ``[B, 1, 8, 8]``) and for MNIST-1D read as a sequence of
  patches (``dims=1``, ``[B, 40]``): a Linear patch embedding of non-overlapping patches (cut with
  ``reshape`` / ``permute``, no ``unfold``), a class token, a learned position embedding, ``depth``
  encoder blocks (pre-norm as in ViT, or post-norm as in Vaswani et al. 2017), and a Linear head on
  the class token. Attention is written by hand with separate ``q``, ``k``, ``v`` and ``out``
  projections (Eq. (1) of Vaswani et al. 2017: softmax(QKᵀ/√d) V).
- ``CausalTransformer``: the GPT-2 layout (Radford et al. 2019; the module names of Karpathy's
  nanoGPT): token and position ``nn.Embedding``, pre-norm blocks (LayerNorm, or RMSNorm of Zhang &
  Sennrich 2019) with one fused ``c_attn`` projection split into Q, K, V and
  ``F.scaled_dot_product_attention(..., is_causal=True)``, a final norm and a bias-free ``lm_head``
  (optionally tied to the token embedding, Press & Wolf 2017).
- ``make_sequence_task``: a locally generated next-token task that needs attention (each target is the
  token seen ``lag`` steps earlier).

Every model stores its keyword arguments in ``self.config`` (JSON-friendly, with a ``"name"``) so that
``reference.models.build_model(config)`` rebuilds it. The permutation symmetries (one group for the
residual stream, per attention layer one Q/K group and one V/output group moving heads together, one
group per MLP) are written out in ``reference/specs_modern.py``.

Both forwards are ``torch.fx``-traceable (no data-dependent control flow), so ``reference.trace``
can derive their specs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import validate

__all__ = [
    "ACTIVATIONS",
    "TRANSFORMER_NORMS",
    "CausalSelfAttention",
    "CausalTransformer",
    "FeedForward",
    "GPTBlock",
    "GPTMLP",
    "SelfAttention",
    "ViT",
    "ViTBlock",
    "make_sequence_task",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}
TRANSFORMER_NORMS: tuple[str, ...] = ("layer", "rms")


def _check_heads(dim: int, heads: int) -> tuple[int, int]:
    dim, heads = validate.integer("dim", dim), validate.integer("heads", heads)
    if dim % heads:
        raise ValueError(f"heads={heads} does not divide dim={dim} (each head has dim / heads channels)")
    return dim, heads


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))`` on the last axis: ``dim → hidden → dim``. Keys ``fc1.*``, ``fc2.*``."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        activation = validate.choice("activation", activation, tuple(ACTIVATIONS))
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: separate ``q``, ``k``, ``v``, ``out`` Linear layers.

    For ``x`` of shape ``[B, T, dim]``: each projection is split into ``heads`` heads of ``dim / heads``
    channels, ``softmax(q kᵀ / √d) v`` is taken per head (Vaswani et al. 2017, Eq. (1)), the heads are
    concatenated back and projected by ``out``. Returns ``[B, T, dim]``.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        dim, heads = _check_heads(dim, heads)
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T = x.shape[0], x.shape[1]
        H, d = self.heads, self.head_dim
        q = self.q(x).view(B, T, H, d).transpose(1, 2)
        k = self.k(x).view(B, T, H, d).transpose(1, 2)
        v = self.v(x).view(B, T, H, d).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = att.softmax(-1)
        y = att @ v
        y = y.transpose(1, 2).reshape(B, T, H * d)
        return self.out(y)


# --------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------
class ViTBlock(nn.Module):
    """One encoder block: attention and MLP sublayers with residual additions.

    Pre-norm (``norm_first=True``, ViT): ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.
    Post-norm (``False``, Vaswani et al. 2017): ``norm1(x + attn(x))`` then ``norm2(x + mlp(x))``.
    """

    def __init__(self, dim: int, heads: int, hidden: int, norm_first: bool, activation: str):
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden, activation)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class ViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021) for images (``dims=2``) or sequences (``dims=1``).

    ``dims=2``: inputs ``[B, channels·S·S]`` or ``[B, channels, S, S]`` with ``S = image_size``, cut into
    ``(S / patch)²`` patches of ``channels·patch²`` values. ``dims=1``: inputs ``[B, channels·L]`` or
    ``[B, channels, L]`` with ``L = image_size`` (MNIST-1D: ``image_size=40``), cut into ``L / patch``
    patches of ``channels·patch`` values. Patches are cut with ``reshape`` / ``permute`` only (the
    positional axes are split and merged; channels are never mixed with positions).

    ``patch_embed`` (Linear ``patch_dim → dim``) embeds each patch; a class token ``cls_token``
    (``[1, 1, dim]``) is prepended along the token axis; ``pos_embed`` (``[1, T + 1, dim]``) is added;
    ``depth`` ``ViTBlock``s follow (keys ``blocks.{i}.*``); pre-norm models end with ``norm``
    (LayerNorm; post-norm blocks already end with one, so there is none); ``head`` (Linear
    ``dim → num_classes``) reads the class token. Returns logits ``[B, num_classes]``.

    Raises ``ValueError`` / ``TypeError`` (``validate.ArgumentTypeError``) for a bad argument: ``patch``
    must divide ``image_size`` and ``heads`` must divide ``dim``.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch: int = 2,
        channels: int = 1,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        num_classes: int = 10,
        norm_first: bool = True,
        activation: str = "gelu",
        dims: int = 2,
    ):
        super().__init__()
        image_size, patch, channels = validate.counts(image_size=image_size, patch=patch, channels=channels)
        dim, heads = _check_heads(dim, heads)
        depth, mlp_ratio, num_classes = validate.counts(depth=depth, mlp_ratio=mlp_ratio, num_classes=num_classes)
        norm_first = validate.flag("norm_first", norm_first)
        activation = validate.choice("activation", activation, tuple(ACTIVATIONS))
        dims = validate.integer("dims", dims, minimum=1, maximum=2)
        if image_size % patch:
            raise ValueError(f"patch={patch} does not divide image_size={image_size}")
        self.config: dict[str, Any] = {"name": "vit", "image_size": image_size, "patch": patch, "channels": channels,
                                       "dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio,
                                       "num_classes": num_classes, "norm_first": norm_first, "activation": activation,
                                       "dims": dims}
        self.image_size, self.patch, self.channels, self.dims = image_size, patch, channels, dims
        self.grid = image_size // patch
        self.num_tokens = self.grid**dims
        patch_dim = channels * patch**dims
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_tokens + 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, dim * mlp_ratio, norm_first, activation) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if norm_first else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the class token and position embedding (normal, std 0.02, as in ViT); the layers
        re-initialise themselves (``reference.models.init_params`` calls every ``reset_parameters``)."""
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def patches(self, x: Tensor) -> Tensor:
        """``[B, T, patch_dim]``: the non-overlapping patches of ``x``, row-major over the patch grid,
        each flattened channel-major (``c, i, j``)."""
        B, C, n, p = x.shape[0], self.channels, self.grid, self.patch
        if self.dims == 1:
            x = x.reshape(B, C, n, p).permute(0, 2, 1, 3)
            return x.reshape(B, n, C * p)
        x = x.reshape(B, C, n, p, n, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, n * n, C * p * p)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        x = self.patch_embed(self.patches(x))
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0])


# --------------------------------------------------------------------------------------------
# GPT-style causal transformer
# --------------------------------------------------------------------------------------------
def _make_norm(norm: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if norm == "layer" else nn.RMSNorm(dim)


@torch.fx.wrap
def _check_tokens(idx: Tensor, block_size: int) -> Tensor:
    """``idx`` if it is an integer ``[B, T]`` tensor with ``T <= block_size`` (a leaf of fx traces)."""
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32):
        what = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
        raise validate.ArgumentTypeError(f"token ids must be an int64 / int32 tensor, got {what}")
    if idx.ndim != 2:
        raise ValueError(f"token ids must have shape [B, T], got {tuple(idx.shape)}")
    if idx.shape[1] > block_size:
        raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size={block_size}")
    return idx


class CausalSelfAttention(nn.Module):
    """GPT-2 attention: one fused ``c_attn`` (``dim → 3·dim``, rows ``[q; k; v]``) split into Q, K, V,
    ``heads`` heads, causal ``F.scaled_dot_product_attention``, output projection ``c_proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        dim, heads = _check_heads(dim, heads)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T = x.shape[0], x.shape[1]
        H, d = self.heads, self.head_dim
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        q = q.view(B, T, H, d).transpose(1, 2)
        k = k.view(B, T, H, d).transpose(1, 2)
        v = v.view(B, T, H, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, H * d)
        return self.c_proj(y)


class GPTMLP(nn.Module):
    """GPT-2's MLP: ``c_proj(gelu(c_fc(x)))``, ``dim → hidden → dim``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    """Pre-norm GPT block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int, norm: str):
        super().__init__()
        self.ln1 = _make_norm(norm, dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = _make_norm(norm, dim)
        self.mlp = GPTMLP(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """A GPT-style decoder-only language model (GPT-2 layout, nanoGPT's module names).

    Input ``[B, T]`` integer token ids in ``[0, vocab)`` with ``T <= block_size``; output logits
    ``[B, T, vocab]`` (position ``t`` sees tokens ``0..t`` only). ``wte`` / ``wpe``: token and position
    ``nn.Embedding`` (positions ``torch.arange(T)``); ``blocks.{i}``: ``GPTBlock``s (``ln1``,
    ``attn.c_attn``, ``attn.c_proj``, ``ln2``, ``mlp.c_fc``, ``mlp.c_proj``); ``ln_f``: final norm;
    ``lm_head``: Linear ``dim → vocab`` without bias. ``norm``: ``"layer"`` (``nn.LayerNorm``) or
    ``"rms"`` (``nn.RMSNorm``, weight only). ``tie_weights=True`` has no ``lm_head``: the logits are
    ``F.linear(x, wte.weight)`` (Press & Wolf 2017), so the state_dict holds the shared matrix once
    (``torch.func.functional_call`` refuses two values for one tied tensor).

    Raises ``ValueError`` / ``TypeError`` for a bad argument (``heads`` must divide ``dim``), and in
    ``forward`` for token ids that are not an integer ``[B, T]`` tensor or are longer than ``block_size``.
    """

    def __init__(
        self,
        vocab: int = 16,
        block_size: int = 16,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        norm: str = "layer",
        tie_weights: bool = False,
    ):
        super().__init__()
        vocab, block_size = validate.counts(vocab=vocab, block_size=block_size)
        dim, heads = _check_heads(dim, heads)
        depth, mlp_ratio = validate.counts(depth=depth, mlp_ratio=mlp_ratio)
        norm = validate.choice("norm", norm, TRANSFORMER_NORMS)
        tie_weights = validate.flag("tie_weights", tie_weights)
        self.config: dict[str, Any] = {"name": "causal_transformer", "vocab": vocab, "block_size": block_size,
                                       "dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio, "norm": norm,
                                       "tie_weights": tie_weights}
        self.block_size, self.tie_weights = block_size, tie_weights
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, dim * mlp_ratio, norm) for _ in range(depth))
        self.ln_f = _make_norm(norm, dim)
        self.lm_head = None if tie_weights else nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        idx = _check_tokens(idx, self.block_size)
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.lm_head is None:
            return F.linear(x, self.wte.weight)
        return self.lm_head(x)


def make_sequence_task(
    n: int, block_size: int = 16, vocab: int = 16, seed: int = 0, lag: int = 3
) -> tuple[Tensor, Tensor]:
    """A next-token task that needs attention: ``(x, y)``, both int64 ``[n, block_size]``.

    ``x`` holds uniform random tokens in ``[0, vocab)``; the target at position ``t`` is the token seen
    ``lag`` steps earlier, ``y[:, t] = x[:, t - lag]`` for ``t >= lag``, and the current token
    ``y[:, t] = x[:, t]`` before that. Every target is a function of the tokens a causal model sees at
    ``t`` (so a perfect model has zero loss), and for ``t >= lag`` it is found only by attending ``lag``
    positions back (an MLP on the current token is at chance, ``1 / vocab``). Drawn from a CPU generator
    seeded with ``seed``: the same data on every machine.

    Raises ``ValueError`` / ``TypeError`` unless ``n, vocab >= 1``, ``block_size >= 2`` and
    ``1 <= lag < block_size``.
    """
    n = validate.integer("n", n)
    block_size = validate.integer("block_size", block_size, minimum=2)
    vocab = validate.integer("vocab", vocab)
    seed = validate.integer("seed", seed, minimum=None)
    lag = validate.integer("lag", lag, maximum=block_size - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, block_size), generator=g)
    y = x.clone()
    y[:, lag:] = x[:, :-lag]
    return x, y
