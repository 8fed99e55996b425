"""Per-layer table and totals: kernel weights held against dense, biases and all parameters apart."""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from dynadiag_jax import cover, mixing, pattern
from dynadiag_jax.diag_dense import COLLECTION
from dynadiag_jax.probe import LinearCall, linear_calls


def _size(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _mask_key(c: LinearCall) -> str:
  """A layer's name in a mask method's counts ('<path>/kernel')."""
  return "/".join(c.path) + "/kernel"


def totals(model: nn.Module, variables: Any, *inputs, masks_kept: Mapping[str, int] | None = None,
           **kwargs) -> dict[str, Any]:
  """Counts over the whole model, each density labelled by what it is over.

  Kernel weights are counted from each layer's pattern (K x D x b x b for a DiagDense,
  m x n for nn.Dense), or, for an nn.Dense a mask method masks, from `masks_kept`
  ({'<path>/kernel': weights its mask keeps}). `sparsity`: share of zeros over the sparse
  kernels (DiagDense and masked); `kernel_sparsity`: over every linear kernel;
  `param_density`: stored over dense parameters, all parameters (kernels, biases, norms,
  embeddings) counted.
  """
  kept = dict(masks_kept or {})
  calls = linear_calls(model, variables, *inputs, **kwargs)
  total = _size(variables["params"])
  linear = sum(_size(_at(variables["params"], c.path)) for c in calls)
  other = total - linear  # norms, embeddings, ... (not linear layers)
  biases = sum(c.n for c in calls if c.use_bias)
  held_by = {c.path: kept.get(_mask_key(c), c.nonzeros) for c in calls}
  sparse = [c for c in calls if c.sparse or _mask_key(c) in kept]
  held = sum(held_by.values())
  dense = sum(c.m * c.n for c in calls)
  s_held, s_dense = sum(held_by[c.path] for c in sparse), sum(c.m * c.n for c in sparse)
  stored, full = other + biases + held, other + biases + dense
  return dict(
      layers=calls, held=held_by, masked=sorted(_mask_key(c) for c in calls if _mask_key(c) in kept),
      kernel_weights=held, dense_kernel_weights=dense, biases=biases, other_params=other,
      stored_params=stored, dense_params=full,
      sparsity=(1.0 - s_held / s_dense) if sparse else 0.0,
      kernel_sparsity=(1.0 - held / dense) if dense else 0.0,
      param_density=stored / full if full else 1.0,
  )


def _at(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def unconnected(variables: Any, c: LinearCall) -> tuple[int, int] | None:
  """(inputs, outputs) of a DiagDense that no kept diagonal touches (None for nn.Dense).

  Frozen layers by their offsets, exploring ones by the top-K of alpha, or `cover.select`'s
  K with recipe.cover (what the freeze keeps). A mixing permutation changes which features
  these are, not how many. A wrapped diagonal of a rectangular layer covers only D = min / b blocks of the
  long side, so K overlapping ones can leave inputs or outputs with no weight at all.
  """
  if not c.sparse:
    return None
  col = _at(variables.get(COLLECTION, {}), c.path)
  if "offsets" in col:
    o_K = np.asarray(col["offsets"]).reshape(-1)
  else:
    alpha = np.asarray(_at(variables["params"], c.path)["alpha"]).reshape(-1)
    if "cover" in col:
      o_K = np.asarray(cover.select(alpha, c.k, c.d))
    else:
      o_K = np.sort(np.argsort(-alpha, kind="stable")[:c.k])
  rows_KxD, cols_KxD = pattern.offset_coords(o_K.astype(np.int32), c.m, c.n, c.block)
  b = c.block
  return (c.m - b * len(np.unique(rows_KxD)), c.n - b * len(np.unique(cols_KxD)))


def permuted(variables: Any, c: LinearCall) -> float | None:
  """Share of a DiagDense's input slots that read another feature than their own (None: no
  permutation); a learned mixing while exploring: that of the permutation the freeze would keep."""
  if not c.sparse:
    return None
  col = _at(variables.get(COLLECTION, {}), c.path)
  logits = _at(variables["params"], c.path).get(mixing.LOGITS)
  if logits is not None:
    perm = mixing.hard(np.asarray(logits))
  elif "perm" in col:
    perm = np.asarray(col["perm"]).reshape(-1)
  else:
    return None
  return float(np.mean(perm != np.arange(perm.size)))


def _row(c: LinearCall, held: int, masked: bool,
         dead: tuple[int, int] | None = None, moved: float | None = None) -> list[str]:
  kind = ("diag, frozen" if c.frozen else "diag") if c.sparse else (
      "dense, masked" if masked else "dense")
  k = f"{c.k}" + (f" ({c.k_active} active)" if c.sparse and c.k_active != c.k else "")
  got = 1.0 - held / (c.m * c.n)
  return ["/".join(c.path), kind, f"{c.m}x{c.n}", str(c.block) if c.sparse else "-",
          str(c.p) if c.sparse else "-", k if c.sparse else "-",
          f"{c.requested:.3f}" if c.sparse else "-", f"{got:.4f}", f"{held:,}",
          f"{c.m * c.n:,}", f"{c.n if c.use_bias else 0:,}",
          "-" if dead is None else f"{dead[0]:,} / {dead[1]:,}",
          "-" if moved is None else f"{moved:.0%}"]


def summarize(model: nn.Module, variables: Any, *inputs,
              masks_kept: Mapping[str, int] | None = None, **kwargs) -> str:
  """A table per linear layer (shape, block, P, K, sparsity asked and got, weights, inputs and
  outputs no kept diagonal touches, share of inputs a mixing permutes) and totals; `masks_kept` as in `totals` (a mask method's
  layers at what their masks keep)."""
  t = totals(model, variables, *inputs, masks_kept=masks_kept, **kwargs)
  head = ["layer", "kind", "m x n", "b", "P", "K", "sparsity asked", "sparsity got",
          "kernel weights", "dense kernel", "bias", "unconnected in / out", "permuted"]
  rows = [head] + [_row(c, t["held"][c.path], _mask_key(c) in t["masked"],
                        unconnected(variables, c), permuted(variables, c))
                   for c in t["layers"]]
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  fmt = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                            for i, (v, w) in enumerate(zip(r, widths)))
  rule = "-" * len(fmt(head))
  lines = [fmt(head), rule] + [fmt(r) for r in rows[1:]] + [rule]
  lines += [
      (f"masked kernels: sparsity {t['sparsity']:.4f}" if t["masked"] else
       f"DiagDense kernels: sparsity {t['sparsity']:.4f}"),
      f"all linear kernels: {t['kernel_weights']:,} of {t['dense_kernel_weights']:,} weights "
      f"(sparsity {t['kernel_sparsity']:.4f})",
      f"all parameters: {t['stored_params']:,} of {t['dense_params']:,} (density "
      f"{t['param_density']:.4f}; biases {t['biases']:,}, other {t['other_params']:,})",
  ]
  return "\n".join(lines)
