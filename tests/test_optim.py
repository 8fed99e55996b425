"""The optax chain touches alpha only: l1, no decay, frozen after freeze_step."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import dynadiag_jax as dd
from dynadiag_jax import optim


def _params(rng):
  return {"l": {"alpha": jnp.asarray(rng.normal(size=6), jnp.float32),
                "values": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
          "d": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}


def test_masks_by_name(rng):
  p = _params(rng)
  assert optim.alpha_mask(p) == {"l": {"alpha": True, "values": False, "bias": False},
                                 "d": {"kernel": False}}
  assert optim.decay_mask(p) == {"l": {"alpha": False, "values": True, "bias": False},
                                 "d": {"kernel": True}}


def test_l1_on_alpha_only(rng):
  p = _params(rng)
  g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
  base = optax.sgd(1.0)
  tx = optim.wrap(base, dd.Recipe(l1=0.3))
  u, _ = tx.update(g, tx.init(p), p)
  u0, _ = base.update(g, base.init(p), p)
  chex.assert_trees_all_close(u["l"]["alpha"], u0["l"]["alpha"] - 0.3 * jnp.sign(p["l"]["alpha"]))
  for path in (("l", "values"), ("l", "bias"), ("d", "kernel")):
    chex.assert_trees_all_close(u[path[0]][path[1]], u0[path[0]][path[1]])


def test_adamw_with_decay_mask_never_decays_alpha(rng):
  p = _params(rng)
  zero = jax.tree.map(jnp.zeros_like, p)
  tx = optim.wrap(optax.adamw(0.1, weight_decay=0.5, mask=optim.decay_mask))
  u, _ = tx.update(zero, tx.init(p), p)
  chex.assert_trees_all_close(u["l"]["alpha"], jnp.zeros(6))
  chex.assert_trees_all_close(u["l"]["values"], -0.1 * 0.5 * p["l"]["values"])


def test_wrap_without_l1_is_the_transform_itself():
  tx = optax.adam(0.1)
  assert optim.wrap(tx) is tx
  for recipe in ("default", "paper", dd.recipe.DEFAULT, dd.recipe.PAPER):
    assert optim.wrap(tx, recipe) is tx
  with pytest.raises(ValueError, match="unknown recipe"):
    optim.wrap(tx, "nonsense")


def test_alpha_lr_scales_alpha_updates_only(rng):
  p = _params(rng)
  g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
  base = optax.adam(0.1)
  u0, _ = base.update(g, base.init(p), p)
  tx = optim.wrap(base, dd.Recipe(l1=0.3, alpha_lr=10.0))
  u, _ = tx.update(g, tx.init(p), p)
  g1 = {**g, "l": {**g["l"], "alpha": g["l"]["alpha"] + 0.3 * jnp.sign(p["l"]["alpha"])}}
  u1, _ = base.update(g1, base.init(p), p)
  chex.assert_trees_all_close(u["l"]["alpha"], 10.0 * u1["l"]["alpha"], rtol=1e-6)
  chex.assert_trees_all_close((u["l"]["values"], u["d"]), (u0["l"]["values"], u0["d"]))
  frozen = {"l": {k: v for k, v in p["l"].items() if k != "alpha"}, "d": p["d"]}  # no alpha
  fg = jax.tree.map(jnp.ones_like, frozen)
  uf, _ = tx.update(fg, tx.init(frozen), frozen)
  chex.assert_trees_all_close(uf, base.update(fg, base.init(frozen), frozen)[0])
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match="alpha_lr"):
      dd.Recipe(alpha_lr=bad)
  with pytest.raises(ValueError, match="l1"):
    dd.Recipe(l1=-0.1)


def test_hold_zeroes_alpha_updates_of_the_named_layers_only(rng):
  p = {**_params(rng), "attn_out": {"alpha": jnp.ones(5), "values": jnp.ones((5, 3))}}
  assert optim.held_alpha_mask(("attn_out",))(p) == {
      "l": {"alpha": False, "values": False, "bias": False}, "d": {"kernel": False},
      "attn_out": {"alpha": True, "values": False}}
  base = optax.adam(0.1)
  tx = optim.wrap(base, dd.Recipe(experimental=dd.recipe.Experimental(hold=("attn_out",))))
  st, st_ref = tx.init(p), base.init(p)
  g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
  u, _ = tx.update(g, st, p)
  u_ref, _ = base.update(g, st_ref, p)
  chex.assert_trees_all_close(u["attn_out"]["alpha"], jnp.zeros(5))
  assert float(jnp.abs(u_ref["attn_out"]["alpha"]).min()) > 0  # the hold is what zeroes it
  chex.assert_trees_all_close((u["l"], u["d"], u["attn_out"]["values"]),
                              (u_ref["l"], u_ref["d"], u_ref["attn_out"]["values"]))
  for bad in ("attn_out", ("",), (3,)):
    with pytest.raises(ValueError, match="hold"):
      dd.recipe.Experimental(hold=bad)
