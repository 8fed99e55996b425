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
  layer = dd.DiagDense(n, sparsity=s, backend="dense", recipe=dd.recipe.PAPER)  # soft_topk
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
  v = dd.DiagDense(10, sparsity=0.6, recipe=dd.recipe.PAPER).init(jax.random.PRNGKey(0),
                                                                   jnp.ones((1, 25)))
  chex.assert_shape([v["params"]["alpha"], v["params"]["values"], v["params"]["bias"]],
                    [(25,), (25, 10), (10,)])
  np.testing.assert_allclose(v["params"]["alpha"], 1 / 25)
  # the phase is configuration, not state; the gate is recorded for the freeze
  assert set(v["dynadiag"]) == {"k", "in_features", "gate"}
  assert int(v["dynadiag"]["k"]) == pattern.num_kept(25, 10, 0.6)
  assert int(v["dynadiag"]["in_features"]) == 25
  assert int(v["dynadiag"]["gate"]) == gates.code("soft_topk")
  assert gates.name_of(int(v["dynadiag"]["gate"])) == "soft_topk"


@pytest.mark.parametrize("m,n,s", [(256, 128, 0.9), (128, 256, 0.75)])
def test_init_matches_dense_effective_variance(m, n, s):
  x = jnp.ones((1, m))
  v = dd.DiagDense(n, sparsity=s, recipe=dd.recipe.PAPER).init(jax.random.PRNGKey(1), x)
  w = _w_eff(v["params"], m, n, pattern.num_kept(m, n, s), max(m, n),
             dd.diag_dense.DEFAULT_TEMPERATURE)
  wd = nn.Dense(n).init(jax.random.PRNGKey(1), x)["params"]["kernel"]
  np.testing.assert_allclose(np.var(w), np.var(wd), rtol=0.1)
  np.testing.assert_allclose(np.var(w), 1 / m, rtol=0.1)


def test_jit_vmap_pmap_and_bf16(rng):
  layer = dd.with_phase(dd.DiagDense(6, sparsity=0.5))  # level 1: every diagonal
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
  yb = dd.with_phase(dd.DiagDense(6, sparsity=0.5, dtype=jnp.bfloat16)).apply(v, x)
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
      dd.with_phase(layer, **kw)  # at once, before any apply
    with pytest.raises(ValueError, match=msg):
      dd.Phase(**kw)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    dd.with_phase(layer, 0.5, temperature=0.0).apply(v, x)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return dd.DiagDense(5, sparsity=0.5, backend="dense", recipe=dd.recipe.PAPER, name="a")(x)


