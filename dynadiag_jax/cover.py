"""Coverage-aware selection: K diagonals of high alpha that leave no input or output unconnected.

On a rectangular (block) grid, diagonal p covers the cyclic window [p, p + D) of the long
side (P blocks) and the whole short side, so K kept diagonals at sorted offsets o_0 < ... <
o_{K-1} connect every long-side block iff every cyclic gap o_{i+1} - o_i (and o_0 + P -
o_{K-1}) is at most D. That is possible iff K * D >= P; otherwise the fewest blocks are
left out (P - K * D) iff every gap is at least D (no two windows overlap). `select` takes the
K-subset of largest sum of alpha under that gap bound (`gap_bounds`), with no lattice
imposed: where the top-K of alpha already satisfies it, it is the top-K itself.

The exact solver is a max-plus dynamic programme over (first offset, count, last offset),
vectorised over the first offset f (in [0, D) when feasible: every D-window holds a kept
diagonal) and over the last offset, with a log-doubling sliding-window max per count:
about K * F * P * log2(D) element operations, all lax ops (jit-able, also run eagerly at
the freeze, so exploration and freeze keep the same set). Where that exceeds `BUDGET`
(large P: block 1 and 2-4 on wide layers, where coverage is already ~99%), a cheap feasible
rule is used instead (`anchors`): the argmax of alpha in each of ceil(P / h) aligned
windows of h = ceil(D / 2) blocks (any D-window holds one), then the top of the rest.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import gates

# Element operations of the exact solver above which `select` uses `anchors` (where it can).
BUDGET = 1 << 24
_NEG = -jnp.inf


def gap_bounds(p: int, d: int, k: int) -> tuple[int, int]:
  """(lo, hi): the cyclic gaps between kept offsets that leave the fewest long-side blocks out."""
  return (1, d) if k * d >= p else (d, p)


def first_range(p: int, d: int, k: int) -> int:
  """F: the smallest kept offset of a best selection lies in [0, F)."""
  return d if k * d >= p else p - (k - 1) * d


def solver_cost(p: int, d: int, k: int) -> int:
  """Element operations of the exact programme (`dp`)."""
  lo, hi = gap_bounds(p, d, k)
  return k * first_range(p, d, k) * p * (math.ceil(math.log2(hi - lo + 1)) + 2)


def uncovered(o_K, p: int, d: int) -> int:
  """Long-side blocks that no window [o, o + d) (cyclic, mod p) of `o_K` covers (numpy)."""
  hit = np.zeros(p, bool)
  for o in np.asarray(o_K).reshape(-1):
    hit[(int(o) + np.arange(min(d, p))) % p] = True
  return int(p - hit.sum())


def _shift(a_FxP: jax.Array, s: int) -> jax.Array:
  """out[:, i] = a[:, i - s] (-inf where i < s)."""
  p = a_FxP.shape[1]
  if s <= 0:
    return a_FxP
  if s >= p:
    return jnp.full_like(a_FxP, _NEG)
  return jnp.pad(a_FxP[:, :p - s], ((0, 0), (s, 0)), constant_values=_NEG)


def _window_max(v_FxP: jax.Array, lo: int, hi: int) -> jax.Array:
  """out[:, i] = max over e in [lo, hi] of v[:, i - e] (-inf before 0): log-doubling."""
  t = _shift(v_FxP, lo)
  w, span = hi - lo + 1, 1
  while 2 * span <= w:
    t = jnp.maximum(t, _shift(t, span))
    span *= 2
  return jnp.maximum(t, _shift(t, w - span))


def _gaps_ok(o_K: jax.Array, p: int, lo: int, hi: int) -> jax.Array:
  """Whether every cyclic gap of the sorted offsets lies in [lo, hi]."""
  gaps = jnp.diff(jnp.concatenate([o_K, o_K[:1] + p]))
  return jnp.all((gaps >= lo) & (gaps <= hi))


def dp(alpha_P: jax.Array, k: int, d: int) -> jax.Array:
  """The K offsets (ascending) of largest sum of alpha whose cyclic gaps lie in `gap_bounds`."""
  p = alpha_P.shape[0]
  lo, hi = gap_bounds(p, d, k)
  nf = first_range(p, d, k)
  a_P = alpha_P.astype(jnp.float32)
  i_P = jnp.arange(p)
  f_F = jnp.arange(nf)
  v1 = jnp.where(i_P[None, :] == f_F[:, None], a_P[None, :], _NEG)  # chains of one: f itself

  def step(v, _):
    nxt = _window_max(v, lo, hi) + a_P[None, :]
    return nxt, v

  v_last, v_hist = jax.lax.scan(step, v1, None, length=k - 1) if k > 1 else (v1, v1[None])
  gap_FxP = f_F[:, None] + p - i_P[None, :]  # the closing gap back to f
  final = jnp.where((gap_FxP >= lo) & (gap_FxP <= hi), v_last, _NEG)
  best = jnp.argmax(final.reshape(-1))
  f, last = best // p, best % p

  def back(i, v_P):  # the predecessor of i among chains one shorter (their values v_P)
    e = i - i_P
    return jnp.argmax(jnp.where((e >= lo) & (e <= hi), v_P, _NEG)).astype(jnp.int32)

  def walk(i, v_FxP):
    prev = back(i, v_FxP[f])
    return prev, prev

  if k == 1:  # the chain is f alone
    return jnp.reshape(last, (1,)).astype(jnp.int32)
  _, before = jax.lax.scan(walk, last.astype(jnp.int32), v_hist, reverse=True)  # before[0] = f
  return jnp.concatenate([before, last[None].astype(jnp.int32)])


def anchors(alpha_P: jax.Array, k: int, d: int) -> jax.Array:
  """A feasible K-set (ascending) in O(P log P): the best of each h-window, then the top rest.

  h = ceil(D / 2): every cyclic D-window holds a whole aligned h-window, so one kept offset
  per h-window connects every long-side block. Needs K >= ceil(P / h).
  """
  p = alpha_P.shape[0]
  h = (d + 1) // 2
  na = -(-p // h)
  if na > k:
    raise ValueError(f"anchors needs K >= ceil(P / ceil(D / 2)) = {na}, got K = {k}")
  a = jnp.pad(alpha_P.astype(jnp.float32), (0, na * h - p), constant_values=_NEG)
  best_A = jnp.argmax(a.reshape(na, h), axis=1) + jnp.arange(na) * h
  boosted = alpha_P.astype(jnp.float32).at[best_A].set(jnp.inf)
  return gates.topk_indices(boosted, k)


def method(p: int, d: int, k: int, budget: int = BUDGET) -> str:
  """Which rule `select` runs for a (P, D, K) layer: 'top_k', 'dp' or 'anchors'."""
  if d >= p or k >= p:
    return "top_k"  # square grids: every diagonal covers the whole long side
  if solver_cost(p, d, k) <= budget or k * d < p or -(-p // ((d + 1) // 2)) > k:
    return "dp"
  return "anchors"


def select(alpha_P: jax.Array, k: int, d: int, budget: int = BUDGET) -> jax.Array:
  """K offsets (ascending, int32) of high alpha leaving the fewest long-side blocks unconnected.

  The top-K of alpha (`gates.topk_indices`) where its gaps already satisfy `gap_bounds`;
  else the best such set (`dp`), or, above `budget`, a feasible one (`anchors`). Works
  traced (exploration) and eagerly on concrete alpha (the freeze).
  """
  p = jnp.shape(alpha_P)[0]
  if not 1 <= k <= p:
    raise ValueError(f"k must lie in [1, {p}], got {k}")
  return _select(jnp.asarray(alpha_P), int(k), int(d), int(budget))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _select(alpha_P: jax.Array, k: int, d: int, budget: int) -> jax.Array:
  """`select` compiled once per (P, K, D): the freeze calls it eagerly on every layer."""
  p = alpha_P.shape[0]
  top = gates.topk_indices(alpha_P, k)
  rule = method(p, d, k, budget)
  if rule == "top_k":
    return top
  lo, hi = gap_bounds(p, d, k)
  fixed = dp(alpha_P, k, d) if rule == "dp" else anchors(alpha_P, k, d)
  return jnp.where(_gaps_ok(top, p, lo, hi), top, fixed)


def active(alpha_P: jax.Array, k_active: int, kept_K: jax.Array) -> jax.Array:
  """The K_active offsets computed while exploring: the kept K plus the top of the rest."""
  boosted = alpha_P.astype(jnp.float32).at[kept_K].set(jnp.inf)
  return gates.topk_indices(boosted, k_active)
