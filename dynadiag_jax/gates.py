"""Soft and hard top-k gates over the diagonal importance vector alpha."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_topk(alpha_P: jax.Array, k: int | jax.Array, temperature: float | jax.Array,
              kept: jax.Array | None = None) -> jax.Array:
  """g_P = min(k * softmax(alpha / T), 1): each gate in [0, 1], sum(g) <= k (`kept` unused)."""
  a = alpha_P.astype(jnp.float32)
  t = jnp.asarray(temperature, jnp.float32)
  # softmax subtracts the max, so alpha / T stays finite in exp for T down to ~1e-30.
  return jnp.minimum(k * jax.nn.softmax(a / t), 1.0).astype(alpha_P.dtype)


def topk_indices(alpha_P: jax.Array, k: int) -> jax.Array:
  """The k largest entries of alpha, in ascending index order (ties: lower index)."""
  _, idx = jax.lax.top_k(alpha_P, k)
  return jnp.sort(idx).astype(jnp.int32)


def st_topk(alpha_P: jax.Array, k: int, temperature: float | jax.Array,
            kept: jax.Array | None = None) -> jax.Array:
  """Straight-through top-k: forward exactly 1 on the top-k of alpha (`topk_indices`; the k
  offsets `kept` when given, e.g. `cover.select`'s), 0 elsewhere; gradient to alpha that of
  `soft_topk` (g = hard + soft - stop_gradient(soft)).

  The exploring layer is then a K-diagonal layer at full scale, and the freeze folds gates
  of exactly 1 (it changes nothing but the storage).
  """
  p = alpha_P.shape[0]
  if not 1 <= k <= p:
    raise ValueError(f"k must lie in [1, {p}], got {k}")
  soft_P = soft_topk(alpha_P, k, temperature)
  if kept is None:
    kept = topk_indices(jax.lax.stop_gradient(alpha_P), k)
  hard_P = jnp.zeros_like(soft_P).at[kept].set(1)
  # soft - stop_gradient(soft) is exactly 0 in the forward pass (x - x of a finite x).
  return hard_P + (soft_P - jax.lax.stop_gradient(soft_P))


BY_NAME = {"soft_topk": soft_topk, "st_topk": st_topk, "st_topk_shadow": st_topk}
NAMES = tuple(BY_NAME)  # a layer records its gate as the index in NAMES (`code`)
HARD = ("st_topk", "st_topk_shadow")  # gates whose forward value is the hard 0/1 top-k mask
# DiagDense also gives the values of the unselected active diagonals their full gradient
# (trained in the shadow, as in Top-KAST), so that alpha's gradient <dL/dW_p, values_p>
# is informative for diagonals outside the top-K; the forward pass is unchanged.
SHADOW = ("st_topk_shadow",)
PAPER = "soft_topk"  # the paper's gate (with the paper's schedule, `schedules.Schedule`)
# The default recipe's gate (`recipe.DEFAULT`): the best measured (docs/RESULTS.md,
# mnist_mlp, 3 seeds; soft_topk, the paper's, is `recipe.PAPER`).
DEFAULT = "st_topk_shadow"


def init_gain(name: str, k: int, p: int) -> float:
  """1 / (each gate's value at a constant alpha): K/P-gated values start P/K times larger."""
  by_name(name)
  return 1.0 if name in HARD else p / k


def by_name(name: str):
  """The gate function called `name` ('soft_topk' | 'st_topk' | 'st_topk_shadow')."""
  if name not in BY_NAME:
    raise ValueError(f"unknown gate {name!r}; choose one of {sorted(BY_NAME)}")
  return BY_NAME[name]


def code(name: str) -> int:
  """The integer a layer stores for its gate `name` (its index in NAMES)."""
  by_name(name)
  return NAMES.index(name)


def name_of(gate_code: int) -> str:
  """The gate name stored as `gate_code` by `code`."""
  if not 0 <= int(gate_code) < len(NAMES):
    raise ValueError(f"unknown gate code {gate_code}; known gates {NAMES}")
  return NAMES[int(gate_code)]
