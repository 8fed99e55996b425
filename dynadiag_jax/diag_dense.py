"""`DiagDense`: a drop-in for `nn.Dense` whose kernel is a sum of learned wrapped diagonals."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import gates, ops, pattern, schedules
from dynadiag_jax.ops import KernelConfig
from dynadiag_jax.pattern import Geometry

COLLECTION = "dynadiag"
DEFAULT_TEMPERATURE = 5.0
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def values_init(m: int, n: int, k: int, block: int = 1,
                gain: float | None = None) -> nn.initializers.Initializer:
  """Truncated normal whose gated kernel (all gates k / P) has nn.Dense's variance 1/m.

  `gain` (default P / k) is 1 / the gates' value at init: 1 for a hard gate (`gates.HARD`),
  whose K kept entries per row then have nn.Dense's std 1/sqrt(m), as a static layer's.
  """
  if gain is None:
    gain = pattern.num_diagonals(m, n, block) / k
  std = gain / np.sqrt(m) / _TRUNC_STD

  def init(key, shape, dtype=jnp.float32):
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)

  return init


def effective_init(kernel_init: nn.initializers.Initializer, geo: Geometry,
                   k: int, gain: float | None = None) -> nn.initializers.Initializer:
  """Values whose gated kernel (all gates k / P) is `kernel_init`'s (m, n) kernel on the diagonals.

  An initializer describes the effective kernel, as in `nn.Dense`: lecun_normal gives the
  kernel entries the same variance here as there.
  """

  def init(key, shape, dtype=jnp.float32):
    w_MxN = kernel_init(key, (geo.m, geo.n), jnp.float32)
    rows = np.arange(shape[0])  # (P,) while exploring, every diagonal
    v = pattern.gather_diagonals(w_MxN, rows, geo.m, geo.n, geo.block)
    return (v * (geo.P / k if gain is None else gain)).astype(dtype)

  return init


def tie_break_init(p: int, spread: float = 1e-3) -> nn.initializers.Initializer:
  """alpha = (1 + spread * u) / P, u ~ U[0, 1): distinct, so a hard top-k starts on a random set."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    return ((1.0 + spread * u) / p).astype(dtype)

  return init


SHADOW_INITS = ("random", "zero")


def _zero_outside_topk(init: nn.initializers.Initializer, alpha_P: jax.Array,
                       k: int) -> nn.initializers.Initializer:
  """`init` with the rows of every diagonal outside the top-k of alpha_P set to zero."""

  def zeroed(key, shape, dtype=jnp.float32):
    keep_P = gates.topk_mask(alpha_P, k)
    return init(key, shape, dtype) * keep_P.reshape((-1,) + (1,) * (len(shape) - 1)).astype(dtype)

  return zeroed


