"""Row/column reordering that packs a diagonal pattern into fewer BCSR blocks (host, numpy).

The paper's heuristic (Appendix D): group rows whose supports overlap (Jaccard similarity)
mixed with how close they sit (diagonal proximity), b rows to a block row. Here supports
are taken at block granularity (the block columns a row touches), which is what the block
count depends on, and rows and columns are grouped in alternation. The identity order is
always a candidate, so clustering never stores more blocks than plain conversion.

y = x @ W equals (x[:, perm_rows] @ W[perm_rows][:, perm_cols])[:, argsort(perm_cols)].
"""

from __future__ import annotations

import numpy as np

from dynadiag_jax import pattern


def _supports(a_N: np.ndarray, g_N: np.ndarray, size: int, groups: int) -> np.ndarray:
  """s_SIZExG: which groups g (block indices on the other axis) each index a touches."""
  s = np.zeros((size, groups), np.float32)
  s[a_N, g_N] = 1.0
  return s


METRICS = ("jaccard", "new_blocks")


def greedy_groups(s_LxG: np.ndarray, b: int, lam: float = 0.5,
                  metric: str = "jaccard") -> np.ndarray:
  """perm_L: b-sized groups built greedily by lam * similarity + (1 - lam) * proximity.

  Each group starts at the lowest unassigned index and adds the index whose support is
  most similar to the group's union and closest (circular distance). Similarity is the
  Jaccard index (paper) or `new_blocks`: 1 - (blocks it would add) / G.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  n_groups = max(s_LxG.shape[1], 1)
  n = s_LxG.shape[0]
  size_L = s_LxG.sum(1)
  pos_L = np.arange(n)
  free_L = np.ones(n, bool)
  order = []
  while len(order) < n:
    seed = int(np.argmax(free_L))
    free_L[seed] = False
    order.append(seed)
    g_G = s_LxG[seed].copy()
    d_L = np.abs(pos_L - seed)
    prox_L = 1.0 - np.minimum(d_L, n - d_L) / max(n / 2, 1)
    for _ in range(b - 1):
      if len(order) == n:
        break
      inter_L = s_LxG @ g_G
      if metric == "jaccard":
        sim_L = inter_L / np.maximum(g_G.sum() + size_L - inter_L, 1.0)
      else:
        sim_L = 1.0 - (size_L - inter_L) / n_groups
      score_L = lam * sim_L + (1.0 - lam) * prox_L
      score_L[~free_L] = -np.inf
      j = int(np.argmax(score_L))
      free_L[j] = False
      order.append(j)
      g_G = np.maximum(g_G, s_LxG[j])
  return np.asarray(order, np.int64)


def count_blocks(r_N, c_N, perm_rows, perm_cols, m: int, n: int, b: int) -> int:
  """Blocks the cells (r, c) touch once rows and columns are permuted."""
  inv_r, inv_c = np.argsort(perm_rows), np.argsort(perm_cols)
  cb = -(-n // b)
  return int(np.unique((inv_r[r_N] // b) * cb + inv_c[c_N] // b).size)


def cluster_order(o_K, m: int, n: int, b: int, lam: float = 0.5, rounds: int = 1,
                  metrics: tuple[str, ...] = METRICS) -> tuple[np.ndarray, np.ndarray]:
  """(perm_rows (m,), perm_cols (n,)) storing the fewest blocks found (identity included).

  For each metric, `rounds` alternations of grouping rows (given the column blocks) and
  then columns (given the row blocks); the best candidate by block count wins.
  """
  pattern.check_offsets(np.asarray(o_K), m, n)
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"lam mixes Jaccard and proximity, it must lie in [0, 1], got {lam}")
  r_KxD, c_KxD = pattern.offset_coords(np.asarray(o_K, np.int64), m, n)
  r_N, c_N = r_KxD.ravel(), c_KxD.ravel()
  best = (count_blocks(r_N, c_N, np.arange(m), np.arange(n), m, n, b), np.arange(m),
          np.arange(n))
  for metric in metrics:
    p_r, p_c = np.arange(m), np.arange(n)
    for _ in range(rounds):
      inv_c = np.argsort(p_c)
      p_r = greedy_groups(_supports(r_N, inv_c[c_N] // b, m, -(-n // b)), b, lam, metric)
      inv_r = np.argsort(p_r)
      p_c = greedy_groups(_supports(c_N, inv_r[r_N] // b, n, -(-m // b)), b, lam, metric)
      for cand in ((p_r, np.arange(n)), (p_r, p_c)):
        cnt = count_blocks(r_N, c_N, *cand, m, n, b)
        if cnt < best[0]:
          best = (cnt, *cand)
  return best[1], best[2]
