"""The `xla` backend against float64 numpy and the dense backend: forward and both grads."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynadiag_jax import ops
from dynadiag_jax.backends import auto, xla

_TOL = dict(rtol=2e-4, atol=2e-4)


def _np_dense(v, o, m, n, b):
  """W (m, n) in float64, placed block by block from the geometry of DESIGN.md 8."""
  mb, nb = m // b, n // b
  w = np.zeros((m, n))
  v4 = v.reshape(v.shape[0], v.shape[1], b, b)
  for k, p in enumerate(o):
    for t in range(min(mb, nb)):
      r, c = ((p + t) % mb, t) if mb >= nb else (t, (p + t) % nb)
      w[r * b:(r + 1) * b, c * b:(c + 1) * b] = v4[k, t]
  return w


def _case(rng, m, n, b, k, rows):
  mb, nb = m // b, n // b
  p, d = max(mb, nb), min(mb, nb)
  o = np.sort(rng.choice(p, k, replace=False)).astype(np.int32)
  shape = (k, d) if b == 1 else (k, d, b, b)
  v = rng.normal(size=shape).astype(np.float32)
  x = rng.normal(size=(rows, m)).astype(np.float32)
  c = rng.normal(size=(rows, n)).astype(np.float32)
  return o, v, x, c


def _run(backend, x, v, o, c, m, n, traced):
  """(y, dx, dv) from one jitted grad; offsets closed over as numpy (frozen) or passed in."""
  def loss(x, v, o_in):
    y = ops.diag_matmul(x, v, o_in if traced else o, m, n, backend=backend)
    return (y * c).sum(), y

  (dx, dv), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, v, jnp.asarray(o))
  return y, dx, dv


# (m, n, block, K, rows): square, tall (m > n), wide (m < n), odd sizes, a wide kernel
# whose n is no multiple of m, b = 1 with few rows (elementwise forms) and with many rows
# (the GEMM path), blocks of 16 and 32.
assert 2 / 40 <= auto.WINDOWS_MAX_DENSITY_B1 < 3 / 20
assert 1 / 100 <= auto.SCATTER_MAX_DENSITY_B1 < 2 / 40
CASES = [
    (24, 24, 1, 5, 3), (40, 15, 1, 6, 5), (15, 40, 1, 7, 2), (9, 31, 1, 31, 1),
    (31, 9, 1, 2, 4), (20, 12, 1, 3, auto.DENSE_ROWS_B1 + 3),
    # b = 1, many rows, K / P <= 0.1: windows for the gather form, GEMM for the scatter
    # form and dvalues; K / P = 0.01: windows for both (the scatter form in row tiles, rows
    # no multiple of the tile); K past one loop group
    (12, 40, 1, 3, 2 * xla._ROW_TILE + 5), (40, 12, 1, 2, xla._ROW_TILE + 7), (100, 90, 1, 70, 2),
    (12, 100, 1, 1, 2 * xla._ROW_TILE + 5), (100, 12, 1, 1, xla._ROW_TILE + 7),
    (64, 64, 16, 2, 7), (96, 32, 16, 3, 5), (32, 96, 16, 4, 3), (48, 80, 16, 5, 1),
    (128, 64, 32, 1, 9), (64, 192, 32, 6, 2),
    (32, 128, 16, 2, 5),  # wide, K <= _RUNS_MAX_K: the forward as padded runs
]


@pytest.mark.parametrize("traced", [False, True], ids=["frozen", "traced"])
@pytest.mark.parametrize("m,n,b,k,rows", CASES)
def test_matches_float64_and_dense(m, n, b, k, rows, traced, rng):
  o, v, x, c = _case(rng, m, n, b, k, rows)
  y, dx, dv = _run("xla", x, v, o, c, m, n, traced)
  w = _np_dense(v.astype(np.float64), o, m, n, b)
  x64, c64 = x.astype(np.float64), c.astype(np.float64)
  chex.assert_shape((y, dx, dv), ((rows, n), (rows, m), v.shape))
  chex.assert_trees_all_close(y, (x64 @ w).astype(np.float32), **_TOL)
  chex.assert_trees_all_close(dx, (c64 @ w.T).astype(np.float32), **_TOL)
  dw = x64.T @ c64  # dv[k, t] is the block (or cell) of dW at entry t of diagonal k
  ref = np.stack([_blocks_of(dw, p, m, n, b) for p in o]).reshape(v.shape)
  chex.assert_trees_all_close(dv, ref.astype(np.float32), **_TOL)
  yd, dxd, dvd = _run("dense", x, v, o, c, m, n, traced)
  chex.assert_trees_all_close((y, dx, dv), (yd, dxd, dvd), **_TOL)


def _blocks_of(dw, p, m, n, b):
  mb, nb = m // b, n // b
  out = []
  for t in range(min(mb, nb)):
    r, c = ((p + t) % mb, t) if mb >= nb else (t, (p + t) % nb)
    out.append(dw[r * b:(r + 1) * b, c * b:(c + 1) * b])
  return np.stack(out)


def test_frozen_pattern_stays_static_in_the_backward(rng):
  # the frozen path must not turn its offsets into array indices: no gather / scatter
  # appears in the jitted forward + backward of a block kernel
  m, n, b = 64, 128, 16
  o, v, x, c = _case(rng, m, n, b, 3, 4)
  f = lambda x, v: (ops.diag_matmul(x, v, o, m, n, backend="xla") * c).sum()
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, v).as_text()
  assert "gather" not in hlo and "scatter" not in hlo
  assert "dot_general" in hlo


def test_bf16_and_leading_dims(rng):
  m, n, b = 32, 64, 16
  o, v, x, c = _case(rng, m, n, b, 2, 6)
  x3 = jnp.asarray(x.reshape(2, 3, m), jnp.bfloat16)
  y = jax.jit(lambda x: ops.diag_matmul(x, jnp.asarray(v, jnp.bfloat16), o, m, n, "xla"))(x3)
  assert y.shape == (2, 3, n) and y.dtype == jnp.bfloat16
  ref = x.astype(np.float64) @ _np_dense(v.astype(np.float64), o, m, n, b)
  chex.assert_trees_all_close(np.asarray(y, np.float32).reshape(6, n), ref.astype(np.float32),
                              rtol=5e-2, atol=2e-1)
