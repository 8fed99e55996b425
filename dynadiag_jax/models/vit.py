"""Vision Transformer (Dosovitskiy et al. 2021), pre-LN, as google-research/vision_transformer."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.layers import factory_for
from dynadiag_jax.mlp_block import sparse_mlp
from dynadiag_jax.models.attention import SelfAttention, fused_xavier_uniform

# variant -> (width, depth, num_heads); mlp_dim = 4 * width.
VARIANTS: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12),
    "L": (1024, 24, 16), "H": (1280, 32, 16),
}


class EncoderBlock(nn.Module):
  """x + attn(LN(x)); x + mlp(LN(x)), with linears 'qkv', 'attn_out', 'mlp_in', 'mlp_out'."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  split_qkv: bool = False
  dtype: Any = None
  linear: LayerFactory = LayerFactory()

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, train: bool = False) -> jax.Array:
    d = x_BxTxD.shape[-1]
    xavier = nn.initializers.xavier_uniform()
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_1")(x_BxTxD)
    y = SelfAttention(self.num_heads, self.linear, dropout=self.attn_dropout,
                      qkv_init=fused_xavier_uniform(1 if self.split_qkv else 3),
                      out_init=xavier, split_qkv=self.split_qkv, dtype=self.dtype,
                      name="attn")(y, train)
    x_BxTxD = x_BxTxD + drop(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_2")(x_BxTxD)
    fc_in = self.linear("mlp_in", self.mlp_dim, kernel_init=xavier)
    fc_out = self.linear("mlp_out", d, kernel_init=xavier)
    between = drop if train and self.dropout > 0 else None  # else the identity
    y = drop(sparse_mlp(fc_in, fc_out, y, nn.gelu, between, fuse=self.linear.fuse_mlp))
    return x_BxTxD + y


class ViT(nn.Module):
  """Images (B, H, W, C) -> logits (B, num_classes). width/depth/num_heads/mlp_dim override the variant."""
  variant: str = "B"
  patch_size: int = 16
  num_classes: int = 1000
  pool: str = "tok"  # 'tok': class token (gets a position embedding); 'gap': mean of patches
  dropout: float = 0.0
  attn_dropout: float = 0.0
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  mlp_dim: int | None = None
  split_qkv: bool = False  # separate 'q', 'k', 'v' linears instead of the fused 'qkv'
  dtype: Any = None
  linear: LayerFactory = LayerFactory()

  def dims(self) -> tuple[int, int, int, int]:
    """(width, depth, num_heads, mlp_dim) after overrides."""
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown ViT variant {self.variant!r}; one of {sorted(VARIANTS)}")
    w, l, h = VARIANTS[self.variant]
    w = self.width or w
    return w, self.depth or l, self.num_heads or h, self.mlp_dim or 4 * w

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    if self.pool not in ("tok", "gap"):
      raise ValueError(f"pool must be 'tok' or 'gap', got {self.pool!r}")
    d, depth, heads, mlp_dim = self.dims()
    lin = factory_for(self.linear, self.dtype)
    p = self.patch_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="embed")(x_BxHxWxC)
    b, gh, gw, _ = x.shape
    x_BxTxD = x.reshape(b, gh * gw, d)
    if self.pool == "tok":
      cls_11D = self.param("cls", nn.initializers.zeros_init(), (1, 1, d))
      cls_B1D = jnp.broadcast_to(cls_11D.astype(x_BxTxD.dtype), (b, 1, d))
      x_BxTxD = jnp.concatenate([cls_B1D, x_BxTxD], axis=1)
    pos_1xTxD = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x_BxTxD.shape[1:])
    x_BxTxD = x_BxTxD + pos_1xTxD.astype(x_BxTxD.dtype)
    x_BxTxD = nn.Dropout(self.dropout)(x_BxTxD, deterministic=not train)
    for i in range(depth):
      x_BxTxD = EncoderBlock(heads, mlp_dim, self.dropout, self.attn_dropout,
                             split_qkv=self.split_qkv, dtype=self.dtype, linear=lin,
                             name=f"block_{i}")(x_BxTxD, train)
    x_BxTxD = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x_BxTxD)
    x_BxD = x_BxTxD[:, 0] if self.pool == "tok" else x_BxTxD.mean(axis=1)
    head = lin("head", self.num_classes, kernel_init=nn.initializers.zeros_init())
    return head(x_BxD).astype(jnp.float32)
