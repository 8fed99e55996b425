"""Multi-head self-attention whose projections come from a `LayerFactory`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax.layers import LayerFactory

Initializer = nn.initializers.Initializer


def fused_xavier_uniform(parts: int) -> Initializer:
  """Xavier-uniform for a fused (d, parts * d) kernel, as if each part were its own (d, d)."""

  def init(key, shape, dtype=jnp.float32):
    m, n = shape
    lim = np.sqrt(6.0 / (m + n // parts))
    return jax.random.uniform(key, shape, jnp.float32, -lim, lim).astype(dtype)

  return init


class SelfAttention(nn.Module):
  """Self-attention: one fused 'qkv' linear to 3d, softmax(q k^T / sqrt(dh)) v, 'attn_out' linear.

  The fused kernel's columns are [q | k | v], each laid out head-major (h, dh) as in GPT-2.
  """
  num_heads: int
  linear: LayerFactory = LayerFactory()
  causal: bool = False
  dropout: float = 0.0  # on the attention weights
  qkv_init: Initializer | None = None
  out_init: Initializer | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, train: bool = False) -> jax.Array:
    b, t, d = x_BxTxD.shape
    h = self.num_heads
    if d % h:
      raise ValueError(f"width {d} is not divisible by {h} heads")
    dh = d // h
    qkv_BxTx3xHxK = self.linear("qkv", 3 * d, kernel_init=self.qkv_init)(x_BxTxD).reshape(b, t, 3, h, dh)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
    q_BxTxHxK = q_BxTxHxK / jnp.sqrt(dh).astype(q_BxTxHxK.dtype)
    s_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxTxHxK).astype(jnp.float32)
    if self.causal:
      mask_TxT = jnp.tril(jnp.ones((t, t), bool))
      s_BxHxTxT = jnp.where(mask_TxT, s_BxHxTxT, jnp.finfo(jnp.float32).min)
    w_BxHxTxT = jax.nn.softmax(s_BxHxTxT, axis=-1).astype(v_BxTxHxK.dtype)
    w_BxHxTxT = nn.Dropout(self.dropout)(w_BxHxTxT, deterministic=not train)
    o_BxTxHxK = jnp.einsum("bhqs,bshk->bqhk", w_BxHxTxT, v_BxTxHxK)
    return self.linear("attn_out", d, kernel_init=self.out_init)(o_BxTxHxK.reshape(b, t, d))
