"""MLP-Mixer (Tolstikhin et al. 2021), as google-research/vision_transformer models_mixer."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.layers import factory_for
from dynadiag_jax.mlp_block import sparse_mlp

# variant -> (hidden, depth, token_mlp_dim, channel_mlp_dim).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "S": (512, 8, 256, 2048), "B": (768, 12, 384, 3072), "L": (1024, 24, 512, 4096),
}


class MixerBlock(nn.Module):
  """Token mixing ('token_mlp_in', 'token_mlp_out'), then channel mixing ('channel_mlp_*')."""
  token_mlp_dim: int
  channel_mlp_dim: int
  dropout: float = 0.0
  dtype: Any = None
  linear: LayerFactory = LayerFactory()

  @nn.compact
  def __call__(self, x_BxSxC: jax.Array, train: bool = False) -> jax.Array:
    s, c = x_BxSxC.shape[1:]
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    between = drop if train and self.dropout > 0 else None  # else the identity
    mlp = lambda a, b, y: sparse_mlp(a, b, y, nn.gelu, between, fuse=self.linear.fuse_mlp)
    y_BxCxS = jnp.swapaxes(nn.LayerNorm(dtype=self.dtype, name="ln_1")(x_BxSxC), 1, 2)
    y_BxCxS = mlp(self.linear("token_mlp_in", self.token_mlp_dim), self.linear("token_mlp_out", s),
                  y_BxCxS)
    x_BxSxC = x_BxSxC + drop(jnp.swapaxes(y_BxCxS, 1, 2))
    y_BxSxC = nn.LayerNorm(dtype=self.dtype, name="ln_2")(x_BxSxC)
    y_BxSxC = mlp(self.linear("channel_mlp_in", self.channel_mlp_dim),
                  self.linear("channel_mlp_out", c), y_BxSxC)
    return x_BxSxC + drop(y_BxSxC)


class Mixer(nn.Module):
  """Images (B, H, W, C) -> logits (B, num_classes). hidden/depth/*_mlp_dim override the variant."""
  variant: str = "S"
  patch_size: int = 16
  num_classes: int = 1000
  dropout: float = 0.0
  hidden: int | None = None
  depth: int | None = None
  token_mlp_dim: int | None = None
  channel_mlp_dim: int | None = None
  dtype: Any = None
  linear: LayerFactory = LayerFactory()

  def dims(self) -> tuple[int, int, int, int]:
    """(hidden, depth, token_mlp_dim, channel_mlp_dim) after overrides."""
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown Mixer variant {self.variant!r}; one of {sorted(VARIANTS)}")
    c, l, t, m = VARIANTS[self.variant]
    return self.hidden or c, self.depth or l, self.token_mlp_dim or t, self.channel_mlp_dim or m

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    c, depth, t, m = self.dims()
    lin = factory_for(self.linear, self.dtype)
    p = self.patch_size
    x = nn.Conv(c, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="stem")(x_BxHxWxC)
    x_BxSxC = x.reshape(x.shape[0], -1, c)
    for i in range(depth):
      x_BxSxC = MixerBlock(t, m, self.dropout, self.dtype, lin, name=f"block_{i}")(x_BxSxC, train)
    x_BxC = nn.LayerNorm(dtype=self.dtype, name="pre_head_norm")(x_BxSxC).mean(axis=1)
    head = lin("head", self.num_classes, kernel_init=nn.initializers.zeros_init())
    return head(x_BxC).astype(jnp.float32)
