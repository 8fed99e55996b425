"""Optax pieces for DynaDiag: l1 on `alpha`, decay masks, and freezing `alpha`."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

ALPHA = "alpha"


def _last_key(path) -> str:
  k = path[-1] if path else None
  return str(getattr(k, "key", getattr(k, "name", k)))


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


class StopAfterState(NamedTuple):
  count: chex.Array


def stop_after(step: int) -> optax.GradientTransformation:
  """Zeroes the updates from update number `step` on (alpha is fixed after freezing)."""

  def init(_):
    return StopAfterState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    keep = state.count < step
    updates = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), updates)
    return updates, StopAfterState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def wrap(tx: optax.GradientTransformation, l1: float = 0.0,
         freeze_step: int | None = None) -> optax.GradientTransformation:
  """tx with an l1 penalty on alpha before it and alpha's updates cut from freeze_step on.

  Pass `decay_mask` as the `mask=` of decoupled weight decay (e.g. optax.adamw) so that
  alpha is never decayed. Every extra piece is masked by param name to `alpha`.
  """
  parts = []
  if l1:
    parts.append(optax.masked(add_l1(l1), alpha_mask))
  parts.append(tx)
  if freeze_step is not None:
    parts.append(optax.masked(stop_after(freeze_step), alpha_mask))
  return optax.chain(*parts)
