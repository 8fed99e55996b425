"""The pallas backend on block-diagonal patterns (b in 16..128), interpret mode on CPU.

The BCSR layout is the pattern itself (every stored block one full entry, values used as
block data unchanged); checked against the dense backend and float64 numpy with chex,
forward and both gradients, m > n, m < n and square, traced and static offsets.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynadiag_jax as dd
from dynadiag_jax import ops, pattern
from pallas_kernels import bcsr
from tests.pallas_testing import assert_close, fresh_seed, reference

F32, BF16 = jnp.float32, jnp.bfloat16


@functools.partial(jax.jit, static_argnames=("m", "n", "backend", "static"))
def _products(x, v, o, dy, *, m, n, backend, static=None):
  """(y, dx, dv) through diag_matmul's custom_vjp; `static` offsets close over numpy."""
  oo = o if static is None else np.asarray(static)
  y, vjp = jax.vjp(lambda x, v: ops.diag_matmul(x, v, oo, m, n, backend), x, v)
  return (y, *vjp(dy))


def _inputs(rng, geo: pattern.Geometry, k: int, rows: int, dtype):
  o = np.sort(rng.choice(geo.P, size=k, replace=False)).astype(np.int32)
  x, v, dy = (jnp.asarray(rng.standard_normal(s), dtype)
              for s in ((rows, geo.m), geo.values_shape(k), (rows, geo.n)))
  return x, v, o, dy


# (m, n, b, K, rows, dtype): M > N, M < N, M = N; one block-diagonal, all of them; rows
# off the batch tile; b = 16, 32, 64, 128.
CASES = [
    (128, 64, 16, 3, 20, F32),
    (64, 192, 16, 2, 33, F32),
    (96, 96, 16, "all", 7, F32),
    (128, 256, 32, 5, 17, F32),
    (256, 64, 32, 1, 40, BF16),
    (192, 128, 64, 2, 9, F32),
    (128, 384, 128, 2, 5, F32),
    (64, 64, 32, 1, 24, BF16),
]


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "static"])
@pytest.mark.parametrize("m,n,b,k,rows,dtype", CASES)
def test_block_products_match_dense_and_float64(m, n, b, k, rows, dtype, traced):
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  geo = pattern.Geometry(m, n, b)
  k = geo.P if k == "all" else k
  x, v, o, dy = _inputs(rng, geo, k, rows, dtype)
  static = None if traced else tuple(int(i) for i in o)
  got = _products(x, v, jnp.asarray(o), dy, m=m, n=n, backend="pallas", static=static)
  dense = _products(x, v, jnp.asarray(o), dy, m=m, n=n, backend="dense", static=static)
  want = reference(x, v, o, m, n, dy, b)
  for name, g, d, w in zip(("y", "dx", "dv"), got, dense, want):
    chex.assert_type(g, dtype)
    chex.assert_shape(g, w.shape)
    assert_close(g, w, dtype, seed, f"{name} vs float64")
    assert_close(g, d, dtype, seed, f"{name} vs dense backend")


@pytest.mark.parametrize("m,n,b", [(128, 64, 16), (64, 192, 32), (96, 96, 16)])
def test_block_layout_is_the_pattern(m, n, b):
  """numpy and jittable layouts agree; every block column/row holds <= K entries; the
  blocks, with the values as data, assemble to densify(values, offsets)."""
  rng = np.random.default_rng(fresh_seed())
  geo = pattern.Geometry(m, n, b)
  k = min(3, geo.P)
  x, v, o, _ = _inputs(rng, geo, k, 1, F32)
  host = bcsr.block_layout(o, m, n, b)
  jitted = jax.jit(lambda o: bcsr.block_layout(o, m, n, b))(jnp.asarray(o))
  for f in bcsr.Layout._ARRAYS:
    a, j = getattr(host, f), getattr(jitted, f)
    assert (a is None) == (j is None), f
    if a is not None:
      np.testing.assert_array_equal(np.asarray(j), a, err_msg=f)
  assert host.num_slots == k * geo.D and host.cell is None
  assert np.diff(host.col_ptr).max() <= k and np.diff(host.row_ptr).max() <= k
  np.testing.assert_array_equal(host.block_col[host.csc_slot],
                                np.repeat(np.arange(geo.N), np.diff(host.col_ptr)))
  np.testing.assert_array_equal(host.block_row[host.csr_slot],
                                np.repeat(np.arange(geo.M), np.diff(host.row_ptr)))
  w = bcsr.to_dense(v.reshape(-1, b, b), host)
  chex.assert_trees_all_equal(w, pattern.densify(v, o, m, n, b))


@pytest.mark.parametrize("b", [8, 48])
def test_blocks_the_kernels_cannot_take_raise(b):
  m = n = 96 if b == 48 else 64
  geo = pattern.Geometry(m, n, b)
  x, v, o, _ = _inputs(np.random.default_rng(0), geo, 1, 4, F32)
  with pytest.raises(ValueError, match=f"got block {b} .* use backend='xla' or 'dense'"):
    ops.diag_matmul(x, v, o, m, n, "pallas")


class _Mlp(nn.Module):
  backend: str = "dense"

  @nn.compact
  def __call__(self, x):
    kw = dict(backend=self.backend)
    x = jax.nn.gelu(dd.DiagDense(256, sparsity=0.75, block=32, **kw)(x))
    return dd.DiagDense(64, sparsity=0.5, block=16, **kw)(x)


@pytest.mark.parametrize("frozen", [False, True], ids=["exploring", "frozen"])
def test_diag_dense_blocks_pallas_matches_dense(frozen):
  """Loss and parameter gradients of a block DiagDense model: pallas == dense backend,
  exploring at K < K_active < P (traced offsets) and frozen (offsets closed over)."""
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((12, 128)), F32)
  variables = _Mlp().init(jax.random.PRNGKey(seed % 2**31), x)
  if frozen:
    variables, _ = dd.freeze(variables)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}

  def grads(backend):
    model = dd.with_phase(_Mlp(backend=backend), 0.5)  # K < K_active < P: traced offsets
    if frozen:
      ex = jax.tree.map(np.asarray, extra)
      f = jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p, **ex}, x) ** 2)))
      return f(params)
    f = jax.jit(jax.value_and_grad(lambda p, e: jnp.sum(model.apply({"params": p, **e}, x) ** 2)))
    return f(params, extra)

  got, want = grads("pallas"), grads("dense")
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want[0])))
