"""dd.analysis: numpy gates, gate entropy, offset histograms, a layer's graph and its small-world factor."""

from __future__ import annotations

import networkx as nx
import numpy as np

import dynadiag_jax as dd
from tests.test_gates import hard_topk
from dynadiag_jax import analysis


def test_gates_match_library_and_entropy_limits(rng):
  a = rng.standard_normal(40).astype(np.float32)
  for t in (5.0, 0.3, 0.05):
    np.testing.assert_allclose(analysis.gates(a, 7, t), np.asarray(dd.gates.soft_topk(a, 7, t)),
                               rtol=1e-5, atol=1e-6)
  assert abs(analysis.gate_entropy(np.full(40, 0.2)) - np.log(40)) < 1e-9
  hard = np.asarray(hard_topk(a, 7))
  assert abs(analysis.gate_entropy(hard) - np.log(7)) < 1e-9
  np.testing.assert_array_equal(analysis.gates(a, 7, 0.3, "st_topk"), np.asarray(dd.gates.st_topk(a, 7, 0.3)))
  counts, edges = analysis.offset_histogram([0, 1, 2, 39], 40, bins=4)
  assert counts.tolist() == [3, 0, 0, 1] and edges[-1] == 40


def test_layer_graph_and_small_world(rng):
  m, n, k = 48, 32, 6
  off = np.sort(rng.choice(48, k, replace=False))
  g = analysis.layer_graph(off, m, n)
  assert g.number_of_edges() == k * n  # D = n cells per diagonal, all distinct
  w = np.asarray(dd.pattern.densify(np.ones((k, n), np.float32), off, m, n)) != 0
  deg_out = [g.degree(m + j) for j in range(n)]
  assert deg_out == w.sum(0).tolist() and [g.degree(i) for i in range(m)] == w.sum(1).tolist()
  h = g.copy()
  analysis._bipartite_swaps(h, m, 200, np.random.default_rng(0))  # pylint: disable=protected-access
  assert sorted(dict(h.degree()).items()) == sorted(dict(g.degree()).items())
  assert nx.is_bipartite(h) and h.edges() != g.edges()
  sw = analysis.small_world(off, m, n, num_random=2, sources=16)
  assert sw["C"] > 0 and sw["L"] > 1 and np.isfinite(sw["sigma"])
  assert abs(sw["sigma"] - (sw["C"] / sw["C_rand"]) / (sw["L"] / sw["L_rand"])) < 1e-9
  # a band of adjacent diagonals is more clustered than its degree-matched random graphs
  band = analysis.small_world(np.arange(k), m, n, num_random=2, sources=16)
  assert band["C"] > band["C_rand"]
  gb = analysis.layer_graph([0, 2], 32, 16, block=8)  # 2 block-diagonals of 2 blocks of 8 x 8
  assert gb.number_of_edges() == 2 * 2 * 64


def test_dd_analysis_is_exported_and_lazy():
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  code = ("import sys, dynadiag_jax as dd; lazy = 'networkx' not in sys.modules; "
          "assert dd.analysis.small_world and 'analysis' in dd.__all__; print(lazy)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "True"
  assert dd.analysis is analysis
