"""Optax pieces for DynaDiag: l1 on `alpha` and decay masks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dynadiag_jax import gates, pattern

ALPHA = "alpha"


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", k)))


def _last_key(path) -> str:
  return _key_name(path[-1] if path else None)


def alpha_mask(params: Any) -> Any:
  """True on every `alpha` leaf of a params tree."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _last_key(p) == ALPHA, params)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: kernels and diagonal values, not alpha or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _last_key(p) not in (ALPHA, "bias", "scale") and jnp.ndim(x) > 1, params)


def add_l1(strength: float) -> optax.GradientTransformation:
  """Adds strength * sign(p) to the updates (the gradient of strength * |p|_1)."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("add_l1 needs params")
    return jax.tree.map(lambda g, p: g + strength * jnp.sign(p).astype(g.dtype),
                        updates, params), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def held_alpha_mask(names: tuple[str, ...]):
  """mask(params): True on the `alpha` leaves of layers whose path has a key in `names`."""
  names = tuple(str(n) for n in names)

  def mask(params: Any) -> Any:
    held = lambda path: any(_key_name(k) in names for k in path)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: _last_key(p) == ALPHA and held(p[:-1]), params)

  return mask


def scale_by_leaf_rms(eps: float = 1e-12) -> optax.GradientTransformation:
  """Divides each leaf by the root mean square of its entries (one scale per layer's alpha)."""

  def update(updates, state, params=None):
    del params
    rms = lambda g: jnp.sqrt(jnp.mean(jnp.square(g.astype(jnp.float32))))
    return jax.tree.map(lambda g: (g / (rms(g) + eps)).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _limited(a_P: jax.Array, u_P: jax.Array, k: int, max_swaps: int) -> jax.Array:
  """u_P changed so that a_P + u_P's top-k differs from a_P's in at most `max_swaps` entries."""
  p = a_P.shape[0]
  if k >= p:
    return u_P
  a1_P = a_P + u_P
  kept_P = gates.topk_mask(a_P, k)
  s = min(max_swaps, k, p - k)
  ninf = jnp.asarray(-jnp.inf, a1_P.dtype)
  enter_S, ei_S = jax.lax.top_k(jnp.where(kept_P, ninf, a1_P), s)  # best outsiders, descending
  leave_S, li_S = jax.lax.top_k(jnp.where(kept_P, -a1_P, ninf), s)  # worst insiders, ascending
  # The i-th best outsider beats the i-th worst insider (ties: the lower index, as top_k).
  swap_S = (enter_S > -leave_S) | ((enter_S == -leave_S) & (ei_S < li_S))
  # s <= min(k, p - k): every li is kept and every ei is not, so each pair flips on its swap.
  sel_P = kept_P.at[li_S].set(~swap_S).at[ei_S].set(swap_S)
  # Outsiders of the allowed selection stay below its smallest alpha, by a margin of ~8
  # float32 ulps so that optax.apply_updates' rounding (a + (a2 - a)) keeps the order.
  low = jnp.min(jnp.where(sel_P, a1_P, jnp.inf))
  cap_P = low - 1e-6 * (jnp.abs(low) + jnp.abs(a_P)) - 1e-30
  a2_P = jnp.where(sel_P, a1_P, jnp.minimum(a1_P, cap_P))
  within = jnp.all(gates.topk_mask(a1_P, k) == sel_P)  # the free step keeps the limit: unchanged
  return jnp.where(within | sel_P, u_P, a2_P - a_P)


def limit_swaps(max_swaps: int, sparsity: dict[str, float]) -> optax.GradientTransformation:
  """Alpha's updates projected so that each layer's top-K swaps at most `max_swaps` diagonals a step.

  Of the diagonals that would enter the top-K, the `max_swaps` with the largest alpha enter
  (each against the kept one with the smallest); the others are capped just below the new
  selection's smallest alpha, to enter one at a time in later steps. `sparsity` maps layer
  roles (the module name holding `alpha`) to their sparsity: K = ceil((1 - s) P), as in
  `pattern.num_kept`. Stateless: a function of (params, updates), so pmap and resume hold.
  """
  if int(max_swaps) != max_swaps or max_swaps < 1:
    raise ValueError(f"max_swaps must be an integer >= 1, got {max_swaps}")

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("limit_swaps needs params")

    def one(path, u, a):
      if _last_key(path) != ALPHA:
        return u
      role = _key_name(path[-2]) if len(path) > 1 else ""
      if role not in sparsity:
        raise ValueError(f"limit_swaps has no sparsity for layer {role!r}; have {sorted(sparsity)}")
      p = a.shape[0]
      return _limited(a, u, pattern.num_kept(p, p, sparsity[role]), int(max_swaps))

    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


ALPHA_UPDATES = ("adam", "layer")


def wrap(tx: optax.GradientTransformation, l1: float = 0.0, alpha_lr: float = 1.0,
         select_every: int = 1, select_after: int = 0, alpha_update: str = "adam",
         lr: optax.ScalarOrSchedule | None = None,
         hold: tuple[str, ...] = (), max_swaps: int = 0,
         sparsity: dict[str, float] | None = None) -> optax.GradientTransformation:
  """tx with an l1 penalty on alpha before it and alpha's updates x `alpha_lr` after it.

  `alpha_update` 'adam' leaves alpha to tx (per-coordinate Adam: every alpha moves about
  lr per step, noise or not); 'layer' takes alpha out of tx and steps it by its gradient
  divided by the RMS of its layer's P entries, with momentum 0.9, at learning rate `lr`
  (tx's): each diagonal moves in proportion to its share of the layer's signal.

  `select_every` n > 1 holds alpha's updates back and applies their sum every n steps
  (optax.apply_every), so the top-K selection can change only every n steps: flicker
  between near-tied diagonals cancels inside a window instead of swapping diagonals in
  and out at every step. `select_after` w > 0 zeroes alpha's updates for the first w steps
  (tx's state, Adam's moments, still accumulates): the selection holds its random start
  while the values train, instead of reshuffling on the noise of untrained values.
  `hold` names layers (any key of the param path, e.g. a role 'qkv' or 'attn_out') whose
  alpha never moves: their selection stays the random start (static random diagonals)
  while the other layers learn theirs.
  `max_swaps` n > 0 lets each layer's top-K change by at most n diagonals a step
  (`limit_swaps`; needs `sparsity`, {layer role: sparsity}); 0: no limit.

  Pass `decay_mask` as the `mask=` of decoupled weight decay (e.g. optax.adamw) so that
  alpha is never decayed. The alpha terms are masked by param name to `alpha` (which
  leaves at the freeze).
  """
  if alpha_lr <= 0:
    raise ValueError(f"alpha_lr must be > 0, got {alpha_lr}")
  if int(select_every) != select_every or select_every < 1:
    raise ValueError(f"select_every must be an integer >= 1, got {select_every}")
  if int(select_after) != select_after or select_after < 0:
    raise ValueError(f"select_after must be an integer >= 0, got {select_after}")
  if alpha_update not in ALPHA_UPDATES:
    raise ValueError(f"unknown alpha_update {alpha_update!r}; choose one of {ALPHA_UPDATES}")
  if isinstance(hold, str) or not all(isinstance(n, str) and n for n in hold):
    raise ValueError(f"hold must be a tuple of layer names, got {hold!r}")
  if int(max_swaps) != max_swaps or max_swaps < 0:
    raise ValueError(f"max_swaps must be an integer >= 0, got {max_swaps}")
  if max_swaps and sparsity is None:
    raise ValueError("max_swaps > 0 needs `sparsity`, {layer role: sparsity}")
  parts = [optax.masked(add_l1(l1), alpha_mask)] if l1 else []
  if alpha_update == "adam":
    parts.append(tx)
  else:
    if lr is None:
      raise ValueError("alpha_update='layer' needs the learning rate `lr`")
    not_alpha = lambda p: jax.tree.map(lambda m: not m, alpha_mask(p))
    parts.append(optax.masked(tx, not_alpha))
    parts.append(optax.masked(optax.chain(scale_by_leaf_rms(), optax.trace(0.9),
                                          optax.scale_by_learning_rate(lr)), alpha_mask))
  if alpha_lr != 1.0:
    parts.append(optax.masked(optax.scale(alpha_lr), alpha_mask))
  if select_after > 0:
    w = int(select_after)
    parts.append(optax.masked(optax.scale_by_schedule(lambda n: (n >= w).astype(jnp.float32)),
                              alpha_mask))
  if select_every > 1:
    parts.append(optax.masked(optax.apply_every(int(select_every)), alpha_mask))
  if hold:
    parts.append(optax.masked(optax.set_to_zero(), held_alpha_mask(tuple(hold))))
  if max_swaps:
    parts.append(limit_swaps(int(max_swaps), dict(sparsity)))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)
