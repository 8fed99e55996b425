"""Mask baselines over dense kernels (RigL, SET, GMP, N:M, diagonal RigL / DiagHeur) as optax.

`masked(tx, layers, ...)` wraps an optimizer: its state holds one boolean unit mask per
sparse kernel, updated in-graph every `every` steps from (params, dense gradients, step,
seed), so pmap, orbax checkpoints and exact resume carry it like any optimizer state.
Kernels stay exactly zero off the mask: gradients are masked before `tx`, and the update
sets masked-out weights to 0. A *unit* is one weight (unstructured, N:M) or one wrapped
(block-)diagonal (`diag`: DESIGN.md section 2 geometry); each layer's units are a (G, S)
array of G groups that each keep N units (N:M: groups of M inputs of one output).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynadiag_jax import pattern

KINDS = ("unstructured", "nm", "diag")
GROWTH = ("gradient", "random", "none")


@dataclasses.dataclass(frozen=True)
class Layer:
  """The static mask geometry of one (m, n) kernel: G groups of S units, N kept per group."""
  key: str  # 'fc1/kernel': the param path
  m: int
  n: int
  kind: str  # 'unstructured' | 'nm' | 'diag'
  keep: int  # N kept units per group at the end of training
  group: int = 0  # nm: M inputs per group
  block: int = 1  # diag: block size

  @property
  def shape(self) -> tuple[int, int]:
    """(G, S) of the unit array."""
    if self.kind == "unstructured":
      return 1, self.m * self.n
    if self.kind == "nm":
      return self.n * (self.m // self.group), self.group
    return 1, pattern.num_diagonals(self.m, self.n, self.block)

  @property
  def weights_per_unit(self) -> int:
    return self.block * self.block * pattern.diag_length(self.m, self.n, self.block) \
        if self.kind == "diag" else 1

  @property
  def kept(self) -> int:
    """Weights kept at the end: G x N units x weights per unit."""
    return self.shape[0] * self.keep * self.weights_per_unit

  def to_weights(self, u_GxS: jax.Array) -> jax.Array:
    """The (m, n) weight mask of a unit mask."""
    if self.kind == "unstructured":
      return u_GxS.reshape(self.m, self.n)
    if self.kind == "nm":  # groups run over the inputs of one output: (n, m / M, M)
      return u_GxS.reshape(self.n, self.m).T
    idx = pattern.diagonal_index(self.m, self.n, self.block)
    idx = np.kron(idx, np.ones((self.block, self.block), np.int32)) if self.block > 1 else idx
    return u_GxS[0][idx]

  def to_units(self, w_MxN: jax.Array) -> jax.Array:
    """A per-weight score summed into units: (G, S) (diag: l2 norm of each diagonal)."""
    if self.kind == "unstructured":
      return w_MxN.reshape(1, -1)
    if self.kind == "nm":
      return w_MxN.T.reshape(self.shape)
    idx = pattern.diagonal_index(self.m, self.n, self.block)
    idx = np.kron(idx, np.ones((self.block, self.block), np.int32)) if self.block > 1 else idx
    s = jax.ops.segment_sum(jnp.square(w_MxN).reshape(-1), idx.reshape(-1), self.shape[1])
    return jnp.sqrt(s)[None]


def layer(key: str, m: int, n: int, sparsity: float, kind: str, group: int = 0,
          block: int = 1) -> Layer:
  """The Layer keeping as many weights as a DiagDense of the same sparsity (K x D, block 1)."""
  if kind not in KINDS:
    raise ValueError(f"unknown mask kind {kind!r}; one of {KINDS}")
  k = pattern.num_kept(m, n, sparsity, block)
  budget = k * pattern.diag_length(m, n, block) * block * block  # DiagDense's kept weights
  if kind == "unstructured":
    return Layer(key, m, n, kind, budget)
  if kind == "diag":
    return Layer(key, m, n, kind, k, block=block)
  mm = group or m
  if m % mm:
    raise ValueError(f"N:M group {mm} does not divide the {m} inputs of {key!r}")
  g = n * (m // mm)
  return Layer(key, m, n, kind, int(min(mm, max(1, round(budget / g)))), group=mm)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When and how much the masks change: RigL's cosine drop fraction, or GMP's cubic pruning."""
  total_steps: int
  every: int = 100  # steps between mask updates
  drop_fraction: float = 0.3  # RigL: share of kept units replaced at step 0, cosine to 0
  end_fraction: float = 0.75  # no mask change from this share of training on
  growth: str = "gradient"  # 'gradient' (RigL) | 'random' (SET, DiagHeur) | 'none' (GMP)
  gmp: bool = False  # GMP: start dense, prune by magnitude, cubic schedule to end_fraction
  gmp_start_fraction: float = 0.0  # GMP: first pruning at this share of training

  def __post_init__(self):
    if self.every < 1 or self.total_steps < 1:
      raise ValueError(f"mask update every {self.every} of {self.total_steps} steps")
    if self.growth not in GROWTH:
      raise ValueError(f"unknown growth {self.growth!r}; one of {GROWTH}")
    if not 0.0 <= self.drop_fraction <= 1.0 or not 0.0 < self.end_fraction <= 1.0:
      raise ValueError(f"drop_fraction {self.drop_fraction} / end_fraction {self.end_fraction}")
    if self.gmp and self.last_update < self.every:
      raise ValueError(f"GMP prunes every {self.every} steps, but no pruning step falls before "
                       f"step {self.end_step} of {self.total_steps}; lower masks.every")

  @property
  def end_step(self) -> int:
    return int(self.end_fraction * self.total_steps)

  @property
  def last_update(self) -> int:
    """The last step whose mask update can happen (GMP reaches its target there)."""
    return (max(self.end_step - 1, 0) // self.every) * self.every

  def is_update(self, step: jax.Array) -> jax.Array:
    return (step > 0) & (step % self.every == 0) & (step <= self.last_update)

  def drop_share(self, step: jax.Array) -> jax.Array:
    """RigL's f(t) = d / 2 (1 + cos(pi t / T_end))."""
    t = jnp.minimum(step, self.end_step) / max(self.end_step, 1)
    return 0.5 * self.drop_fraction * (1.0 + jnp.cos(jnp.pi * t))

  def gmp_keep(self, step: jax.Array, n: int, s: int) -> jax.Array:
    """Units kept of S at `step`: S -> N along (1 - progress)^3 (Zhu & Gupta)."""
    t0 = int(self.gmp_start_fraction * self.total_steps)
    prog = jnp.clip((step - t0) / max(self.last_update - t0, 1), 0.0, 1.0)
    return n + jnp.round((s - n) * (1.0 - prog) ** 3).astype(jnp.int32)


def _rank(score_GxS: jax.Array) -> jax.Array:
  """Rank of each unit in its group, 0 = largest (ties: lower index first)."""
  order = jnp.argsort(-score_GxS, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def init_units(lay: Layer, key: jax.Array, dense: bool) -> jax.Array:
  """A random mask with N units per group (or all units, `dense`: GMP's start)."""
  g, s = lay.shape
  if dense:
    return jnp.ones((g, s), bool)
  return _rank(jax.random.uniform(key, (g, s))) < lay.keep


def regrow(u_GxS: jax.Array, drop_GxS: jax.Array, grow_GxS: jax.Array,
           n_drop: jax.Array, keep: int) -> jax.Array:
  """Drop the n_drop lowest-`drop` active units of each group, grow n_drop of the highest-`grow`."""
  ninf = jnp.asarray(-jnp.inf, jnp.float32)
  kept = u_GxS & (_rank(jnp.where(u_GxS, drop_GxS, ninf)) < keep - n_drop)
  grown = _rank(jnp.where(kept, ninf, grow_GxS)) < n_drop
  return kept | grown


def prune(u_GxS: jax.Array, score_GxS: jax.Array, n_keep: jax.Array) -> jax.Array:
  """The n_keep highest-scored active units of each group."""
  return u_GxS & (_rank(jnp.where(u_GxS, score_GxS, -jnp.inf)) < n_keep)


class MaskState(NamedTuple):
  count: chex.Array  # () int32 updates done (= step)
  masks: dict[str, chex.Array]  # {layer key: (G, S) bool}
  inner: Any


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves}


def _map_flat(fn, tree, *rest):
  """tree_map of fn(key, leaf, *rest_leaves) with each leaf's '/'-joined path as key."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x, *r: fn(jax.tree_util.keystr(p, simple=True, separator="/"), x, *r), tree, *rest)


def masked(tx: optax.GradientTransformation, layers: Mapping[str, Layer], sched: Schedule,
           seed: int) -> optax.GradientTransformation:
  """`tx` on dense kernels kept sparse by evolving masks (state: MaskState)."""
  layers = dict(layers)

  def weights_masks(masks):
    return {k: layers[k].to_weights(u) for k, u in masks.items()}

  def init(params):
    flat = _flat(params)
    missing = sorted(set(layers) - set(flat))
    if missing:
      raise ValueError(f"no params {missing} to mask; have {sorted(flat)[:8]}...")
    base = jax.random.PRNGKey(seed)
    masks = {k: init_units(lay, jax.random.fold_in(base, i), sched.gmp)
             for i, (k, lay) in enumerate(sorted(layers.items()))}
    return MaskState(jnp.zeros([], jnp.int32), masks, tx.init(params))

  def new_masks(masks, params, grads, count):
    flat_p, flat_g = _flat(params), _flat(grads)
    key = jax.random.fold_in(jax.random.PRNGKey(seed ^ 0x5EED), count)
    out = {}
    for i, (k, lay) in enumerate(sorted(layers.items())):
      u = masks[k]
      mag = lay.to_units(jnp.abs(flat_p[k]).astype(jnp.float32))
      if sched.gmp:
        out[k] = prune(u, mag, sched.gmp_keep(count, lay.keep, lay.shape[1]))
        continue
      n_drop = jnp.floor(sched.drop_share(count) * lay.keep).astype(jnp.int32)
      if sched.growth == "gradient":
        grow = lay.to_units(jnp.abs(flat_g[k]).astype(jnp.float32))
      else:
        grow = jax.random.uniform(jax.random.fold_in(key, i), lay.shape)
      out[k] = regrow(u, mag, grow, n_drop, lay.keep)
    return out

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("masked() needs params")
    masks = jax.lax.cond(sched.is_update(state.count),
                         lambda: new_masks(state.masks, params, grads, state.count),
                         lambda: state.masks)
    w_old, w_new = weights_masks(state.masks), weights_masks(masks)
    grads = _map_flat(lambda k, x: jnp.where(w_new[k], x, jnp.zeros_like(x))
                      if k in w_new else x, grads)
    # Moments of units that just grew or were dropped restart at zero (RigL: new weights at 0).
    same = {k: w_new[k] & w_old[k] for k in w_new}
    inner = _reset_moments(state.inner, same, params)
    u, inner = tx.update(grads, inner, params)
    flat_p = _flat(params)
    u = _map_flat(lambda k, x: jnp.where(w_new[k], x, -flat_p[k]) if k in w_new else x, u)
    return u, MaskState(optax.safe_increment(state.count), masks, inner)

  return optax.GradientTransformation(init, update)


def _reset_moments(inner: Any, keep: dict[str, jax.Array], params: Any) -> Any:
  """Zeroes, in every params-shaped subtree of an optimizer state, entries off `keep`."""
  struct = jax.tree.structure(params)

  def fix(node):
    if jax.tree.structure(node) == struct:
      return _map_flat(lambda k, x: jnp.where(keep[k], x, jnp.zeros_like(x))
                       if k in keep else x, node)
    return node

  return jax.tree.map(fix, inner, is_leaf=lambda n: jax.tree.structure(n) == struct)


def find_state(opt_state: Any) -> MaskState | None:
  """The MaskState inside an optimizer state, or None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, MaskState))
           if isinstance(s, MaskState)]
  return found[0] if found else None


__all__ = ["Layer", "MaskState", "Schedule", "find_state", "init_units", "layer", "masked",
           "prune", "regrow"]
