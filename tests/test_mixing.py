"""Channel mixing (`DiagDense(mixing=...)`, `dd.mixing`): y = x[..., perm] @ W on every backend
against the dense backend and float64 numpy, the permutation kept through freeze and an
orbax checkpoint, drawn per layer from the seed, and coverage counts unchanged."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import dynadiag_jax as dd
from dynadiag_jax import mixing
from tests import pallas_testing


def test_stride_reads_one_feature_from_each_group(rng):
  m, b = 96, 8  # M = 12 blocks
  perm = mixing.stride_perm(m, b)
  assert sorted(perm) == list(range(m))
  groups = perm.reshape(m // b, b) // (m // b)  # block u: which of the b groups of M each comes from
  np.testing.assert_array_equal(groups, np.tile(np.arange(b), (m // b, 1)))
  x = jnp.asarray(rng.normal(size=(3, 5, m)).astype(np.float32))
  np.testing.assert_array_equal(mixing.stride(x, b), x[..., perm])
  np.testing.assert_array_equal(mixing.inverse(perm)[perm], np.arange(m))
  np.testing.assert_array_equal(mixing.stride(x, 1), x)


def _frozen(layer, x, rng):
  v = layer.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x)
  p = v["params"]["alpha"].shape[0]
  v["params"]["alpha"] = jnp.asarray(rng.normal(size=p).astype(np.float32))
  v["params"]["bias"] = jnp.asarray(rng.normal(size=v["params"]["bias"].shape).astype(np.float32))
  return dd.freeze(v)[0]


CASES = [("stride", 64, 256, 16), ("random", 256, 64, 32), ("random", 24, 40, 1),
         ("stride", 96, 48, 16)]


@pytest.mark.parametrize("mix,m,n,b", CASES)
def test_mixed_layer_forward_and_gradients(rng, mix, m, n, b):
  """Frozen layer on dense / xla / pallas (interpret) against float64 numpy of
  x[..., perm] @ W + bias: y, dx, dvalues and dbias."""
  rows = 6
  x = rng.normal(size=(rows, m)).astype(np.float32)
  dy = rng.normal(size=(rows, n)).astype(np.float32)
  frozen = {}
  for backend in ("dense", "xla", "pallas"):
    layer = dd.DiagDense(n, sparsity=0.8, block=b, backend=backend, mixing=mix,
                         kernel_config=dd.ops.KernelConfig(interpret=True))
    if not frozen:
      frozen = _frozen(layer, jnp.asarray(x), rng)
      perm = np.asarray(frozen["dynadiag"]["perm"])
      o = np.asarray(frozen["dynadiag"]["offsets"])
      v = np.asarray(frozen["params"]["values"])
      assert sorted(perm) == list(range(m)) and (mix != "stride" or
                                                 np.array_equal(perm, mixing.stride_perm(m, b)))
      y64, dxp64, dv64 = pallas_testing.reference(x[:, perm], v, o, m, n, dy, block=b)
      y64 = y64 + np.asarray(frozen["params"]["bias"], np.float64)
      dx64 = dxp64[:, mixing.inverse(perm)]

    def loss(params, x):
      y = layer.apply({**frozen, "params": params}, x)
      return jnp.sum(y * dy), y

    (dp, dx), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(frozen["params"], x)
    tol = dict(rtol=2e-4, atol=2e-4)
    chex.assert_trees_all_close(y, y64.astype(np.float32), **tol)
    chex.assert_trees_all_close(dx, dx64.astype(np.float32), **tol)
    chex.assert_trees_all_close(dp["values"], dv64.astype(np.float32), **tol)
    chex.assert_trees_all_close(dp["bias"], dy.sum(0), **tol)
    w = dd.pattern.densify(v, o, m, n, b)  # the dense form: x[..., perm] @ W
    chex.assert_trees_all_close(y, x[:, perm] @ w + frozen["params"]["bias"], **tol)


def test_exploring_mixed_layer_gradients_through_a_traced_perm(rng):
  """Exploring, the perm is a traced leaf: the permute's gradient (a gather by the inverse)
  equals autodiff of a plain x[..., perm]."""
  m, n, b = 64, 128, 16
  layer = dd.DiagDense(n, sparsity=0.75, block=b, backend="xla", mixing="random")
  x = jnp.asarray(rng.normal(size=(4, m)).astype(np.float32))
  v = layer.init(jax.random.PRNGKey(3), x)
  plain = dd.DiagDense(n, sparsity=0.75, block=b, backend="xla")
  pv = {"params": v["params"], "dynadiag": {k: a for k, a in v["dynadiag"].items() if k != "perm"}}
  perm = jnp.asarray(v["dynadiag"]["perm"])

  def run(f, variables, xx):
    return jnp.sum(jnp.sin(dd.with_phase(f, 0.5, 0.3).apply(variables, xx)))

  g = jax.jit(jax.grad(lambda p, vv, xx: run(layer, {**vv, "params": p}, xx), argnums=(0, 2)))
  want = jax.jit(jax.grad(lambda p, xx: run(plain, {**pv, "params": p}, xx[:, perm]),
                          argnums=(0, 1)))(v["params"], x)
  chex.assert_trees_all_close(g(v["params"], v, x), want, rtol=1e-5, atol=1e-6)


class Two(nn.Module):
  """Two sparse layers of the same shape from one LayerFactory."""
  linear: dd.LayerFactory

  @nn.compact
  def __call__(self, x):
    return self.linear("b", 64)(self.linear("a", 64)(x))


def test_random_perm_per_layer_and_reproducible():
  f = dd.LayerFactory.from_dict({"a": 0.8, "b": 0.8}, block=16, mixing="random",
                                backend="dense")
  x = jnp.ones((1, 64))
  v0, v0b, v1 = (Two(f).init(jax.random.PRNGKey(s), x) for s in (0, 0, 1))
  perm = lambda v, k: np.asarray(v["dynadiag"][k]["perm"])
  assert not np.array_equal(perm(v0, "a"), perm(v0, "b"))
  np.testing.assert_array_equal(perm(v0, "a"), perm(v0b, "a"))
  assert not np.array_equal(perm(v0, "a"), perm(v1, "a"))
  # the params are those of mixing='none' (the perm is drawn after them)
  plain = Two(f.replace(mixing="none")).init(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal(plain["params"], v0["params"])
  with pytest.raises(ValueError, match="mixing"):
    dd.LayerFactory(mixing="shuffle")


def test_perm_survives_freeze_and_an_orbax_checkpoint(tmp_path, rng):
  f = dd.LayerFactory.from_dict({"a": 0.8, "b": 0.8}, block=16, mixing="random", backend="xla")
  model = Two(f)
  x = jnp.asarray(rng.normal(size=(5, 64)).astype(np.float32))
  v = model.init(jax.random.PRNGKey(0), x)
  frozen, _ = dd.freeze(v)
  assert isinstance(frozen["dynadiag"]["a"]["perm"], dd.static.StaticArray)
  np.testing.assert_array_equal(frozen["dynadiag"]["a"]["perm"], v["dynadiag"]["a"]["perm"])
  want = model.apply(frozen, x)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "c", dd.static.savable(frozen))
  ckpt.wait_until_finished()
  back = dd.static.restored(ckpt.restore(tmp_path / "c"))
  assert isinstance(back["dynadiag"]["b"]["perm"], dd.static.StaticArray)
  np.testing.assert_array_equal(back["dynadiag"]["b"]["perm"], v["dynadiag"]["b"]["perm"])
  np.testing.assert_array_equal(jax.jit(model.apply)(back, x), want)
  # export's densify folds the perm into the kernel rows
  dense = dd.export.densify(model, frozen)
  chex.assert_trees_all_close(dd.export.dense_model(model).apply(dense, x), want,
                              rtol=1e-5, atol=1e-5)


def test_mixing_must_match_the_variables():
  x = jnp.ones((1, 64))
  v = dd.DiagDense(64, block=16, mixing="random").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="mixing='none'"):
    dd.with_phase(dd.DiagDense(64, block=16), 0.0).apply(v, x)
  plain = dd.DiagDense(64, block=16).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="no permutation"):
    dd.with_phase(dd.DiagDense(64, block=16, mixing="stride"), 0.0).apply(plain, x)
  with pytest.raises(ValueError, match="another permutation"):
    dd.with_phase(dd.DiagDense(64, block=16, mixing="stride"), 0.0).apply(v, x)


def test_summary_counts_are_the_same_with_mixing(rng):
  """A permutation moves which inputs a diagonal reads, not how many are connected."""
  x = jnp.ones((1, 64))
  alpha = jnp.asarray(rng.normal(size=16).astype(np.float32))  # 64x1024, b = 64: P = 16
  got = []
  for mix in ("none", "stride", "random"):
    layer = dd.DiagDense(1024, sparsity=0.9, block=64, mixing=mix, backend="dense")
    v = layer.init(jax.random.PRNGKey(0), x)
    v["params"]["alpha"] = alpha
    frozen, _ = dd.freeze(v)
    got.append([dd.summary.unconnected(w, dd.linear_calls(layer, w, x)[0]) for w in (v, frozen)])
    assert "unconnected in / out" in dd.summarize(layer, frozen, x)
  assert got[0] == got[1] == got[2] and got[0][0][1] > 0
