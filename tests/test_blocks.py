"""Block-diagonal DiagDense (block = b): geometry through the layer, freeze, errors, drop-in args."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynadiag_jax as dd
from dynadiag_jax import gates, ops, pattern


def _w_eff(params, m, n, b, k, ka, temperature):
  """W_eff built independently: gates times values on the top-K_active block-diagonals."""
  g = np.asarray(gates.soft_topk(params["alpha"], k, temperature), np.float64)
  o = np.sort(np.argsort(-np.asarray(params["alpha"]), kind="stable")[:ka])
  v = np.asarray(params["values"], np.float64)
  mb, nb = m // b, n // b
  w = np.zeros((m, n))
  for p in o:
    for t in range(min(mb, nb)):
      r, c = ((p + t) % mb, t) if mb >= nb else (t, (p + t) % nb)
      w[r * b:(r + 1) * b, c * b:(c + 1) * b] = g[p] * v[p, t]
  return w


@pytest.mark.parametrize("level", [0.0, 1.0])  # K_active = K (diag_matmul), P (dense GEMM)
@pytest.mark.parametrize("m,n,b,s", [(24, 8, 4, 0.6), (8, 24, 4, 0.5), (12, 12, 3, 0.7),
                                     (32, 48, 16, 0.5)])
def test_block_layer_equals_reference(m, n, b, s, level, rng):
  layer = dd.DiagDense(n, sparsity=s, block=b, backend="dense", recipe=dd.recipe.PAPER)
  x = jnp.asarray(rng.normal(size=(5, m)), jnp.float32)
  v = layer.init(jax.random.PRNGKey(0), x)
  geo = pattern.Geometry(m, n, b)
  chex.assert_shape(v["params"]["values"], (geo.P, geo.D, b, b))
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), v["params"])
  v = {**v, "params": params}
  k = pattern.num_kept(m, n, s, b)
  w = _w_eff(v["params"], m, n, b, k, dd.schedules.k_active(geo.P, k, level), 0.4)
  want = np.asarray(x, np.float64) @ w + np.asarray(v["params"]["bias"])
  chex.assert_trees_all_close(dd.with_phase(layer, level, 0.4).apply(v, x), want, rtol=1e-5,
                              atol=1e-5)

  # the frozen layer computes the same function with (K, D, b, b) values
  frozen, _ = dd.freeze(v, temperature=0.4)  # folds the gate recorded at init: soft_topk
  chex.assert_shape(frozen["params"]["values"], (k, geo.D, b, b))
  y0 = dd.with_phase(layer, 0.0, 0.4).apply(v, x)
  chex.assert_trees_all_close(layer.apply(frozen, x), y0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,n,b", [(24, 8, 4), (8, 24, 4), (16, 16, 4)])
def test_block_diag_matmul_grads_match_float64(m, n, b, rng):
  geo = pattern.Geometry(m, n, b)
  k = max(1, geo.P // 3)
  o = np.sort(rng.choice(geo.P, k, replace=False)).astype(np.int32)
  x = jnp.asarray(rng.normal(size=(7, m)), jnp.float32)
  v = jnp.asarray(rng.normal(size=geo.values_shape(k)), jnp.float32)
  dy = rng.normal(size=(7, n))
  for offsets in (o, jnp.asarray(o)):  # static and traced (under jit) offsets
    f = jax.jit(lambda x, v, o: jax.vjp(lambda x, v: ops.diag_matmul(x, v, o, m, n, "dense"),
                                        x, v))
    y, vjp = f(x, v, offsets) if not isinstance(offsets, np.ndarray) else jax.vjp(
        lambda x, v: ops.diag_matmul(x, v, offsets, m, n, "dense"), x, v)
    dx, dv = vjp(jnp.asarray(dy, jnp.float32))
    w = np.asarray(pattern.densify(np.asarray(v, np.float64), o, m, n, b))
    x64 = np.asarray(x, np.float64)
    chex.assert_trees_all_close(y, x64 @ w, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(dx, dy @ w.T, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(dv, pattern.gather_diagonals(x64.T @ dy, o, m, n, b),
                                rtol=1e-5, atol=1e-5)


def test_bad_block_names_layer_shape_and_valid_sizes():
  layer = dd.DiagDense(8, sparsity=0.5, block=3, name="fc1")
  with pytest.raises(ValueError, match=r"'fc1'.*12x8.*\[1, 2, 4\]"):
    layer.init(jax.random.PRNGKey(0), jnp.ones((1, 12)))


def test_factory_fits_each_layer_the_largest_block(rng):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      lin = dd.LayerFactory.from_dict({"a": 0.5, "b": 0.5}, block=32, backend="dense")
      return lin("b", 10)(lin("a", 48)(x))

  x = jnp.ones((2, 80))
  v = Net().init(jax.random.PRNGKey(0), x)
  assert v["params"]["a"]["values"].shape[-1] == 16  # gcd(80, 48) = 16
  assert v["params"]["b"]["values"].shape[-1] == 2  # gcd(48, 10) = 2
  table = dd.summarize(Net(), v, x)
  assert "80x48" in table and " 16 " in table


def test_frozen_layer_refuses_another_input_width():
  layer = dd.DiagDense(8, sparsity=0.5, name="fc")
  v = layer.init(jax.random.PRNGKey(0), jnp.ones((2, 16)))
  frozen, _ = dd.freeze(v)
  assert layer.apply(frozen, jnp.ones((2, 16))).shape == (2, 8)
  for width in (20, 100, 12):
    with pytest.raises(ValueError, match=f"frozen for 16 input features, got x with {width}"):
      layer.apply(frozen, jnp.ones((2, width)))


def test_kernel_init_describes_the_effective_kernel():
  m, n = 256, 512
  x = jnp.eye(m)
  dense = nn.Dense(n)
  wd = dense.init(jax.random.PRNGKey(1), x)["params"]["kernel"]
  layer = dd.with_phase(dd.DiagDense(n, sparsity=0.0, kernel_init=nn.initializers.lecun_normal(),
                                     backend="dense", recipe=dd.recipe.PAPER))
  v = layer.init(jax.random.PRNGKey(1), x)
  w = layer.apply(v, x) - v["params"]["bias"]  # rows of W_eff (gates all equal K/P)
  assert abs(float(jnp.std(w)) / float(jnp.std(wd)) - 1) < 0.05
  ones = dd.with_phase(dd.DiagDense(n, sparsity=0.5, kernel_init=nn.initializers.ones,
                                    backend="dense", recipe=dd.recipe.PAPER))
  w1 = ones.apply(ones.init(jax.random.PRNGKey(0), x), x)
  np.testing.assert_allclose(np.unique(np.asarray(w1)), [1.0])  # gates K/P times P/K
  hard = dd.with_phase(dd.DiagDense(n, sparsity=0.5, kernel_init=nn.initializers.ones,
                                    backend="dense", recipe=dd.Recipe(gate="st_topk")))
  w2 = np.asarray(hard.apply(hard.init(jax.random.PRNGKey(0), x), x))
  np.testing.assert_allclose(np.unique(w2), [0.0, 1.0])  # hard gates: the kept half is the init
  assert (w2 == 1).mean() == 0.5


def test_precision_reaches_the_products():
  x = jnp.ones((2, 16))
  for frozen in (False, True):
    layer = dd.with_phase(dd.DiagDense(8, sparsity=0.5, precision=jax.lax.Precision.HIGHEST,
                                       backend="dense"), 0.0)
    v = layer.init(jax.random.PRNGKey(0), x)
    if frozen:
      v, _ = dd.freeze(v)
    txt = str(jax.make_jaxpr(lambda v: layer.apply(v, x))(v))
    assert "HIGHEST" in txt
