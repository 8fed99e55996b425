"""DiagDense against an independently built x @ W_eff + b, gradients, init and transforms."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynadiag_jax as dd
from dynadiag_jax import gates, pattern


def _top(alpha, ka):
  """The top-K_active offsets of alpha, sorted."""
  return np.sort(np.argsort(-np.asarray(alpha), kind="stable")[:ka])


def _w_eff(params, m, n, k, ka, temperature):
  """W_eff from densify: gates on the top-K_active diagonals of alpha."""
  g = gates.soft_topk(params["alpha"], k, temperature)
  o = _top(params["alpha"], ka)
  return pattern.densify(np.asarray(g)[o, None] * np.asarray(params["values"])[o], o, m, n)


def _randomize(v, rng):
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), v["params"])
  return {**v, "params": params}


@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])  # K_active = K, between, P
@pytest.mark.parametrize("m,n,s", [(20, 12, 0.75), (12, 20, 0.5), (16, 16, 0.9), (7, 3, 0.0)])
def test_equals_dense_reference_and_grads(m, n, s, level, rng):
  layer = dd.DiagDense(n, sparsity=s, backend="dense", gate=gates.PAPER)  # soft_topk
  x = jnp.asarray(rng.normal(size=(2, 3, m)), jnp.float32)
  v = _randomize(layer.init(jax.random.PRNGKey(0), x), rng)
  layer = dd.with_phase(layer, level, temperature=0.3)
  k = pattern.num_kept(m, n, s)
  ka = dd.schedules.k_active(max(m, n), k, level)
  w = _w_eff(v["params"], m, n, k, ka, 0.3)
  y = layer.apply(v, x)
  chex.assert_shape(y, (2, 3, n))
  chex.assert_trees_all_close(y, x @ w + v["params"]["bias"], rtol=1e-5, atol=1e-5)

  c = jnp.asarray(rng.normal(size=(2, 3, n)), jnp.float32)
  loss = lambda p, x: (layer.apply({**v, "params": p}, x) * c).sum()

  o = _top(v["params"]["alpha"], ka)

  def ref_loss(p, x):
    g = gates.soft_topk(p["alpha"], k, 0.3)
    w = jnp.zeros((m, n)).at[tuple(jnp.asarray(a)[o] for a in pattern.diagonal_coords(m, n))].set(
        g[o, None] * p["values"][o])
    return ((x @ w + p["bias"]) * c).sum()

  got = jax.grad(loss, argnums=(0, 1))(v["params"], x)
  want = jax.grad(ref_loss, argnums=(0, 1))(v["params"], x)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_params_and_collection_layout():
  v = dd.DiagDense(10, sparsity=0.6, gate="soft_topk").init(jax.random.PRNGKey(0), jnp.ones((1, 25)))
  chex.assert_shape([v["params"]["alpha"], v["params"]["values"], v["params"]["bias"]],
                    [(25,), (25, 10), (10,)])
  np.testing.assert_allclose(v["params"]["alpha"], 1 / 25)
  assert set(v["dynadiag"]) == {"k", "in_features"}  # the phase is configuration, not state
  assert int(v["dynadiag"]["k"]) == pattern.num_kept(25, 10, 0.6)


@pytest.mark.parametrize("m,n,s", [(256, 128, 0.9), (128, 256, 0.75)])
def test_init_matches_dense_effective_variance(m, n, s):
  x = jnp.ones((1, m))
  v = dd.DiagDense(n, sparsity=s, gate="soft_topk").init(jax.random.PRNGKey(1), x)
  w = _w_eff(v["params"], m, n, pattern.num_kept(m, n, s), max(m, n),
             dd.diag_dense.DEFAULT_TEMPERATURE)
  wd = nn.Dense(n).init(jax.random.PRNGKey(1), x)["params"]["kernel"]
  np.testing.assert_allclose(np.var(w), np.var(wd), rtol=0.1)
  np.testing.assert_allclose(np.var(w), 1 / m, rtol=0.1)


def test_jit_vmap_pmap_and_bf16(rng):
  layer = dd.DiagDense(6, sparsity=0.5)
  x = jnp.asarray(rng.normal(size=(4, 2, 9)), jnp.float32)
  v = layer.init(jax.random.PRNGKey(0), x[0])
  y = layer.apply(v, x)
  chex.assert_trees_all_close(jax.jit(layer.apply)(v, x), y, jax.vmap(lambda a: layer.apply(v, a))(x),
                              rtol=1e-6)
  nd = jax.local_device_count()
  xp = jnp.asarray(rng.normal(size=(nd, 2, 9)), jnp.float32)
  vp = jax.tree.map(lambda a: jnp.broadcast_to(a, (nd,) + a.shape), v)
  yp = jax.pmap(layer.apply)(vp, xp)
  chex.assert_trees_all_close(yp, layer.apply(v, xp), rtol=1e-6)
  yb = dd.DiagDense(6, sparsity=0.5, dtype=jnp.bfloat16).apply(v, x)
  assert yb.dtype == jnp.bfloat16


def test_apply_writes_no_state_and_the_level_is_static(rng):
  """Applying never changes the collection; each level is its own trace."""
  layer = dd.DiagDense(5, sparsity=0.5)
  x = jnp.ones((1, 8))
  v = _randomize(layer.init(jax.random.PRNGKey(0), x), rng)
  for level in (0.0, 1.0):
    _, upd = dd.with_phase(layer, level).apply(v, x, mutable=["dynadiag"])
    chex.assert_trees_all_equal(upd["dynadiag"], v["dynadiag"])
  traces = []

  @jax.jit
  def f(v, t):
    traces.append(1)
    return dd.with_phase(layer, 0.0, t).apply(v, x)

  f(v, 0.3)
  f(v, 0.2)  # a new temperature is a traced value: no new trace
  assert len(traces) == 1


def test_with_phase_checks_its_inputs():
  layer = dd.DiagDense(4, sparsity=0.5)
  x = jnp.ones((1, 8))
  v = layer.init(jax.random.PRNGKey(0), x)
  for kw, msg in [({"level": 1.5}, "level must lie in"), ({"level": 0.0, "k_start_fraction": -1},
                                                          "k_start_fraction must lie in")]:
    with pytest.raises(ValueError, match=msg):
      dd.with_phase(layer, **kw)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    dd.with_phase(layer, 0.5, temperature=0.0).apply(v, x)
  with pytest.raises(TypeError, match="LayerFactory"):
    dd.with_phase(nn.Dense(3), 0.5)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="sparsity"):
    dd.DiagDense(4, sparsity=1.0).init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="backend"):
    dd.DiagDense(4, backend="nope").init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="positive"):
    dd.DiagDense(0).init(jax.random.PRNGKey(0), jnp.ones((1, 4)))


def test_st_topk_layer_is_a_k_diagonal_layer_and_freeze_keeps_it(rng):
  m, n, s = 64, 32, 0.8
  k = pattern.num_kept(m, n, s)
  layer = dd.DiagDense(n, sparsity=s, gate="st_topk", backend="dense")
  x = jnp.asarray(rng.normal(size=(3, m)), jnp.float32)
  v = layer.init(jax.random.PRNGKey(2), x)
  a = np.asarray(v["params"]["alpha"])
  assert len(np.unique(a)) == m  # ties broken: the first hard top-K is a random set
  o = np.sort(np.argsort(-a)[:k])
  assert o.max() >= k  # not the K lowest offsets
  vals = np.asarray(v["params"]["values"])
  np.testing.assert_allclose(np.var(vals), 1 / m, rtol=0.15)  # kept entries: nn.Dense's std
  for level in (1.0, 0.5, 0.0):  # K_active = P, between, K
    w = pattern.densify(vals[o], o, m, n)  # gates exactly 1 on the top-K
    chex.assert_trees_all_close(dd.with_phase(layer, level, 0.3).apply(v, x),
                                x @ w + v["params"]["bias"], rtol=1e-5, atol=1e-5)
  frozen, _ = dd.freeze(v, None, gate="st_topk")
  np.testing.assert_array_equal(frozen["dynadiag"]["offsets"], o)
  np.testing.assert_array_equal(frozen["params"]["values"], vals[o])  # gates of 1 fold to nothing
  chex.assert_trees_all_close(layer.apply(frozen, x), dd.with_phase(layer, 0.0, 0.3).apply(v, x),
                              rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("level", [1.0, 0.5])
def test_st_topk_shadow_same_forward_dense_value_grad(level, rng):
  m, n, s = 32, 16, 0.75
  x = jnp.asarray(rng.normal(size=(3, m)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
  lay = {g: dd.with_phase(dd.DiagDense(n, sparsity=s, gate=g, backend="dense"), level, 0.5)
         for g in ("st_topk", "st_topk_shadow")}
  v = lay["st_topk"].init(jax.random.PRNGKey(3), x)
  grads = {g: jax.grad(lambda p, l=l: (l.apply({**v, "params": p}, x) * c).sum())(v["params"])
           for g, l in lay.items()}
  np.testing.assert_array_equal(lay["st_topk_shadow"].apply(v, x), lay["st_topk"].apply(v, x))
  chex.assert_trees_all_close(grads["st_topk_shadow"]["alpha"], grads["st_topk"]["alpha"], rtol=1e-6)
  act = _top(v["params"]["alpha"], dd.schedules.k_active(m, pattern.num_kept(m, n, s), level))
  # shadow: every active diagonal's values get dL/dW on that diagonal (the gates' 0/1 dropped)
  dw = x.T @ c  # dL/dW of the linear loss
  want = np.zeros_like(np.asarray(v["params"]["values"]))
  want[act] = pattern.gather_diagonals(dw, act, m, n, 1)
  chex.assert_trees_all_close(grads["st_topk_shadow"]["values"], want, rtol=1e-5, atol=1e-5)
  k = pattern.num_kept(m, n, s)
  assert int((np.abs(np.asarray(grads["st_topk"]["values"])).sum(1) > 0).sum()) == k


def test_one_default_gate_everywhere():
  import inspect  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  assert gates.DEFAULT == "st_topk_shadow" and gates.PAPER == "soft_topk"  # docs/RESULTS.md
  assert dd.DiagDense(4).gate == dd.LayerFactory().gate == common.base().gate == gates.DEFAULT
  for fn in (dd.freeze, dd.advance):
    assert inspect.signature(fn).parameters["gate"].default == gates.DEFAULT
  v = dd.DiagDense(8, sparsity=0.75).init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
  assert len(np.unique(np.asarray(v["params"]["alpha"]))) == 8  # a hard gate's tie-break init


def test_alpha_spread_sets_the_hard_gates_initial_alpha_range(rng):
  x = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
  p = pattern.num_diagonals(32, 16, 1)
  for spread in (1e-3, 0.5):
    f = dd.LayerFactory.from_dict({"l": 0.8}, gate="st_topk_shadow", alpha_spread=spread)
    a = np.asarray(f("l", 16).init(jax.random.PRNGKey(1), x)["params"]["alpha"])
    assert a.min() >= 1.0 / p and a.max() < (1.0 + spread) / p
    assert a.max() - a.min() > 0.5 * spread / p  # P uniform draws span most of the range
  soft = dd.DiagDense(16, sparsity=0.8, gate="soft_topk", alpha_spread=0.5)
  np.testing.assert_array_equal(soft.init(jax.random.PRNGKey(1), x)["params"]["alpha"], 1.0 / p)


def test_zero_shadow_init_keeps_the_initial_top_k_and_zeroes_the_candidates(rng):
  x = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
  key = jax.random.PRNGKey(2)
  mk = lambda init, block: dd.LayerFactory.from_dict({"l": 0.8}, shadow_init=init,
                                                     block=block)("l", 16)
  for block in (1, 4):
    dflt, layer = mk("random", block), mk("zero", block)
    v0, vz = jax.jit(dflt.init)(key, x), jax.jit(layer.init)(key, x)
    a, k = np.asarray(vz["params"]["alpha"]), int(vz["dynadiag"]["k"])
    np.testing.assert_array_equal(a, v0["params"]["alpha"])
    top = np.sort(np.argsort(-a)[:k])
    rest = np.setdiff1d(np.arange(a.size), top)
    w0, wz = np.asarray(v0["params"]["values"]), np.asarray(vz["params"]["values"])
    np.testing.assert_array_equal(wz[top], w0[top])
    assert not wz[rest].any() and np.abs(w0[rest]).max() > 0
    # the hard forward only sees the top-K: the function at init is unchanged
    chex.assert_trees_all_close(jax.jit(layer.apply)(vz, x), jax.jit(dflt.apply)(v0, x),
                                atol=1e-6, rtol=1e-6)
    # the candidates' shadow gradient is what moves them off zero
    loss = lambda p: layer.apply({**vz, "params": p}, x).sum()
    g = jax.jit(jax.grad(loss))(vz["params"])["values"]
    assert np.abs(np.asarray(g)[rest]).max() > 0
  with pytest.raises(ValueError, match="needs a shadow gate"):
    dd.DiagDense(16, sparsity=0.8, gate="st_topk", shadow_init="zero").init(key, x)
  with pytest.raises(ValueError, match="unknown shadow_init"):
    dd.DiagDense(16, sparsity=0.8, shadow_init="ones").init(key, x)
