"""Soft and hard top-k gates over the diagonal importance vector alpha."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_topk(alpha_P: jax.Array, k: int | jax.Array, temperature: float | jax.Array) -> jax.Array:
  """g_P = min(k * softmax(alpha / T), 1): each gate in [0, 1], sum(g) <= k."""
  a = alpha_P.astype(jnp.float32)
  t = jnp.asarray(temperature, jnp.float32)
  # softmax subtracts the max, so alpha / T stays finite in exp for T down to ~1e-30.
  return jnp.minimum(k * jax.nn.softmax(a / t), 1.0).astype(alpha_P.dtype)


def capped_topk(alpha_P: jax.Array, k: int, temperature: float | jax.Array) -> jax.Array:
  """g_P = min(c * exp(alpha / T), 1) with c set so that sum(g) == k exactly.

  Equals `soft_topk` whenever no gate reaches 1; unlike it, its T -> 0 limit is the
  hard top-k (soft_topk's own limit puts all of its mass on the single largest alpha).
  """
  p = alpha_P.shape[0]
  if not 1 <= k <= p:
    raise ValueError(f"k must lie in [1, {p}], got {k}")
  z_P = alpha_P.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  order = jnp.argsort(-z_P)
  zs_P = z_P[order]
  # With the r largest gates saturated: log c_r = log(k - r) - logsumexp(zs[r:]).
  r_R = jnp.arange(k)
  tail_P = jax.lax.cumlogsumexp(zs_P, axis=0, reverse=True)
  logc_R = jnp.log(k - r_R) - tail_P[:k]
  ok_R = logc_R + zs_P[:k] <= 1e-6  # the largest unsaturated gate stays below 1
  # r = k (the k largest saturated, the rest 0) is the limit when no r < k fits.
  r = jnp.where(ok_R.any(), jnp.argmax(ok_R), k)
  logc = jnp.where(r < k, logc_R[jnp.minimum(r, k - 1)], -jnp.inf)
  g_P = jnp.where(jnp.arange(p) < r, 1.0, jnp.minimum(jnp.exp(logc + zs_P), 1.0))
  return jnp.zeros_like(g_P).at[order].set(g_P).astype(alpha_P.dtype)


def topk_indices(alpha_P: jax.Array, k: int) -> jax.Array:
  """The k largest entries of alpha, in ascending index order (ties: lower index)."""
  _, idx = jax.lax.top_k(alpha_P, k)
  return jnp.sort(idx).astype(jnp.int32)


def topk_mask(alpha_P: jax.Array, k: int) -> jax.Array:
  """True on the k largest entries of alpha (`topk_indices`' selection), as a (P,) bool mask."""
  return jnp.zeros(alpha_P.shape, bool).at[topk_indices(alpha_P, k)].set(True)


def st_topk(alpha_P: jax.Array, k: int, temperature: float | jax.Array) -> jax.Array:
  """Straight-through top-k: forward exactly 1 on the top-k of alpha (`topk_indices`), 0
  elsewhere; gradient to alpha that of `soft_topk` (g = hard + soft - stop_gradient(soft)).

  The exploring layer is then a K-diagonal layer at full scale, and the freeze folds gates
  of exactly 1 (it changes nothing but the storage).
  """
  p = alpha_P.shape[0]
  if not 1 <= k <= p:
    raise ValueError(f"k must lie in [1, {p}], got {k}")
  soft_P = soft_topk(alpha_P, k, temperature)
  hard_P = jnp.zeros_like(soft_P).at[topk_indices(jax.lax.stop_gradient(alpha_P), k)].set(1)
  # soft - stop_gradient(soft) is exactly 0 in the forward pass (x - x of a finite x).
  return hard_P + (soft_P - jax.lax.stop_gradient(soft_P))


BY_NAME = {"soft_topk": soft_topk, "capped_topk": capped_topk, "st_topk": st_topk,
           "st_topk_shadow": st_topk}
HARD = ("st_topk", "st_topk_shadow")  # gates whose forward value is the hard 0/1 top-k mask
# DiagDense also gives the values of the unselected active diagonals their full gradient
# (trained in the shadow, as in Top-KAST), so that alpha's gradient <dL/dW_p, values_p>
# is informative for diagonals outside the top-K; the forward pass is unchanged.
SHADOW = ("st_topk_shadow",)
PAPER = "soft_topk"  # the paper's gate (with the paper's schedule, `schedules.Schedule`)
# The default of DiagDense, LayerFactory, advance / freeze and configs/common.py: the best
# measured recipe (docs/RESULTS.md, mnist_mlp, 3 seeds; soft_topk stays selectable).
DEFAULT = "st_topk_shadow"


def init_gain(name: str, k: int, p: int) -> float:
  """1 / (each gate's value at a constant alpha): K/P-gated values start P/K times larger."""
  by_name(name)
  return 1.0 if name in HARD else p / k


def by_name(name: str):
  """The gate function called `name` ('soft_topk' | 'capped_topk' | 'st_topk' | 'st_topk_shadow')."""
  if name not in BY_NAME:
    raise ValueError(f"unknown gate {name!r}; choose one of {sorted(BY_NAME)}")
  return BY_NAME[name]
