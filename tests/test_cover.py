"""Coverage-aware selection (`recipe.cover`, `dd.cover`): optimal against brute force, no
unconnected input or output after the freeze, the same set exploring and frozen, and
nothing changed with cover off."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynadiag_jax as dd
from dynadiag_jax import cover


def _brute(a, k, d):
  """(fewest uncovered long-side blocks, largest sum of alpha among the K-sets that reach it)."""
  p = len(a)
  best = None
  for s in itertools.combinations(range(p), k):
    key = (-cover.uncovered(s, p, d), float(np.sum(a[list(s)], dtype=np.float64)))
    best = key if best is None or key > best else best
  return -best[0], best[1]


def test_select_is_optimal_against_brute_force(rng):
  """Random small (P, D, K), five alphas each (ties included): fewest uncovered blocks, then
  the largest sum of alpha; `dp` alone too (not only where the top-K fails)."""
  for _ in range(12):
    p = int(rng.integers(2, 10))
    d, k = int(rng.integers(1, p + 1)), int(rng.integers(1, p + 1))
    a_TxP = rng.normal(size=(5, p)).astype(np.float32)
    a_TxP[:2] = np.round(a_TxP[:2])  # ties
    got_T = np.asarray(jax.jit(jax.vmap(lambda a: cover.select(a, k, d)))(a_TxP))
    use_dp = d < p and k < p
    if use_dp:
      dp_T = np.asarray(jax.jit(jax.vmap(lambda a: cover.dp(a, k, d)))(a_TxP))
    for t, a in enumerate(a_TxP):
      u, s = _brute(a, k, d)
      for got in (got_T[t],) + ((dp_T[t],) if use_dp else ()):
        assert got.dtype == np.int32 and got.shape == (k,) and np.all(np.diff(got) > 0)
        assert cover.uncovered(got, p, d) == u, (p, d, k, a, got)
        np.testing.assert_allclose(a[got].sum(dtype=np.float64), s, rtol=1e-6, atol=1e-6)


def test_select_under_jit_equals_eager_and_keeps_a_covering_top_k(rng):
  a = jnp.asarray(rng.normal(size=48).astype(np.float32))
  jitted = jax.jit(lambda a: cover.select(a, 5, 12))
  np.testing.assert_array_equal(jitted(a), cover.select(a, 5, 12))
  spread = np.full(48, -1.0, np.float32)
  spread[[3, 13, 22, 31, 42]] = 1.0  # the top-5 already covers: unchanged
  np.testing.assert_array_equal(jitted(jnp.asarray(spread)), [3, 13, 22, 31, 42])
  # infeasible (K * D < P): the fewest uncovered, P - K * D, with no overlaps
  got = np.asarray(cover.select(jnp.asarray(rng.normal(size=64).astype(np.float32)), 7, 5))
  assert cover.uncovered(got, 64, 5) == 64 - 35


@pytest.mark.parametrize("p,d,k", [(3072, 768, 308), (768, 192, 77), (50, 7, 15)])
def test_anchors_connect_everything(rng, p, d, k):
  """Above the budget (large P): a feasible set that keeps most of the top-K."""
  a = rng.normal(size=p).astype(np.float32)
  assert cover.method(p, d, k, budget=0) == "anchors"
  got = np.asarray(cover.select(jnp.asarray(a), k, d, budget=0))
  assert np.unique(got).size == k and cover.uncovered(got, p, d) == 0
  top = np.argsort(-a)[:k]
  assert len(set(got) & set(top)) >= k - -(-p // ((d + 1) // 2))


def _layer(m, n, b, cov, gate="st_topk"):
  r = dd.recipe.DEFAULT.replace(cover=cov, gate=gate)
  return dd.DiagDense(n, sparsity=0.9, block=b, recipe=r, backend="dense")


@pytest.mark.parametrize("m,n,b", [(128, 512, 16), (3072, 768, 64), (40, 512, 8), (48, 96, 1)])
def test_no_unconnected_after_freeze_with_cover(rng, m, n, b):
  """Random alphas: with cover the frozen layer connects every input and output (or all but
  the P - K D blocks no K windows can reach); the same alphas without cover leave more out."""
  x = jnp.ones((1, m))
  lost = [0, 0]
  for cov in (False, True):
    layer = _layer(m, n, b, cov)
    v = layer.init(jax.random.PRNGKey(0), x)
    p = v["params"]["alpha"].shape[0]
    for seed in range(2):
      alpha = np.random.default_rng(seed).normal(size=p).astype(np.float32)
      v["params"]["alpha"] = jnp.asarray(alpha)
      frozen, _ = dd.freeze(v)
      dead = dd.summary.unconnected(frozen, dd.linear_calls(layer, frozen, x)[0])
      assert dd.summary.unconnected(v, dd.linear_calls(layer, v, x)[0]) == dead
      if cov:  # none, or the fewest possible (P - K D blocks) when K D < P
        c = dd.linear_calls(layer, frozen, x)[0]
        assert dead == (0, b * max(0, c.p - c.k * c.d)), (m, n, b, seed)
      lost[cov] += sum(dead)
  if b > 1:
    assert lost[0] > lost[1]


def test_cover_off_changes_nothing():
  """No `cover` record, the top-K of alpha kept, gates as before."""
  layer = _layer(64, 256, 32, False)
  x = jnp.ones((2, 64))
  v = layer.init(jax.random.PRNGKey(0), x)
  assert "cover" not in v["dynadiag"]
  frozen, _ = dd.freeze(v)
  want = np.asarray(dd.gates.topk_indices(v["params"]["alpha"], 1))
  np.testing.assert_array_equal(np.asarray(frozen["dynadiag"]["offsets"]), want)


@pytest.mark.parametrize("gate", ["st_topk_shadow", "soft_topk"])
def test_exploring_keeps_what_the_freeze_keeps(rng, gate):
  """At the last level (K_active = K) the exploring layer computes the covering set, with
  hard gates exactly the frozen layer's function; its gates and K_active set contain it."""
  m, n, b = 64, 512, 8  # P = 64, D = 8, K = 7: infeasible, the fewest left out
  layer = _layer(m, n, b, True, gate)
  x = jnp.asarray(rng.normal(size=(3, m)).astype(np.float32))
  v = layer.init(jax.random.PRNGKey(1), x)
  v["params"]["alpha"] = jnp.asarray(rng.normal(size=64).astype(np.float32))
  frozen, _ = dd.freeze(v, temperature=0.05)
  assert dd.summary.unconnected(frozen, dd.linear_calls(layer, frozen, x)[0]) == (0, 64 * 8 - 7 * 64)
  run = jax.jit(lambda v, x, t: dd.with_phase(layer, 0.0, t).apply(v, x))
  np.testing.assert_allclose(run(v, x, 0.05), layer.apply(frozen, x), rtol=1e-5, atol=1e-5)
  kept = np.asarray(frozen["dynadiag"]["offsets"])
  half = jnp.asarray(cover.active(v["params"]["alpha"], 20, jnp.asarray(kept)))
  assert set(kept) <= set(np.asarray(half).tolist())


