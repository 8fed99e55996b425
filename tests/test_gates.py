"""Soft and hard top-k gates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynadiag_jax import gates


@pytest.mark.parametrize("t", [5.0, 1.0, 0.05, 1e-2, 1e-4])
def test_soft_topk_bounds_and_formula(t, rng):
  a = jnp.asarray(rng.normal(size=200), jnp.float32)
  for k in (1, 7, 50, 200):
    g = gates.soft_topk(a, k, t)
    chex.assert_tree_all_finite(g)
    assert float(g.min()) >= 0 and float(g.max()) <= 1
    assert float(g.sum()) <= k * (1 + 1e-5)
    a64 = np.asarray(a, np.float64) / t
    e = np.exp(a64 - a64.max())
    np.testing.assert_allclose(g, np.minimum(k * e / e.sum(), 1.0), rtol=1e-4, atol=1e-6)


def test_soft_topk_grad_finite_at_tiny_temperature(rng):
  a = jnp.asarray(rng.normal(size=64), jnp.float32)
  g = jax.grad(lambda a: (gates.soft_topk(a, 8, 1e-4) * jnp.arange(64.0)).sum())(a)
  chex.assert_tree_all_finite(g)


def test_soft_topk_low_temperature_picks_the_largest(rng):
  a = jnp.asarray(rng.permutation(100).astype(np.float32))
  g = gates.soft_topk(a, 10, 1e-4)
  assert int(jnp.argmax(g)) == int(jnp.argmax(a)) and float(g.max()) == 1.0


def hard_topk(alpha_P, k):
  """g_P in {0, 1}: 1 on the k largest entries of alpha, the T -> 0 limit of the gates."""
  idx = gates.topk_indices(alpha_P, k)
  return jnp.zeros(alpha_P.shape, alpha_P.dtype).at[idx].set(1)


def test_hard_topk(rng):
  a = jnp.asarray(rng.permutation(50).astype(np.float32))
  h = hard_topk(a, 5)
  assert float(h.sum()) == 5
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(h)), np.sort(np.argsort(-np.asarray(a))[:5]))
  idx = gates.topk_indices(a, 5)
  assert list(np.asarray(idx)) == sorted(np.asarray(idx))


@pytest.mark.parametrize("t", [5.0, 0.05])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_st_topk_forward_is_hard_topk_and_grad_is_soft_topk(k, t, rng):
  a = jnp.asarray(rng.normal(size=64), jnp.float32)
  g = gates.st_topk(a, k, t)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(hard_topk(a, k)))  # exactly 0 / 1
  c = jnp.asarray(rng.normal(size=64), jnp.float32)
  got = jax.grad(lambda a: (gates.st_topk(a, k, t) * c).sum())(a)
  want = jax.grad(lambda a: (gates.soft_topk(a, k, t) * c).sum())(a)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(want).max()) > 0  # the check compares non-trivial gradients
  np.testing.assert_array_equal(np.asarray(jax.jit(gates.st_topk, static_argnums=1)(a, k, t)),
                                np.asarray(g))


def test_gate_names_codes_and_init_gain():
  assert gates.NAMES == ("soft_topk", "st_topk", "st_topk_shadow")
  assert gates.by_name("st_topk") is gates.st_topk
  assert gates.by_name("st_topk_shadow") is gates.st_topk
  assert gates.by_name("soft_topk") is gates.soft_topk
  for name in gates.NAMES:  # the code a layer records round-trips to its gate
    assert gates.name_of(gates.code(name)) == name
  assert sorted(gates.code(n) for n in gates.NAMES) == list(range(len(gates.NAMES)))
  assert gates.init_gain("st_topk", 8, 64) == gates.init_gain("st_topk_shadow", 8, 64) == 1.0
  assert gates.init_gain("soft_topk", 8, 64) == 8.0
  for bad in ("hard", "capped_topk"):
    with pytest.raises(ValueError, match="unknown gate"):
      gates.by_name(bad)
    with pytest.raises(ValueError, match="unknown gate"):
      gates.code(bad)
  with pytest.raises(ValueError, match="unknown gate"):
    gates.init_gain("capped_topk", 8, 64)
  for bad in (-1, len(gates.NAMES)):
    with pytest.raises(ValueError, match="unknown gate code"):
      gates.name_of(bad)
  with pytest.raises(ValueError, match="k must lie"):
    gates.st_topk(jnp.ones(4), 5, 1.0)
