"""Per-layer sparsity from a global one: uniform, ERK and compute-fraction."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from dynadiag_jax import pattern
from dynadiag_jax.probe import LinearCall

METHODS = ("uniform", "erk", "compute_fraction")


def _group(calls: Iterable[LinearCall], names: Iterable[str]) -> dict[str, dict]:
  """{name: dict(m, n, count, rows)} for the layers called `names` (same shape per name)."""
  names = set(names)
  groups: dict[str, dict] = {}
  for c in calls:
    if c.name not in names:
      continue
    g = groups.setdefault(c.name, dict(m=c.m, n=c.n, count=0, rows=c.rows))
    if (g["m"], g["n"]) != (c.m, c.n):
      raise ValueError(f"layers named {c.name!r} have shapes {(g['m'], g['n'])} and "
                       f"{(c.m, c.n)}; allocation gives one sparsity per name")
    g["count"] += 1
  missing = names - set(groups)
  if missing:
    raise ValueError(f"no linear layer named {sorted(missing)} in the model")
  return groups


def _capped_density(weight: np.ndarray, size: np.ndarray, budget: float) -> np.ndarray:
  """density = min(1, c * weight) with sum(size * density) == budget."""
  capped = np.zeros(weight.shape, bool)
  for _ in range(len(weight) + 1):
    free = budget - size[capped].sum()
    c = free / (size[~capped] * weight[~capped]).sum()
    dens = np.where(capped, 1.0, c * weight)
    if not (dens > 1.0).any():
      return dens
    capped |= dens > 1.0
  return np.minimum(dens, 1.0)


def allocate(calls: Iterable[LinearCall], sparsity: float, names: Iterable[str],
             method: str = "compute_fraction") -> dict[str, float]:
  """{name: sparsity} for the layers `names` so their non-zeros meet 1 - sparsity overall.

  uniform: every layer at `sparsity`. erk: density proportional to (m + n) / (m n)
  (Erdos-Renyi-Kernel, as in RigL). compute_fraction: each layer's share of the kept
  weights is its share of the dense FLOPs (m n x rows per call), so density follows the
  rows a layer processes. Densities above 1 are capped and the rest re-spread.
  """
  s = pattern.check_sparsity(sparsity)
  if method not in METHODS:
    raise ValueError(f"unknown allocation {method!r}; choose one of {METHODS}")
  groups = _group(calls, names)
  keys = sorted(groups)
  if not keys:
    return {}
  m = np.array([groups[k]["m"] for k in keys], float)
  n = np.array([groups[k]["n"] for k in keys], float)
  size = np.array([groups[k]["count"] for k in keys], float) * m * n
  if method == "uniform":
    weight = np.ones_like(m)
  elif method == "erk":
    weight = (m + n) / (m * n)
  else:
    weight = np.array([groups[k]["rows"] for k in keys], float)
  dens = _capped_density(weight, size, (1.0 - s) * size.sum())
  return {k: float(min(max(1.0 - d, 0.0), 1.0 - 1e-9)) for k, d in zip(keys, dens)}