def test_cover_records_and_refuses_another_recipe():
  x = jnp.ones((1, 64))
  v = _layer(64, 256, 32, True).init(jax.random.PRNGKey(0), x)
  assert int(v["dynadiag"]["cover"]) == 1
  with pytest.raises(ValueError, match="cover=True"):
    dd.with_phase(_layer(64, 256, 32, False), 0.0).apply(v, x)
  plain = _layer(64, 256, 32, False).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="recipe.cover=True"):
    dd.with_phase(_layer(64, 256, 32, True), 0.0).apply(plain, x)
  with pytest.raises(TypeError, match="cover"):
    dd.Recipe(cover="yes")


def test_a_recipe_block_with_cover_is_capped_where_k_diagonals_can_cover(rng):
  """With recipe.cover a layer takes the largest block <= the recipe's whose K diagonals can
  reach every input and output (K D >= P); a layer's own block is never capped."""
  for _ in range(20):
    m, n = (int(rng.choice([64, 96, 128, 256, 384])) for _ in range(2))
    s, top = float(rng.choice([0.5, 0.9, 0.95, 0.99])), int(rng.choice([8, 32, 64]))
    ok = [b for b in dd.pattern.valid_blocks(m, n) if b <= top and
          dd.pattern.num_kept(m, n, s, b) * dd.pattern.Geometry(m, n, b).D
          >= dd.pattern.Geometry(m, n, b).P]
    assert dd.pattern.largest_covering_block(m, n, s, top) == max(ok, default=1), (m, n, s, top)
  assert [dd.pattern.largest_covering_block(256, 768, s, 64) for s in (0.9, 0.95)] == [32, 16]
  x = jnp.ones((2, 256), jnp.float32)
  r = dd.Recipe(block=64, cover=True)
  assert dd.linear_calls(dd.with_phase(dd.DiagDense(768, recipe=r)), None, x)[0].block == 32
  own = dd.DiagDense(768, block=64, recipe=r)
  assert dd.linear_calls(dd.with_phase(own), None, x)[0].block == 64
  plain = dd.DiagDense(768, recipe=r.replace(cover=False))
  assert dd.linear_calls(dd.with_phase(plain), None, x)[0].block == 64
