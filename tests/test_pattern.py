"""Geometry: partition, transpose, K formula, densify and bad input."""

import chex
import numpy as np
import pytest

from dynadiag_jax import pattern

SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (5, 5), (7, 13), (13, 7), (11, 11),
          (16, 48), (48, 16), (31, 97), (97, 31), (64, 64)]


@pytest.mark.parametrize("m,n", SHAPES)
def test_every_cell_on_exactly_one_diagonal(m, n):
  rows, cols = pattern.diagonal_coords(m, n)
  p, d = pattern.num_diagonals(m, n), pattern.diag_length(m, n)
  assert rows.shape == cols.shape == (p, d) == (max(m, n), min(m, n))
  count = np.zeros((m, n), int)
  np.add.at(count, (rows, cols), 1)
  np.testing.assert_array_equal(count, 1)
  idx = pattern.diagonal_index(m, n)
  np.testing.assert_array_equal(idx[rows, cols], np.arange(p)[:, None] + 0 * cols)


@pytest.mark.parametrize("m,n", [(5, 3), (3, 5), (4, 4)])
def test_geometry_matches_the_convention(m, n):
  rows, cols = pattern.diagonal_coords(m, n)
  for p in range(max(m, n)):
    for t in range(min(m, n)):
      want = ((p + t) % m, t) if m >= n else (t, (p + t) % n)
      assert (rows[p, t], cols[p, t]) == want


@pytest.mark.parametrize("m,n", SHAPES)
def test_transpose_is_a_diagonal_pattern(m, n, rng):
  p = pattern.num_diagonals(m, n)
  k = int(rng.integers(1, p + 1))
  o = np.sort(rng.choice(p, k, replace=False))
  v = rng.normal(size=(k, pattern.diag_length(m, n))).astype(np.float32)
  v_t, o_t = pattern.transpose_pattern(v, o, m, n)
  chex.assert_trees_all_close(pattern.densify(v_t, o_t, n, m), pattern.densify(v, o, m, n).T)
  # the transpose's diagonal index of each cell agrees with the mapped offsets
  idx_t = pattern.diagonal_index(n, m)
  rows, cols = pattern.diagonal_coords(m, n)
  np.testing.assert_array_equal(idx_t[cols[o, 0], rows[o, 0]], np.asarray(o_t))


def test_densify_places_values_and_gather_inverts(rng):
  m, n = 9, 4
  o = np.array([0, 3, 8])
  v = rng.normal(size=(3, 4)).astype(np.float32)
  w = np.asarray(pattern.densify(v, o, m, n))
  for k, p in enumerate(o):
    for t in range(n):
      assert w[(p + t) % m, t] == v[k, t]
  assert np.count_nonzero(w) == v.size
  chex.assert_trees_all_close(pattern.gather_diagonals(w, o, m, n), v)


@pytest.mark.parametrize("m,n,s,k", [(10, 10, 0.0, 10), (10, 10, 0.9, 1), (10, 10, 0.91, 1),
                                     (10, 10, 0.85, 2), (768, 3072, 0.9, 308), (3, 7, 0.5, 4),
                                     (100, 1, 0.999, 1), (768, 768, 0.6, 308)])
def test_num_kept(m, n, s, k):
  assert pattern.num_kept(m, n, s) == k


def test_num_kept_formula_over_many(rng):
  for _ in range(200):
    m, n = rng.integers(1, 300, 2)
    s = float(rng.uniform(0, 1))
    p = max(m, n)
    want = min(max(int(np.ceil((1 - s) * p - 1e-9)), 1), p)
    assert pattern.num_kept(int(m), int(n), s) == want


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_sizes_raise(bad):
  with pytest.raises(ValueError, match="positive"):
    pattern.num_diagonals(bad, 4)
  with pytest.raises(ValueError, match="positive"):
    pattern.diagonal_coords(4, bad)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_raises(s):
  with pytest.raises(ValueError, match="sparsity"):
    pattern.num_kept(8, 8, s)


@pytest.mark.parametrize("o,msg", [([0, 8], "range"), ([-1], "range"), ([2, 2], "repeat"),
                                   ([[0, 1]], "1-D"), ([0.5], "integer")])
def test_bad_offsets_raise(o, msg):
  o = np.asarray(o)
  v = np.zeros((o.reshape(-1).shape[0], 4), np.float32)
  with pytest.raises(ValueError, match=msg):
    pattern.densify(v, o, 8, 4)


def test_values_shape_must_match():
  with pytest.raises(ValueError, match="shape"):
    pattern.densify(np.zeros((2, 5), np.float32), np.array([0, 1]), 8, 4)


@pytest.mark.parametrize("m,n", SHAPES)
def test_offset_coords_match_the_table(m, n, rng):
  rows, cols = pattern.diagonal_coords(m, n)
  o = rng.choice(max(m, n), min(3, max(m, n)), replace=False)
  r, c = pattern.offset_coords(o, m, n)
  np.testing.assert_array_equal(r, rows[o])
  np.testing.assert_array_equal(c, cols[o])


@pytest.mark.parametrize("m,n", SHAPES)
def test_densify_all_equals_densify_of_every_diagonal(m, n, rng):
  p, d = pattern.num_diagonals(m, n), pattern.diag_length(m, n)
  v = rng.normal(size=(p, d)).astype(np.float32)
  np.testing.assert_array_equal(pattern.densify_all(v, m, n), pattern.densify(v, np.arange(p), m, n))
  with pytest.raises(ValueError, match="shape"):
    pattern.densify_all(v[:-1], m, n)
