"""GPT-2 (Radford et al. 2019) decoder, init as in HF transformers / nanoGPT, tied LM head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.layers import factory_for
from dynadiag_jax.mlp_block import sparse_mlp
from dynadiag_jax.models.attention import SelfAttention

# size -> (num_layers, width, num_heads, context).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (4, 128, 4, 128), "small": (12, 768, 12, 1024), "medium": (24, 1024, 16, 1024),
    "large": (36, 1280, 20, 1024), "xl": (48, 1600, 25, 1024),
}
LN_EPS = 1e-5
INIT_STD = 0.02


class Block(nn.Module):
  """x + attn(LN(x)) (causal, 'qkv'/'attn_out'); x + mlp(LN(x)) ('mlp_in', GELU, 'mlp_out')."""
  num_heads: int
  num_layers: int  # scales the init of the residual projections by 1/sqrt(2 L)
  dropout: float = 0.0
  dtype: Any = None
  linear: LayerFactory = LayerFactory()
  split_qkv: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, train: bool = False) -> jax.Array:
    d = x_BxTxD.shape[-1]
    init = nn.initializers.normal(INIT_STD)
    proj_init = nn.initializers.normal(INIT_STD / np.sqrt(2 * self.num_layers))
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_1")(x_BxTxD)
    y = SelfAttention(self.num_heads, self.linear, causal=True, dropout=self.dropout,
                      qkv_init=init, out_init=proj_init, split_qkv=self.split_qkv,
                      dtype=self.dtype, name="attn")(y, train)
    x_BxTxD = x_BxTxD + drop(y)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_2")(x_BxTxD)
    fc_in = self.linear("mlp_in", 4 * d, kernel_init=init)
    fc_out = self.linear("mlp_out", d, kernel_init=proj_init)
    return x_BxTxD + drop(sparse_mlp(fc_in, fc_out, y, nn.gelu, fuse=self.linear.fuse_mlp))


class GPT2(nn.Module):
  """Tokens (B, T) int -> logits (B, T, vocab_size). num_layers/width/num_heads/context override the size."""
  size: str = "small"
  vocab_size: int = 50257
  dropout: float = 0.0
  num_layers: int | None = None
  width: int | None = None
  num_heads: int | None = None
  context: int | None = None
  split_qkv: bool = False  # separate 'q', 'k', 'v' linears instead of the fused 'qkv'
  dtype: Any = None
  linear: LayerFactory = LayerFactory()

  def dims(self) -> tuple[int, int, int, int]:
    """(num_layers, width, num_heads, context) after overrides."""
    if self.size not in SIZES:
      raise ValueError(f"unknown GPT-2 size {self.size!r}; one of {sorted(SIZES)}")
    l, d, h, t = SIZES[self.size]
    return self.num_layers or l, self.width or d, self.num_heads or h, self.context or t

  @nn.compact
  def __call__(self, x_BxT: jax.Array, train: bool = False) -> jax.Array:
    num_layers, d, heads, context = self.dims()
    t = x_BxT.shape[1]
    if t > context:
      raise ValueError(f"sequence length {t} exceeds the context {context}")
    lin = factory_for(self.linear, self.dtype)
    init = nn.initializers.normal(INIT_STD)
    wte = nn.Embed(self.vocab_size, d, dtype=self.dtype, embedding_init=init, name="wte")
    wpe = nn.Embed(context, d, dtype=self.dtype, embedding_init=init, name="wpe")
    x_BxTxD = wte(x_BxT) + wpe(jnp.arange(t))[None]
    x_BxTxD = nn.Dropout(self.dropout)(x_BxTxD, deterministic=not train)
    for i in range(num_layers):
      block = Block(heads, num_layers, self.dropout, self.dtype, lin, split_qkv=self.split_qkv,
                    name=f"block_{i}")
      x_BxTxD = block(x_BxTxD, train)
    x_BxTxD = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_f")(x_BxTxD)
    return wte.attend(x_BxTxD).astype(jnp.float32)
