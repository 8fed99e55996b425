"""`DiagDense`: a drop-in for `nn.Dense` whose kernel is a sum of learned wrapped diagonals."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import gates, ops, pattern

COLLECTION = "dynadiag"
DEFAULT_TEMPERATURE = 5.0
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def values_init(m: int, n: int, k: int) -> nn.initializers.Initializer:
  """Truncated normal whose gated kernel (all gates k / P) has nn.Dense's variance 1/m."""
  std = (pattern.num_diagonals(m, n) / k) / np.sqrt(m) / _TRUNC_STD

  def init(key, shape, dtype=jnp.float32):
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)

  return init


class DiagDense(nn.Module):
  """y = x @ W + b with W a sum of K selected wrapped diagonals (DESIGN.md sections 2-3).

  Exploring: params `alpha` (P,), `values` (P, D), `bias` (n,); collection `dynadiag`
  holds `temperature` (), `k` () and `active` (K_active,): the layer computes the
  top-K_active diagonals of alpha, K_active being the static length of `active` (with
  all P active, W is dense and the layer runs one GEMM whatever the backend).
  Frozen (after `dynadiag_jax.freeze`): params `values` (K, D), `bias`; `dynadiag` holds
  `offsets` (K,) only.
  """
  features: int
  sparsity: float = 0.9
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  backend: str = "auto"
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m, n = int(x.shape[-1]), int(self.features)
    p, d = pattern.num_diagonals(m, n), pattern.diag_length(m, n)
    k = pattern.num_kept(m, n, self.sparsity)
    ops.resolve_backend(self.backend)

    if self.has_variable(COLLECTION, "offsets"):  # frozen: a static K-diagonal layer
      o_K = self.get_variable(COLLECTION, "offsets")
      v_KxD = self.param("values", values_init(m, n, k), (o_K.shape[0], d), self.param_dtype)
    else:
      alpha_P = self.param("alpha", nn.initializers.constant(1.0 / p), (p,), self.param_dtype)
      values_PxD = self.param("values", values_init(m, n, k), (p, d), self.param_dtype)
      t = self.variable(COLLECTION, "temperature", lambda: jnp.asarray(DEFAULT_TEMPERATURE, jnp.float32))
      self.variable(COLLECTION, "k", lambda: jnp.asarray(k, jnp.int32))
      active = self.variable(COLLECTION, "active", lambda: jnp.arange(p, dtype=jnp.int32))
      k_active = active.value.shape[0]
      if not k <= k_active <= p:
        raise ValueError(f"{k_active} active diagonals; must lie in [K, P] = [{k}, {p}]")
      g_P = gates.soft_topk(alpha_P, k, t.value)
      if k_active == p:  # every diagonal: W is dense, one GEMM whatever the backend
        bias = self._bias(n)
        x, v_PxD, bias = nn.dtypes.promote_dtype(x, g_P[:, None] * values_PxD, bias,
                                                 dtype=self.dtype)
        y = x @ pattern.densify_all(v_PxD, m, n)
        return y if bias is None else y + bias
      o_K = gates.topk_indices(jax.lax.stop_gradient(alpha_P), k_active)
      if self.is_mutable_collection(COLLECTION) and not self.is_initializing():
        active.value = o_K
      v_KxD = g_P[o_K, None] * values_PxD[o_K]

    bias = self._bias(n)
    x, v_KxD, bias = nn.dtypes.promote_dtype(x, v_KxD, bias, dtype=self.dtype)
    y = ops.diag_matmul(x, v_KxD, o_K, m, n, backend=self.backend)
    return y if bias is None else y + bias

  def _bias(self, n: int) -> jax.Array | None:
    return self.param("bias", self.bias_init, (n,), self.param_dtype) if self.use_bias else None
