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


BY_NAME = {"soft_topk": soft_topk, "capped_topk": capped_topk}


def by_name(name: str):
  """The gate function called `name` ('soft_topk' | 'capped_topk')."""
  if name not in BY_NAME:
    raise ValueError(f"unknown gate {name!r}; choose one of {sorted(BY_NAME)}")
  return BY_NAME[name]
