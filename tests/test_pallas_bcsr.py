"""Diagonal -> BCSR layouts: host vs jittable, packing, bounds, stats, clustering."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynadiag_jax import pattern
from pallas_kernels import bcsr, cluster
from tests.pallas_testing import fresh_seed, random_offsets

SHAPES = [(48, 32), (32, 80), (40, 40), (17, 70), (100, 33)]


@pytest.fixture
def rng():
  return np.random.default_rng(fresh_seed())


@pytest.mark.parametrize("b", [24, 8, 0, -16, 12, 48, 256])
def test_bad_block_sizes_raise(b):
  with pytest.raises(ValueError, match="power of two >= 16"):
    bcsr.check_block(b)
  with pytest.raises(ValueError, match="power of two"):
    bcsr.host_layout(np.array([0], np.int32), 32, 32, b)
  with pytest.raises(ValueError, match="power of two"):
    bcsr.jit_layout(jnp.array([0], jnp.int32), 32, 32, b)


@pytest.mark.parametrize("b", [16.0, True, "16", None])
def test_non_int_block_sizes_raise(b):
  with pytest.raises(ValueError, match="must be an int"):
    bcsr.check_block(b)


def test_bad_offsets_and_values_raise():
  with pytest.raises(ValueError):
    bcsr.host_layout(np.array([0, 0], np.int32), 32, 16)      # repeated diagonal
  with pytest.raises(ValueError):
    bcsr.host_layout(np.array([32], np.int32), 32, 16)        # out of range
  with pytest.raises(ValueError):
    bcsr.host_layout(np.zeros((2, 2), np.int32), 32, 16)      # not 1-D
  lay = bcsr.host_layout(np.array([1, 5], np.int32), 32, 16)
  with pytest.raises(ValueError, match="values must have shape"):
    bcsr.pack(jnp.zeros((2, 15)), lay)


@jax.jit
def _roundtrip(v, lay):
  data = bcsr.pack(v, lay)
  return data, bcsr.unpack(data, lay), bcsr.to_dense(data, lay)


def _dense(v, o, m, n):
  rows_PxD, cols_PxD = pattern.diagonal_coords(m, n)
  w = np.zeros((m, n), np.float32)
  w[rows_PxD[o], cols_PxD[o]] = v
  return w


def _check_layout(lay, v, o, m, n):
  """Invariants every layout keeps, whatever the offsets."""
  b, s = lay.b, lay.num_slots
  nnzb = int(np.asarray(lay.nnzb)[0])
  row_ptr, col_ptr = np.asarray(lay.row_ptr), np.asarray(lay.col_ptr)
  chex.assert_shape([row_ptr, col_ptr], [(lay.R + 1,), (lay.C + 1,)])
  assert row_ptr[-1] == col_ptr[-1] == nnzb <= s
  brow, bcol = np.asarray(lay.block_row)[:nnzb], np.asarray(lay.block_col)[:nnzb]
  assert np.all(np.diff(brow * lay.C + bcol) > 0)  # CSR order, no duplicates
  assert np.all(np.diff(row_ptr) == np.bincount(brow, minlength=lay.R))
  csc_slot, csc_row = np.asarray(lay.csc_slot)[:nnzb], np.asarray(lay.csc_row)[:nnzb]
  assert sorted(csc_slot.tolist()) == list(range(nnzb))
  np.testing.assert_array_equal(brow[csc_slot], csc_row)
  assert np.all(np.diff(bcol[csc_slot]) >= 0)  # CSC order
  data, v_back, w = _roundtrip(v, lay)
  chex.assert_shape(data, (s, b, b))
  chex.assert_trees_all_equal(v_back, v)
  chex.assert_trees_all_equal(w, _dense(v, o, m, n))
  st = bcsr.stats(lay)
  assert st.min_blocks <= int(st.blocks) <= min(st.total_blocks, bcsr.max_blocks(len(o), m, n, b))
  np.testing.assert_allclose(float(st.fill), v.size / (int(st.blocks) * b * b), rtol=1e-6)


@pytest.mark.parametrize("m,n", SHAPES)
def test_host_and_jit_layouts_agree(m, n, rng):
  p = pattern.num_diagonals(m, n)
  jl = jax.jit(bcsr.jit_layout, static_argnums=(1, 2, 3))
  for k in (1, int(rng.integers(2, p)), p):
    o = random_offsets(rng, m, n, k)
    v = rng.standard_normal((k, pattern.diag_length(m, n))).astype(np.float32)
    host, traced = bcsr.host_layout(o, m, n, 16), jl(jnp.asarray(o), m, n, 16)
    _check_layout(host, v, o, m, n)
    _check_layout(traced, v, o, m, n)
    nnzb = int(host.nnzb[0])
    assert traced.num_slots == bcsr.max_blocks(k, m, n, 16) >= nnzb
    for f in ("row_ptr", "col_ptr", "nnzb"):
      np.testing.assert_array_equal(getattr(host, f), getattr(traced, f))
    for f in ("block_row", "block_col", "csc_slot", "csc_row"):
      np.testing.assert_array_equal(getattr(host, f)[:nnzb], getattr(traced, f)[:nnzb])


def test_block_bound_is_tight_enough_and_safe(rng):
  """max_blocks never undercounts, incl. wrap-around with padded edges (numpy only)."""
  for _ in range(300):
    m, n = (int(a) for a in rng.integers(1, 200, size=2))
    b = int(rng.choice([16, 32]))
    o = random_offsets(rng, m, n, 1)
    st = bcsr.stats(bcsr.host_layout(o, m, n, b))
    assert st.blocks <= bcsr.max_blocks(1, m, n, b), (m, n, b, o)


def test_larger_blocks_and_band_fill(rng):
  m, n = 96, 160
  o_band = np.arange(32, dtype=np.int32) + int(rng.integers(0, 128))
  o_rand = random_offsets(rng, m, n, 32)
  for b in (16, 32):
    band, rand = (bcsr.stats(bcsr.host_layout(o, m, n, b)) for o in (o_band, o_rand))
    assert band.blocks < rand.blocks and band.fill > rand.fill


@pytest.mark.parametrize("m,n,k", [(64, 64, 7), (48, 96, 10), (96, 40, 9), (37, 21, 3)])
def test_clustered_layout_is_exact_and_never_worse(m, n, k, rng):
  o = random_offsets(rng, m, n, k)
  v = rng.standard_normal((k, min(m, n))).astype(np.float32)
  plain = bcsr.host_layout(o, m, n, 16)
  clus = bcsr.host_layout(o, m, n, 16, cluster=True)
  assert clus.clustered
  for p, i in ((clus.perm_rows, clus.inv_rows), (clus.perm_cols, clus.inv_cols)):
    np.testing.assert_array_equal(np.sort(p), np.arange(p.size))
    np.testing.assert_array_equal(p[i], np.arange(p.size))
  _check_layout(clus, v, o, m, n)
  assert bcsr.stats(clus).blocks <= bcsr.stats(plain).blocks


def test_cluster_rejects_bad_arguments():
  with pytest.raises(ValueError, match="lam"):
    cluster.cluster_order(np.array([0, 1]), 32, 32, 16, lam=1.5)
  with pytest.raises(ValueError, match="metric"):
    cluster.greedy_groups(np.ones((4, 2), np.float32), 16, metric="cosine")
