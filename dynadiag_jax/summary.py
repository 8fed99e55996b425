"""Per-layer table of shapes, kept diagonals and stored against dense parameters."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from dynadiag_jax.probe import LinearCall, linear_calls


def _params_under(params: Any, path: tuple[str, ...]) -> int:
  node = params
  for key in path:
    node = node[key]
  return sum(math.prod(x.shape) for x in jax.tree.leaves(node))


def totals(model: nn.Module, variables: Any, *inputs, **kwargs) -> dict[str, Any]:
  """Counts over the whole model: rows per linear layer and stored vs dense parameters.

  `stored_params` counts the non-zeros of each DiagDense kernel (K x D) and every other
  parameter as is; `dense_params` counts the same model with every kernel dense.
  `sparsity` is the share of zeros over the DiagDense kernels.
  """
  calls = linear_calls(model, variables, *inputs, **kwargs)
  params = variables["params"]
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  linear_held = sum(_params_under(params, c.path) for c in calls)
  bias = sum(c.n for c in calls if c.use_bias)
  other = total - linear_held
  sparse = [c for c in calls if c.sparse]
  sparse_dense = sum(c.m * c.n for c in sparse)
  return dict(
      layers=calls,
      stored_params=other + bias + sum(c.nonzeros for c in calls),
      dense_params=other + bias + sum(c.m * c.n for c in calls),
      sparsity=(1.0 - sum(c.nonzeros for c in sparse) / sparse_dense) if sparse else 0.0,
  )


def _row(c: LinearCall) -> list[str]:
  b = c.n if c.use_bias else 0
  kind = ("diag, frozen" if c.frozen else "diag") if c.sparse else "dense"
  k = f"{c.k}" + (f" ({c.k_active} active)" if c.sparse and c.k_active != c.k else "")
  return ["/".join(c.path), kind, f"{c.m}x{c.n}", str(c.p), k if c.sparse else "-",
          f"{c.nonzeros / (c.m * c.n):.3f}", f"{c.nonzeros + b:,}", f"{c.m * c.n + b:,}"]


def summarize(model: nn.Module, variables: Any, *inputs, **kwargs) -> str:
  """A table per linear layer: shape, P, K, density, stored vs dense parameters."""
  t = totals(model, variables, *inputs, **kwargs)
  head = ["layer", "kind", "m x n", "P", "K", "density", "stored", "dense"]
  rows = [head] + [_row(c) for c in t["layers"]]
  rows.append(["total (all params)", "", "", "", "", f"{1 - t['sparsity']:.3f}",
               f"{t['stored_params']:,}", f"{t['dense_params']:,}"])
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  fmt = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                            for i, (v, w) in enumerate(zip(r, widths)))
  rule = "-" * len(fmt(head))
  lines = [fmt(head), rule] + [fmt(r) for r in rows[1:-1]] + [rule, fmt(rows[-1])]
  lines.append(f"sparsity of the DiagDense kernels: {t['sparsity']:.4f}")
  return "\n".join(lines)
