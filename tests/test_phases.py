"""The exploration phase of any model (`with_phase`), `advance` and the freeze."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dynadiag_jax as dd


class Net(nn.Module):
  """Two DiagDense layers and a dense head, nested one level, written as a user writes a
  model: no phase fields, no LayerFactory (`dd.with_phase` reaches the layers)."""
  recipe: dd.Recipe = dd.recipe.DEFAULT

  @nn.compact
  def __call__(self, x):
    x = nn.relu(dd.DiagDense(24, sparsity=0.8, recipe=self.recipe, name="a")(x))
    x = nn.relu(Block(self.recipe, name="blk")(x))
    return nn.Dense(3, name="head")(x)


class Block(nn.Module):
  recipe: dd.Recipe

  @nn.compact
  def __call__(self, x):  # same name as the outer layer
    return dd.DiagDense(11, sparsity=0.5, recipe=self.recipe, name="a")(x)


def phased(level: float = 0.0, temperature: float = 0.2, net: nn.Module | None = None):
  """`net` (default Net()) in the phase (level, temperature)."""
  return dd.with_phase(net or Net(), level, temperature)


def _setup(rng, recipe: dd.Recipe = dd.recipe.DEFAULT):
  x = jnp.asarray(rng.normal(size=(5, 17)), jnp.float32)
  net = phased(net=Net(recipe))
  v = net.init(jax.random.PRNGKey(0), x)
  v["params"] = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), v["params"])
  return net, x, v


def test_exploring_layers_and_k_active_per_level(rng):
  net, x, v = _setup(rng)
  assert dd.exploring_layers(v) == [("a",), ("blk", "a")]
  k, p = 5, 24  # num_kept(17, 24, 0.8) = ceil(0.2 * 24) = 5
  for level, want in ((1.0, p), (0.5, k + round(0.5 * (p - k))), (0.0, k)):
    calls = dd.linear_calls(phased(level), v, x)
    assert [c.k_active for c in calls if c.path == ("a",)] == [want]
  with pytest.raises(ValueError, match="level"):
    phased(1.5)


def test_freeze_preserves_outputs_and_drops_alpha(rng):
  net, x, v = _setup(rng)
  tx = optax.adam(1e-3)
  st = tx.init(v["params"])
  grads = jax.grad(lambda p: net.apply({**v, "params": p}, x).sum())(v["params"])
  _, st = tx.update(grads, st, v["params"])
  y0 = net.apply(v, x)
  v2, st2 = dd.freeze(v, st)
  chex.assert_trees_all_close(net.apply(v2, x), y0, atol=1e-5, rtol=1e-5)
  assert set(v2["params"]["a"]) == {"values", "bias"}
  assert set(v2["dynadiag"]["a"]) == {"offsets", "in_features"}
  chex.assert_shape([v2["params"]["a"]["values"], v2["dynadiag"]["a"]["offsets"]], [(5, 17), (5,)])
  chex.assert_shape([v2["params"]["blk"]["a"]["values"], v2["dynadiag"]["blk"]["a"]["offsets"]],
                    [(12, 11), (12,)])
  assert dd.exploring_layers(v2) == []
  # Adam moments gathered with the same rows, each layer by its own choice
  for path, o in ((("a",), v2["dynadiag"]["a"]["offsets"]),
                  (("blk", "a"), v2["dynadiag"]["blk"]["a"]["offsets"])):
    old, new = st[0].mu, st2[0].mu
    for key in path:
      old, new = old[key], new[key]
    assert "alpha" not in new
    chex.assert_trees_all_close(new["values"], old["values"][np.asarray(o)])
  chex.assert_trees_all_equal(st2[0].mu["head"], st[0].mu["head"])
  # the new state steps the new params
  g2 = jax.grad(lambda p: net.apply({**v2, "params": p}, x).sum())(v2["params"])
  upd, _ = tx.update(g2, st2, v2["params"])
  chex.assert_trees_all_equal_shapes(upd, v2["params"])


def test_freeze_keeps_the_top_k_of_alpha(rng):
  net, x, v = _setup(rng)
  v2, _ = dd.freeze(v)
  a = np.asarray(v["params"]["a"]["alpha"])
  np.testing.assert_array_equal(v2["dynadiag"]["a"]["offsets"], np.sort(np.argsort(-a)[:5]))


def test_freeze_rejects_replicated_state(rng):
  net, x, v = _setup(rng)
  rep = jax.tree.map(lambda a: jnp.stack([a, a]), v)
  with pytest.raises(ValueError, match="un-replicated"):
    dd.freeze(rep)


def test_advance_changes_variables_only_at_the_freeze(rng):
  """dd.advance: variables untouched before freeze_step (the level and temperature are
  configuration), the freeze once, then nothing."""
  net, x, v = _setup(rng)
  sched = dd.Schedule(total_steps=10, freeze_fraction=0.5, k_start_fraction=1.0, num_levels=3)
  tx = optax.adam(1e-3)
  st = tx.init(v["params"])
  v0, seen = v, []
  for step in range(11):
    v, st = dd.advance(v, st, sched, step)
    frozen = not dd.exploring_layers(v)
    assert frozen == sched.is_frozen(step)
    if not frozen:
      chex.assert_trees_all_equal(v, v0)
      calls = dd.linear_calls(phased(sched.level(step), float(sched.temperature(step))), v, x)
      seen.append(calls[0].k_active)
    else:
      assert "alpha" not in v["params"]["a"] and "offsets" in v["dynadiag"]["a"]
      assert "alpha" not in str(jax.tree_util.tree_structure(st))
  assert seen == sorted(seen, reverse=True) and len(set(seen)) > 1


def test_advance_after_the_last_step_freezes_a_run_that_explores_to_the_end(rng):
  net, x, v = _setup(rng)
  sched = dd.Schedule(total_steps=4, freeze_fraction=1.0)
  for step in range(4):
    v, _ = dd.advance(v, None, sched, step)
    assert dd.exploring_layers(v)
  y = phased(0.0).apply(v, x)  # the top-K function the freeze keeps
  v, st = dd.advance(v, None, sched, 4)
  assert not dd.exploring_layers(v) and st is None
  chex.assert_trees_all_close(net.apply(v, x), y, atol=1e-5, rtol=1e-5)


def _step_and_freeze(rng, tx):
  """(v, opt state, frozen v, frozen opt state) after one step of tx; no alpha state left."""
  net, x, v = _setup(rng)
  st = tx.init(v["params"])
  grads = jax.grad(lambda p: net.apply({**v, "params": p}, x).sum())(v["params"])
  _, st = tx.update(grads, st, v["params"])
  v2, st2 = dd.freeze(v, st)
  assert "alpha" not in str(jax.tree_util.tree_structure(st2))
  return v, st, v2, st2


def test_freeze_remaps_chained_and_masked_states_by_exact_path(rng):
  not_alpha = lambda p: jax.tree.map(lambda m: not m, dd.optim.alpha_mask(p))
  tx = optax.chain(optax.masked(optax.trace(0.9), not_alpha),  # MaskedNode at alpha
                   optax.inject_hyperparams(optax.adamw)(1e-3, mask=dd.optim.decay_mask))
  tx = dd.optim.wrap(tx, dd.Recipe(l1=1e-3))
  v, st, v2, st2 = _step_and_freeze(rng, tx)
  # the frozen state steps with the frozen params; trace's momentum was gathered by row
  _, st3 = tx.update(jax.tree.map(jnp.zeros_like, v2["params"]), st2, v2["params"])
  o = np.asarray(v2["dynadiag"]["blk"]["a"]["offsets"])
  old_tr, new_tr = st[1][0].inner_state.trace, st2[1][0].inner_state.trace
  chex.assert_trees_all_close(new_tr["blk"]["a"]["values"], old_tr["blk"]["a"]["values"][o])
  chex.assert_trees_all_close(new_tr["head"], old_tr["head"])


def test_freeze_refuses_a_state_it_cannot_remap(rng):
  net, x, v = _setup(rng)
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=4)  # factored moments: not params-shaped
  st = tx.init(v["params"])
  with pytest.raises(ValueError, match="cannot gather the optimizer state"):
    dd.freeze(v, st)


def test_freeze_remaps_the_state_of_a_held_selection(rng):
  recipe = dd.Recipe(experimental=dd.recipe.Experimental(hold=("a",)))
  tx = dd.optim.wrap(optax.adamw(1e-3, mask=dd.optim.decay_mask), recipe)
  _, _, v2, st2 = _step_and_freeze(rng, tx)
  u, _ = tx.update(jax.tree.map(jnp.ones_like, v2["params"]), st2, v2["params"])
  chex.assert_trees_all_equal_structs(u, v2["params"])
