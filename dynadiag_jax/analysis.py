"""Analysis of learned patterns: small-world factor of a layer's graph, gate entropy, offsets.

The small-world factor follows the paper's Appendix I: a frozen (m, n) layer is a
bipartite graph (m inputs, n outputs, one edge per kept weight); sigma = (C / C_r) /
(L / L_r), with C the bipartite clustering coefficient (Latapy et al., networkx
`bipartite.average_clustering`), L the mean shortest-path length, and C_r, L_r their
means over random bipartite graphs with the same degree sequences (degree-preserving
double edge swaps). sigma > 1: more clustered than random at a similar path length.
"""

from __future__ import annotations

from typing import Sequence

import networkx as nx
import numpy as np

from dynadiag_jax import pattern
from dynadiag_jax.gates import HARD as HARD_GATES


def gates(alpha_P: np.ndarray, k: int, temperature: float, gate: str = "soft_topk") -> np.ndarray:
  """g_P = min(k softmax(alpha / T), 1), in numpy (the soft top-k of `dd.gates.soft_topk`);
  for a hard gate (`dd.gates.HARD`, e.g. 'st_topk') its forward value, 1 on the top-k of alpha."""
  if gate in HARD_GATES:
    a = np.asarray(alpha_P)
    g = np.zeros(a.shape, np.float64)
    g[np.argsort(-a, kind="stable")[:k]] = 1.0  # ties: lower index, as gates.topk_indices
    return g
  z = np.asarray(alpha_P, np.float64) / float(temperature)
  e = np.exp(z - z.max())
  return np.minimum(k * e / e.sum(), 1.0)


def gate_entropy(g_P: np.ndarray) -> float:
  """Entropy (nats) of the gates normalised to a distribution: log P when all equal, log K hard."""
  g = np.asarray(g_P, np.float64)
  q = g / g.sum()
  q = q[q > 0]
  return float(-(q * np.log(q)).sum())


def offset_histogram(offsets: Sequence[int], num_diagonals: int,
                     bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """(counts, edges): how the kept offsets spread over [0, P)."""
  return np.histogram(np.asarray(offsets), bins=min(bins, num_diagonals),
                      range=(0, num_diagonals))


def layer_graph(offsets: Sequence[int], m: int, n: int, block: int = 1) -> nx.Graph:
  """The bipartite graph of a frozen layer: inputs 0..m-1, outputs m..m+n-1, kept weights."""
  rows, cols = pattern.diagonal_coords(m, n, block)
  o = np.asarray(offsets, np.int64)
  r, c = rows[o].reshape(-1), cols[o].reshape(-1)
  if block > 1:  # every block cell of every kept block
    ii, jj = np.meshgrid(np.arange(block), np.arange(block), indexing="ij")
    r = (r[:, None] * block + ii.reshape(-1)).reshape(-1)
    c = (c[:, None] * block + jj.reshape(-1)).reshape(-1)
  g = nx.Graph()
  g.add_nodes_from(range(m), bipartite=0)
  g.add_nodes_from(range(m, m + n), bipartite=1)
  g.add_edges_from(zip(r.tolist(), (c + m).tolist()))
  return g


def mean_path_length(g: nx.Graph, sources: int = 64, seed: int = 0) -> float:
  """Mean shortest-path length from `sources` random nodes of the largest component."""
  cc = max(nx.connected_components(g), key=len)
  nodes = sorted(cc)
  rng = np.random.default_rng(seed)
  pick = rng.choice(nodes, size=min(sources, len(nodes)), replace=False)
  tot, cnt = 0, 0
  for s in pick:
    d = nx.single_source_shortest_path_length(g, int(s))
    tot += sum(d.values())
    cnt += len(d) - 1
  return tot / max(cnt, 1)


def _clustering(g: nx.Graph) -> float:
  return float(nx.bipartite.average_clustering(g))


def small_world(offsets: Sequence[int], m: int, n: int, block: int = 1, num_random: int = 3,
                sources: int = 64, seed: int = 0) -> dict[str, float]:
  """{C, C_rand, L, L_rand, sigma} of a frozen layer against degree-preserving random graphs."""
  g = layer_graph(offsets, m, n, block)
  c, l = _clustering(g), mean_path_length(g, sources, seed)
  cr, lr = [], []
  for i in range(num_random):
    h = g.copy()
    swaps = 2 * h.number_of_edges()
    _bipartite_swaps(h, m, swaps, np.random.default_rng(seed + 1 + i))
    cr.append(_clustering(h))
    lr.append(mean_path_length(h, sources, seed))
  c_r, l_r = float(np.mean(cr)), float(np.mean(lr))
  sigma = (c / c_r) / (l / l_r) if c_r > 0 and l_r > 0 else float("nan")
  return {"C": c, "C_rand": c_r, "L": l, "L_rand": l_r, "sigma": sigma}


def _bipartite_swaps(g: nx.Graph, m: int, swaps: int, rng: np.random.Generator) -> None:
  """Degree-preserving edge swaps that keep the graph bipartite: (a-x, b-y) -> (a-y, b-x)."""
  edges = [(u, v) if u < m else (v, u) for u, v in g.edges()]
  pos = {e: i for i, e in enumerate(edges)}
  done = 0
  for _ in range(10 * swaps):
    if done >= swaps:
      break
    i, j = rng.integers(len(edges), size=2)
    (a, x), (b, y) = edges[i], edges[j]
    if a == b or x == y or g.has_edge(a, y) or g.has_edge(b, x):
      continue
    g.remove_edge(a, x)
    g.remove_edge(b, y)
    g.add_edge(a, y)
    g.add_edge(b, x)
    del pos[(a, x)], pos[(b, y)]
    edges[i], edges[j] = (a, y), (b, x)
    pos[(a, y)], pos[(b, x)] = i, j
    done += 1