class _Net(nn.Module):
  """A plain Flax model (no LayerFactory, no phase fields): a DiagDense inside a nested block."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(nn.relu(_Block(name="blk")(x)))


def test_with_phase_reaches_a_diag_dense_deep_in_any_module(rng):
  net = _Net()
  x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  v = _randomize(net.init(jax.random.PRNGKey(0), x), rng)  # init needs no phase
  assert dd.exploring_layers(v) == [("blk", "a")]
  p = v["params"]
  k = pattern.num_kept(8, 5, 0.5)
  ys = {}
  for level in (0.0, 0.5, 1.0):
    ys[level] = y = dd.with_phase(net, level, 0.3).apply(v, x)
    with dd.Phase(level, 0.3).active():  # the same phase as a context
      chex.assert_trees_all_equal(net.apply(v, x), y)
    chex.assert_trees_all_equal(dd.with_phase(dd.with_phase(net, 1.0), level, 0.3).apply(v, x), y)
    w = _w_eff(p["blk"]["a"], 8, 5, k, dd.schedules.k_active(8, k, level), 0.3)
    h = jax.nn.relu(x @ w + p["blk"]["a"]["bias"])
    chex.assert_trees_all_close(y, h @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5,
                                atol=1e-5)
  assert float(jnp.abs(ys[0.0] - ys[1.0]).max()) > 1e-3  # the level reached the layer
  with pytest.raises(dd.PhaseError, match="DiagDense 'blk/a' is exploring"):
    net.apply(v, x)
  frozen, _ = dd.freeze(v, temperature=0.3)  # frozen layers need no phase, and ignore one
  chex.assert_trees_all_close(net.apply(frozen, x), ys[0.0], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(dd.with_phase(net, 1.0, 2.0).apply(frozen, x), net.apply(frozen, x))


def test_init_computes_every_diagonal_and_apply_needs_a_phase(rng):
  layer = dd.DiagDense(6, sparsity=0.5, backend="dense", recipe=dd.recipe.PAPER)
  x = jnp.asarray(rng.normal(size=(3, 12)), jnp.float32)
  y, v = layer.init_with_output(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_close(y, dd.with_phase(layer, 1.0).apply(v, x), rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(y - dd.with_phase(layer, 0.0).apply(v, x)).max()) > 1e-3
  with pytest.raises(dd.PhaseError, match="without a phase"):
    layer.apply(v, x)


@pytest.mark.parametrize("kw,msg", [
    (dict(sparsity=1.2), "sparsity must lie in"), (dict(sparsity=1.0), "sparsity must lie in"),
    (dict(sparsity=-0.1), "sparsity must lie in"), (dict(backend="nonsense"), "backend"),
    (dict(block=0), "block must be an integer >= 1"),
    (dict(features=0), "features must be an integer >= 1")])
def test_bad_settings_raise_when_the_layer_is_built(kw, msg):
  with pytest.raises(ValueError, match=msg):
    dd.DiagDense(**{"features": 4, **kw})  # construction alone, before any init


def test_bad_factory_settings_raise_when_the_factory_is_built():
  with pytest.raises(ValueError, match="DiagDense 'a': sparsity must lie in"):
    dd.LayerFactory.from_dict({"a": 1.2})
  with pytest.raises(ValueError, match="backend"):
    dd.LayerFactory.from_dict({"a": 0.5}, backend="nonsense")
  with pytest.raises(ValueError, match="block must be an integer >= 1"):
    dd.LayerFactory.from_dict({"a": 0.5}, block=0)
  with pytest.raises(ValueError, match="DiagDense 'fc': sparsity"):
    dd.DiagDense(4, sparsity=1.2, name="fc")
  with pytest.raises(TypeError, match="recipe must be"):
    dd.DiagDense(4, recipe="paper")


def test_input_errors_name_the_layer_by_its_path():
  net = _Net()
  v = net.init(jax.random.PRNGKey(0), jnp.ones((2, 7)))
  with pytest.raises(ValueError, match="DiagDense 'blk/a' was initialised for 7 input "
                                       "features, got x with 9 on its last axis"):
    dd.with_phase(net, 0.5).apply(v, jnp.ones((2, 9)))
  frozen, _ = dd.freeze(v)
  with pytest.raises(ValueError, match="DiagDense 'blk/a' was frozen for 7 input features, "
                                       "got x with 9 on its last axis"):
    net.apply(frozen, jnp.ones((2, 9)))
  with pytest.raises(ValueError, match="takes inputs with a feature axis, got a 0-D input"):
    dd.DiagDense(4).init(jax.random.PRNGKey(0), jnp.float32(1.0))


def test_st_topk_layer_is_a_k_diagonal_layer_and_freeze_keeps_it(rng):
  m, n, s = 64, 32, 0.8
  k = pattern.num_kept(m, n, s)
  layer = dd.DiagDense(n, sparsity=s, recipe=dd.Recipe(gate="st_topk"), backend="dense")
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
  frozen, _ = dd.freeze(v)  # the gate recorded at init: st_topk
  assert isinstance(frozen["dynadiag"]["offsets"], dd.static.StaticArray)
  np.testing.assert_array_equal(np.asarray(frozen["dynadiag"]["offsets"]), o)
  np.testing.assert_array_equal(dd.static.arrays(frozen["dynadiag"])["offsets"], o)
  np.testing.assert_array_equal(frozen["params"]["values"], vals[o])  # gates of 1 fold to nothing
  chex.assert_trees_all_close(layer.apply(frozen, x), dd.with_phase(layer, 0.0, 0.3).apply(v, x),
                              rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("level", [1.0, 0.5])
def test_st_topk_shadow_same_forward_dense_value_grad(level, rng):
  m, n, s = 32, 16, 0.75
  x = jnp.asarray(rng.normal(size=(3, m)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
  lay = {g: dd.with_phase(dd.DiagDense(n, sparsity=s, recipe=dd.Recipe(gate=g), backend="dense"),
                          level, 0.5)
         for g in ("st_topk", "st_topk_shadow")}
  vs = {g: l.init(jax.random.PRNGKey(3), x) for g, l in lay.items()}  # each records its gate
  chex.assert_trees_all_equal(vs["st_topk"]["params"], vs["st_topk_shadow"]["params"])
  v = vs["st_topk"]
  grads = {g: jax.grad(lambda p, l=l, g=g: (l.apply({**vs[g], "params": p}, x) * c).sum())(
      v["params"]) for g, l in lay.items()}
  np.testing.assert_array_equal(lay["st_topk_shadow"].apply(vs["st_topk_shadow"], x),
                                lay["st_topk"].apply(v, x))
  chex.assert_trees_all_close(grads["st_topk_shadow"]["alpha"], grads["st_topk"]["alpha"], rtol=1e-6)
  act = _top(v["params"]["alpha"], dd.schedules.k_active(m, pattern.num_kept(m, n, s), level))
  # shadow: every active diagonal's values get dL/dW on that diagonal (the gates' 0/1 dropped)
  dw = x.T @ c  # dL/dW of the linear loss
  want = np.zeros_like(np.asarray(v["params"]["values"]))
  want[act] = pattern.gather_diagonals(dw, act, m, n, 1)
  chex.assert_trees_all_close(grads["st_topk_shadow"]["values"], want, rtol=1e-5, atol=1e-5)
  k = pattern.num_kept(m, n, s)
  assert int((np.abs(np.asarray(grads["st_topk"]["values"])).sum(1) > 0).sum()) == k


def test_variables_keep_the_gate_they_were_made_with(rng):
  x = jnp.asarray(rng.normal(size=(3, 16)), jnp.float32)
  soft = dd.DiagDense(8, sparsity=0.5, backend="dense", recipe=dd.recipe.PAPER)
  v = _randomize(soft.init(jax.random.PRNGKey(0), x), rng)
  hard = dd.DiagDense(8, sparsity=0.5, backend="dense")  # the default recipe: st_topk_shadow
  with pytest.raises(ValueError, match="has recipe gate 'st_topk_shadow' but its variables were "
                                       "made with gate 'soft_topk'"):
    dd.with_phase(hard, 0.5).apply(v, x)
  # the freeze folds the recorded soft gates (at the temperature given), not the default's
  frozen, _ = dd.freeze(v, temperature=0.3)
  chex.assert_trees_all_close(soft.apply(frozen, x), dd.with_phase(soft, 0.0, 0.3).apply(v, x),
                              rtol=1e-5, atol=1e-5)


def test_one_default_recipe_everywhere():
  import inspect  # pylint: disable=g-import-not-at-top
  assert gates.DEFAULT == "st_topk_shadow" and gates.PAPER == "soft_topk"  # docs/RESULTS.md
  assert dd.recipe.DEFAULT.gate == gates.DEFAULT and dd.recipe.PAPER.gate == gates.PAPER
  assert dd.DiagDense(4).recipe == dd.LayerFactory().recipe == dd.recipe.DEFAULT
  assert dd.DiagDense(4).recipe.gate == dd.LayerFactory().recipe.gate == gates.DEFAULT
  assert dd.LayerFactory.from_dict({"l": 0.5})("l", 4).recipe == dd.recipe.DEFAULT
  assert dd.recipe.get("default") is dd.recipe.DEFAULT and dd.recipe.get("paper") is dd.recipe.PAPER
  for fn in (dd.freeze, dd.advance):  # the gate is read from the variables
    assert "gate" not in inspect.signature(fn).parameters
  v = dd.DiagDense(8, sparsity=0.75).init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
  assert int(v["dynadiag"]["gate"]) == gates.code(gates.DEFAULT)
  a = np.asarray(v["params"]["alpha"])
  assert len(np.unique(a)) == 8  # a hard gate's tie-break init, spread 1e-3
  assert a.min() >= 1 / 8 and a.max() < (1 + 1e-3) / 8
