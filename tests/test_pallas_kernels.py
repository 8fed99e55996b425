"""BCSR SpMM / SpMM^T / SDDMM (interpret mode on CPU) against `dense` and float64 numpy."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynadiag_jax import ops, pattern
from pallas_kernels import bcsr, diag, sddmm, spmm
from tests.pallas_testing import assert_close, fresh_seed, random_offsets, reference

F32, BF16 = jnp.float32, jnp.bfloat16


@functools.partial(jax.jit, static_argnames=("m", "n", "backend"))
def _products(x, v, o, dy, *, m, n, backend, kernel=None):
  """(y, dx, dv) through diag_matmul's custom_vjp; offsets traced (jittable layout)."""
  y, vjp = jax.vjp(lambda x, v: ops.diag_matmul(x, v, o, m, n, backend, kernel), x, v)
  return (y, *vjp(dy))


def _inputs(rng, m, n, k, rows, dtype):
  o = random_offsets(rng, m, n, k)
  x, v, dy = (jnp.asarray(rng.standard_normal(s), dtype)
              for s in ((rows, m), (k, pattern.diag_length(m, n)), (rows, n)))
  return x, v, o, dy


def _check_all(got, x, v, o, dy, m, n, dtype, seed, dense=None):
  want = reference(x, v, o, m, n, dy)
  for name, g, w in zip(("y", "dx", "dv"), got, want):
    chex.assert_type(g, dtype)
    assert_close(g, w, dtype, seed, f"{name} vs float64")
  if dense is not None:
    for name, g, d in zip(("y", "dx", "dv"), got, dense):
      assert_close(g, d, dtype, seed, f"{name} vs dense backend")


# (m, n, K or sparsity, rows, dtype): m > n, m < n, m = n, sizes off the block grid,
# sparsity 50-99%, one diagonal, all diagonals, f32 and bf16.
CASES = [
    (48, 32, 0.5, 5, F32),
    (32, 80, 0.9, 19, F32),
    (40, 40, 0.75, 1, F32),
    (37, 21, "one", 7, F32),
    (24, 56, "all", 33, F32),
    (80, 48, 0.99, 16, F32),
    (33, 33, "all", 9, BF16),
    (64, 16, 0.6, 20, BF16),
    (20, 50, 0.8, 3, BF16),
]


@pytest.mark.parametrize("m,n,s,rows,dtype", CASES)
def test_products_match_dense_and_float64(m, n, s, rows, dtype):
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  p = pattern.num_diagonals(m, n)
  k = {"one": 1, "all": p}.get(s) or pattern.num_kept(m, n, s)
  x, v, o, dy = _inputs(rng, m, n, k, rows, dtype)
  got = _products(x, v, jnp.asarray(o), dy, m=m, n=n, backend="pallas")
  dense = _products(x, v, jnp.asarray(o), dy, m=m, n=n, backend="dense")
  _check_all(got, x, v, o, dy, m, n, dtype, seed, dense)


@pytest.mark.parametrize("cluster", [False, True])
def test_host_layout_path_eager(cluster):
  """Concrete offsets outside jit take the exact (optionally clustered) host layout."""
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  m, n, k = 72, 40, 9
  x, v, o, dy = _inputs(rng, m, n, k, 6, F32)
  cfg = ops.KernelConfig(cluster=cluster)
  assert diag.layout_for(o, m, n, cfg).clustered == cluster
  y, vjp = jax.vjp(lambda x, v: ops.diag_matmul(x, v, o, m, n, "pallas", kernel=cfg), x, v)
  got = (y, *vjp(dy))
  _check_all(got, x, v, o, dy, m, n, F32, seed)


def test_block_32_and_several_batch_tiles():
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  m, n = 70, 45
  x, v, o, dy = _inputs(rng, m, n, pattern.num_kept(m, n, 0.7), 40, F32)
  cfg = ops.KernelConfig(bcsr_block=32, batch_tile=16)  # 3 batch tiles, 3 x 2 blocks of 32
  got = jax.jit(lambda *a: _products.__wrapped__(*a, m=m, n=n, backend="pallas", kernel=cfg))(
      x, v, jnp.asarray(o), dy)
  _check_all(got, x, v, o, dy, m, n, F32, seed)


def test_kernels_directly_on_a_layout():
  """spmm, spmm(transpose) and sddmm on one layout: x @ W, dy @ W.T, x.T @ dy on blocks."""
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  m, n, k = 50, 36, 6
  x, v, o, dy = _inputs(rng, m, n, k, 11, F32)
  lay = bcsr.host_layout(o, m, n, 16)

  @jax.jit
  def run(x, v, dy):
    data = bcsr.pack(v, lay)
    return (spmm.spmm(x, data, lay), spmm.spmm(dy, data, lay, transpose=True),
            sddmm.sddmm(x, dy, lay), bcsr.to_dense(data, lay))

  y, dx, g, w = run(x, v, dy)
  w64 = np.asarray(w, np.float64)
  x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  assert_close(y, x64 @ w64, F32, seed, "spmm")
  assert_close(dx, dy64 @ w64.T, F32, seed, "spmm transpose")
  # Every stored block's gradient is the matching block of x.T @ dy (zero-padded).
  b, nnzb = lay.b, int(lay.nnzb[0])
  gw = np.zeros((lay.R * b, lay.C * b))
  gw[:m, :n] = x64.T @ dy64
  want = np.stack([gw[i * b:(i + 1) * b, j * b:(j + 1) * b]
                   for i, j in zip(lay.block_row[:nnzb], lay.block_col[:nnzb])])
  chex.assert_shape(g, (lay.num_slots, b, b))
  assert_close(g[:nnzb], want, F32, seed, "sddmm blocks")


def test_bad_inputs_raise():
  lay = bcsr.host_layout(np.array([0, 3], np.int32), 32, 16)
  data = jnp.zeros((lay.num_slots, 16, 16))
  with pytest.raises(ValueError, match=r"x must have shape \(B, 32\)"):
    spmm.spmm(jnp.zeros((4, 16)), data, lay)
  with pytest.raises(ValueError, match="block data must have shape"):
    spmm.spmm(jnp.zeros((4, 32)), jnp.zeros((lay.num_slots, 32, 32)), lay)
  with pytest.raises(ValueError, match="x, dy must be"):
    sddmm.sddmm(jnp.zeros((4, 32)), jnp.zeros((5, 16)), lay)
  with pytest.raises(ValueError, match="batch tile must be a power of two"):
    spmm.spmm(jnp.zeros((4, 32)), data, lay, batch_tile=24)
  with pytest.raises(ValueError, match="power of two"):
    ops.KernelConfig(bcsr_block=24)
  with pytest.raises(ValueError, match="got block 8 .* use backend='xla' or 'dense'"):
    ops.diag_matmul(jnp.zeros((2, 32)), jnp.zeros((1, 2, 8, 8)), np.array([0]), 32, 16,
                    "pallas")  # block-diagonal blocks must be 16..128 (tests/test_pallas_blocks)
