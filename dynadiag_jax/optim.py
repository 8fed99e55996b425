"""Optax pieces for DynaDiag: the recipe's alpha terms (`wrap`) and decay masks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dynadiag_jax import mixing
from dynadiag_jax import recipe as recipe_lib
from dynadiag_jax.recipe import Recipe

ALPHA = "alpha"


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", k)))


def _last_key(path) -> str:
  return _key_name(path[-1] if path else None)


def alpha_mask(params: Any) -> Any:
  """True on every `alpha` leaf of a params tree."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _last_key(p) == ALPHA, params)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: kernels and diagonal values, not alpha, biases or a
  learned mixing's logits (decay would pull them towards the uniform mix)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _last_key(p) not in (ALPHA, "bias", "scale", mixing.LOGITS) and jnp.ndim(x) > 1,
      params)


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


def wrap(tx: optax.GradientTransformation,
         recipe: Recipe | str = recipe_lib.DEFAULT) -> optax.GradientTransformation:
  """tx with the recipe's l1 penalty on alpha before it and alpha's updates x `alpha_lr` after.

  `recipe.experimental.hold` names layers (any key of the param path, e.g. a role 'qkv')
  whose alpha never moves: their selection stays the random start. Pass `decay_mask` as
  the `mask=` of decoupled weight decay (e.g. optax.adamw) so that alpha is never decayed.
  The alpha terms are masked by param name to `alpha` (which leaves at the freeze).
  """
  recipe = recipe_lib.get(recipe)
  parts = [optax.masked(add_l1(recipe.l1), alpha_mask)] if recipe.l1 else []
  parts.append(tx)
  if recipe.alpha_lr != 1.0:
    parts.append(optax.masked(optax.scale(recipe.alpha_lr), alpha_mask))
  if recipe.experimental.hold:
    parts.append(optax.masked(optax.set_to_zero(),
                              held_alpha_mask(recipe.experimental.hold)))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)
