"""diag_matmul (dense backend) against float64 numpy, forward and every gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynadiag_jax import ops, pattern


def _np_dense(v, o, m, n):
  rows, cols = pattern.diagonal_coords(m, n)
  w = np.zeros((m, n))
  w[rows[o], cols[o]] = v
  return w


@pytest.mark.parametrize("m,n,s", [(24, 10, 0.5), (10, 24, 0.8), (17, 17, 0.9), (1, 9, 0.0),
                                   (9, 1, 0.5), (33, 20, 0.99)])
def test_forward_and_grads_match_float64(m, n, s, rng):
  p, d = pattern.num_diagonals(m, n), pattern.diag_length(m, n)
  k = pattern.num_kept(m, n, s)
  o = np.sort(rng.choice(p, k, replace=False)).astype(np.int32)
  x = rng.normal(size=(3, 5, m)).astype(np.float32)
  v = rng.normal(size=(k, d)).astype(np.float32)
  c = rng.normal(size=(3, 5, n)).astype(np.float32)

  f = lambda x, v: (ops.diag_matmul(x, v, o, m, n, backend="dense") * c).sum()
  y = jax.jit(lambda x, v: ops.diag_matmul(x, v, o, m, n, backend="dense"))(x, v)
  dx, dv = jax.jit(jax.grad(f, argnums=(0, 1)))(x, v)

  w = _np_dense(v.astype(np.float64), o, m, n)
  x64, c64 = x.astype(np.float64), c.astype(np.float64)
  chex.assert_shape(y, (3, 5, n))
  chex.assert_trees_all_close(y, (x64 @ w).astype(np.float32), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(dx, (c64 @ w.T).astype(np.float32), rtol=1e-5, atol=1e-5)
  dw = x64.reshape(-1, m).T @ c64.reshape(-1, n)
  rows, cols = pattern.diagonal_coords(m, n)
  chex.assert_trees_all_close(dv, dw[rows[o], cols[o]].astype(np.float32), rtol=1e-5, atol=1e-5)


def test_traced_offsets_and_vmap(rng):
  m, n = 12, 8
  x = jnp.asarray(rng.normal(size=(4, 6, m)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
  o = jnp.array([1, 5, 11])
  y = jax.jit(lambda x, v, o: ops.diag_matmul(x, v, o, m, n, "dense"))(x, v, o)
  yv = jax.vmap(lambda x: ops.diag_matmul(x, v, o, m, n, "dense"))(x)
  w = pattern.densify(v, o, m, n)
  chex.assert_trees_all_close(y, x @ w, yv, rtol=1e-6)


def test_unknown_backend_and_bad_shapes():
  x, v, o = jnp.ones((2, 6)), jnp.ones((2, 4)), jnp.array([0, 1])
  with pytest.raises(ValueError, match="unknown diag_matmul backend 'cuda'"):
    ops.diag_matmul(x, v, o, 6, 4, backend="cuda")
  with pytest.raises(ValueError, match="features"):
    ops.diag_matmul(jnp.ones((2, 5)), v, o, 6, 4, backend="dense")
  with pytest.raises(ValueError, match="shape"):
    ops.diag_matmul(x, jnp.ones((2, 5)), o, 6, 4, backend="dense")


def test_auto_backend_on_cpu_is_dense():
  assert ops.resolve_backend("auto").name == ("pallas" if jax.default_backend() == "gpu" else "dense")


def _spy_backend(seen: list) -> str:
  """Registers the dense backend under 'spy', recording what type prepare receives."""
  import dataclasses

  dense = ops.resolve_backend("dense")

  def prepare(o_K, geo, cfg):
    seen.append(isinstance(o_K, jax.core.Tracer))
    return o_K

  ops.register_backend(dataclasses.replace(dense, name="spy", prepare=prepare))
  return "spy"


def test_concrete_offsets_reach_the_backend_static_under_jit(rng):
  seen = []
  name = _spy_backend(seen)
  m, n = 20, 9
  o = np.array([2, 7, 13], np.int32)
  x = jnp.asarray(rng.normal(size=(4, m)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
  loss = lambda x, v, o: ops.diag_matmul(x, v, o, m, n, name).sum() ** 2
  closed = jax.jit(jax.grad(lambda x, v: loss(x, v, o), argnums=(0, 1)))(x, v)
  assert seen == [False]  # one prepare, shared by forward and backward, on numpy
  passed = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, v, jnp.asarray(o))
  assert seen == [False, True]  # offsets passed into jit arrive traced
  chex.assert_trees_all_close(closed, passed, rtol=1e-6)