class DiagDense(nn.Module):
  """y = x @ W + b with W a sum of K selected wrapped (block-)diagonals (docs/DESIGN.md 2, 3, 8).

  Exploring: params `alpha` (P,), `values` (P, D) or (P, D, b, b), `bias` (n,); collection
  `dynadiag` holds `k` () and `in_features` (). The phase is configuration, not state:
  the layer computes the top-K_active diagonals of alpha, K_active = K + round(`level` *
  (K_start - K)) with K_start = `k_start_fraction` * P (static: a new level is a new
  trace), gated at `temperature` (may be traced). With all P active, W is dense and the
  layer runs one GEMM whatever the backend. `dynadiag_jax.with_phase` sets them on a model.
  Frozen (after `dynadiag_jax.freeze`): params `values` (K, D[, b, b]), `bias`; `dynadiag`
  holds `offsets` (K,) and `in_features` ().
  `block` b selects b x b block-diagonals (b must divide both sides; 1 is the paper's
  method; with `fit_block` the layer takes the largest valid b up to `block`); `kernel_init`
  describes the effective kernel (None: truncated normal of `nn.Dense`'s variance); `gate`
  names a gate of `dynadiag_jax.gates` ('soft_topk', the paper's; 'capped_topk'; 'st_topk',
  hard forward, soft gradient: its values start at 1 / (P/K) of the soft gates' scale and
  alpha with random ties broken; 'st_topk_shadow', the same with the dense gradient on the
  values of every active diagonal). With a hard gate alpha starts at (1 + `alpha_spread` u) / P,
  u ~ U[0, 1): the spread is how firmly the random start holds against alpha's first updates.
  `shadow_init` 'zero' (gate 'st_topk_shadow' only) starts the values of the diagonals
  outside alpha's initial top-K at zero: a candidate's values are then only what its shadow
  gradient taught it, and swapping it in adds that instead of an untrained random diagonal.
  """
  features: int
  sparsity: float = 0.9
  block: int = 1
  fit_block: bool = False
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  alpha_init: nn.initializers.Initializer | None = None
  backend: str = "auto"
  kernel_config: KernelConfig = KernelConfig()
  gate: str = gates.DEFAULT
  level: float = 1.0
  k_start_fraction: float = 1.0
  temperature: Any = DEFAULT_TEMPERATURE
  alpha_spread: float = 1e-3
  shadow_init: str = "random"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m, n = int(x.shape[-1]), int(self.features)
    if self.has_variable(COLLECTION, "in_features"):
      self._check_frozen_width(m)
    geo = Geometry(m, n, self.block_for(m))
    k = pattern.num_kept(m, n, self.sparsity, geo.block)
    ops.check_backend_name(self.backend)
    gate = gates.by_name(self.gate)
    cfg = self.kernel_config
    if self.precision is not None:
      cfg = dataclasses.replace(cfg, precision=self.precision)

    if self.has_variable(COLLECTION, "offsets"):  # frozen: a static K-diagonal layer
      o_K = self.get_variable(COLLECTION, "offsets")
      v = self.param("values", self._values_init(geo, k), geo.values_shape(o_K.shape[0]),
                     self.param_dtype)
    else:
      p = geo.P
      if self.alpha_init is not None:
        alpha_init = self.alpha_init
      elif self.gate in gates.HARD:  # equal alphas would keep the lowest K offsets
        alpha_init = tie_break_init(p, self.alpha_spread)
      else:
        alpha_init = nn.initializers.constant(1.0 / p)
      alpha_P = self.param("alpha", alpha_init, (p,), self.param_dtype)
      values_init = self._values_init(geo, k)
      if self._zero_shadow():
        values_init = _zero_outside_topk(values_init, alpha_P, k)
      values = self.param("values", values_init, geo.values_shape(p), self.param_dtype)
      self.variable(COLLECTION, "k", lambda: jnp.asarray(k, jnp.int32))
      self.variable(COLLECTION, "in_features", lambda: jnp.asarray(m, jnp.int32))
      k_active = schedules.k_active(p, k, self.level, self.k_start_fraction)
      if pattern.is_concrete(self.temperature) and not float(np.min(self.temperature)) > 0:
        raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
      g_P = gate(alpha_P, k, self.temperature)
      g_P = g_P.reshape((p,) + (1,) * (values.ndim - 1))
      gated = lambda g, v: g * v
      if self.gate in gates.SHADOW:  # forward g * v; d/dv = dL/dW on every active diagonal
        gated = lambda g, v: g * v + (1 - jax.lax.stop_gradient(g)) * (v - jax.lax.stop_gradient(v))
      if k_active == p:  # every diagonal: W is dense, one GEMM whatever the backend
        bias = self._bias(n)
        x, v_all, bias = nn.dtypes.promote_dtype(x, gated(g_P, values), bias, dtype=self.dtype)
        y = jnp.matmul(x, pattern.densify_all(v_all, m, n, geo.block), precision=self.precision)
        return y if bias is None else y + bias
      o_K = gates.topk_indices(jax.lax.stop_gradient(alpha_P), k_active)
      v = gated(g_P[o_K], values[o_K])

    bias = self._bias(n)
    x, v, bias = nn.dtypes.promote_dtype(x, v, bias, dtype=self.dtype)
    y = ops.diag_matmul(x, v, o_K, m, n, backend=self.backend, kernel=cfg)
    return y if bias is None else y + bias

  def block_for(self, m: int) -> int:
    """The block size this layer uses for `m` input features."""
    n = int(self.features)
    if self.fit_block:
      return pattern.largest_block(m, n, self.block)
    return pattern.check_block(m, n, self.block, self.name or "")

  def _zero_shadow(self) -> bool:
    if self.shadow_init not in SHADOW_INITS:
      raise ValueError(f"unknown shadow_init {self.shadow_init!r}; choose one of {SHADOW_INITS}")
    if self.shadow_init == "zero" and self.gate not in gates.SHADOW:
      raise ValueError(f"shadow_init='zero' needs a shadow gate {gates.SHADOW}, got gate "
                       f"{self.gate!r} (without shadow gradients zero values never train)")
    return self.shadow_init == "zero"

  def _values_init(self, geo: Geometry, k: int) -> nn.initializers.Initializer:
    gain = gates.init_gain(self.gate, k, geo.P)
    if self.kernel_init is None:
      return values_init(geo.m, geo.n, k, geo.block, gain)
    return effective_init(self.kernel_init, geo, k, gain)

  def _check_frozen_width(self, m: int) -> None:
    want = self.get_variable(COLLECTION, "in_features")
    if not pattern.is_concrete(want):
      return
    want = int(np.asarray(want).reshape(-1)[0])
    if want != m:
      raise ValueError(f"DiagDense {self.name!r} was frozen for {want} input features, got x "
                       f"with {m} on its last axis")

  def _bias(self, n: int) -> jax.Array | None:
    return self.param("bias", self.bias_init, (n,), self.param_dtype) if self.use_bias else None
