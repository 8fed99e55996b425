"""`config.method`: DynaDiag and the baselines of DESIGN.md section 9 in one training system.

- dense: nn.Dense everywhere.
- dynadiag: DiagDense, learned diagonals (section 3); static_diag: DiagDense frozen at
  step 0 on K random diagonals per layer.
- diagheur (paper Appendix H): masks of K diagonals, every `masks.every` steps drop the
  lowest-norm diagonals and regrow as many at random; diagrigl: regrow by the norm of
  each diagonal's dense gradient (RigL over diagonals).
- rigl, set, gmp: unstructured masks over dense kernels (RigL: magnitude drop, gradient
  growth; SET: random growth; GMP: magnitude pruning from dense, cubic schedule).
- nm: N of every M consecutive inputs of each output (constant fan-in when M = all),
  evolved like RigL within each group (SRigL-like).
Every sparse layer keeps as many weights as DynaDiag's K x D at the same sparsity and
allocation. Masks live in the optimizer state (`masks.MaskState`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

import dynadiag_jax as dd
from dynadiag_jax.methods import masks, records

METHODS = ("dense", "dynadiag", "static_diag", "diagheur", "diagrigl", "rigl", "set", "gmp", "nm")
DIAG_DENSE = ("dynadiag", "static_diag")  # built from DiagDense layers
MASKED: dict[str, tuple[str, str]] = {  # method -> (mask kind, growth)
    "diagheur": ("diag", "random"), "diagrigl": ("diag", "gradient"),
    "rigl": ("unstructured", "gradient"), "set": ("unstructured", "random"),
    "gmp": ("unstructured", "none"), "nm": ("nm", "gradient"),
}


def name(config: ml_collections.ConfigDict) -> str:
  """The run's method: config.method ('dense' when config.sparse is False)."""
  m = config.get("method", "dynadiag")
  if m not in METHODS:
    raise ValueError(f"unknown config.method {m!r}; one of {METHODS}")
  return "dense" if not config.sparse else m


def diag_dense(config: ml_collections.ConfigDict) -> bool:
  """Whether the sparse layers are DiagDense (else nn.Dense, masked or not)."""
  return name(config) in DIAG_DENSE


def recipe_block(config: ml_collections.ConfigDict) -> int:
  """config.recipe.block, or the named recipe's when unset."""
  rc = config.get("recipe") or {}
  block = rc.get("block")
  return int(block) if block is not None else dd.recipe.get(rc.get("name") or "default").block


def mask_layers(config: ml_collections.ConfigDict, model: nn.Module, x: np.ndarray,
                sparsity: dict[str, float]) -> dict[str, masks.Layer]:
  """{'<path>/kernel': Layer} of the dense model's layers named in `sparsity`."""
  kind, _ = MASKED[name(config)]
  mc = config.get("masks") or {}
  block = recipe_block(config) if kind == "diag" else 1
  out = {}
  for c in dd.linear_calls(model, None, x):
    if c.name in sparsity:
      key = "/".join(c.path) + "/kernel"
      b = dd.pattern.largest_block(c.m, c.n, block) if block > 1 else 1
      out[key] = masks.layer(key, c.m, c.n, sparsity[c.name], kind, int(mc.get("group", 0)), b)
  return out


def mask_schedule(config: ml_collections.ConfigDict, steps: int) -> masks.Schedule:
  """The mask update schedule of config.masks for the run's method."""
  mc = config.get("masks") or ml_collections.ConfigDict()
  growth = MASKED[name(config)][1]
  return masks.Schedule(steps, every=int(mc.get("every", 100)),
                        drop_fraction=float(mc.get("drop_fraction", 0.3)),
                        end_fraction=float(mc.get("end_fraction", 0.75)),
                        growth=growth, gmp=name(config) == "gmp",
                        gmp_start_fraction=float(mc.get("gmp_start_fraction", 0.0)))


def wrap_optimizer(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                   model: nn.Module, x: np.ndarray, sparsity: dict[str, float],
                   steps: int) -> optax.GradientTransformation:
  """tx, wrapped in the evolving masks of a mask method (unchanged for the others)."""
  if name(config) not in MASKED or not sparsity:
    return tx
  return masks.masked(tx, mask_layers(config, model, x, sparsity), mask_schedule(config, steps),
                      int(config.seed))


def static_alpha(config: ml_collections.ConfigDict, variables: dict) -> dict | None:
  """static_diag: fresh `params` whose alphas rank K random diagonals (or the offsets of
  `config.static_patterns`, a run's patterns.json) first, for the freeze to keep; else None."""
  if name(config) != "static_diag" or dd.diag_dense.COLLECTION not in variables:
    return None
  params = jax.tree.map(np.array, variables["params"])  # a copy to edit
  key = jax.random.PRNGKey(int(config.seed) ^ 0x57A71C)
  given = _load_patterns(config.get("static_patterns", ""))
  for i, path in enumerate(dd.exploring_layers(variables)):
    node, col = params, variables[dd.diag_dense.COLLECTION]
    for k in path:
      node, col = node[k], col[k]
    p = node["alpha"].shape[0]
    # Ties broken at random: the top-K of alpha (what freeze keeps) is a random K-subset,
    # and the gates stay ~K/P, so the folded values are those of the exploring layer.
    # A random permutation as relative perturbations of 1e-3 (distinct in float32; far
    # smaller ones tie and top-k would then keep the lowest offsets).
    rank = np.asarray(jax.random.permutation(jax.random.fold_in(key, i), p))
    if given is not None:  # the given offsets rank above all others, in random order
      rank = rank + p * np.isin(np.arange(p), _given_offsets(given, path, p, int(col["k"])))
    span = p if given is None else 2 * p
    node["alpha"] = (np.full(p, 1.0 / p) * (1.0 + 1e-3 * rank / span)).astype(
        node["alpha"].dtype)
  return params


def _load_patterns(path: str) -> dict | None:
  """{layer: {m, n, block, offsets}} from a run's patterns.json, or None for ''."""
  if not path:
    return None
  given = records.read_patterns(path)
  if given is None:
    raise FileNotFoundError(f"config.static_patterns: no file {path!r} (a finished DiagDense "
                            f"run's {records.PATTERNS})")
  return given


def _given_offsets(given: dict, path: tuple[str, ...], p: int, k: int) -> np.ndarray:
  """The K offsets `given` names for the layer at `path`, checked against its P and K."""
  layer = "/".join(path)
  if layer not in given:
    raise ValueError(f"config.static_patterns has no layer {layer!r} (has {sorted(given)})")
  o = np.asarray(given[layer]["offsets"], np.int64).reshape(-1)
  if len(o) != k or len(set(o.tolist())) != k or o.min() < 0 or o.max() >= p:
    raise ValueError(f"config.static_patterns: layer {layer!r} needs {k} distinct offsets in "
                     f"[0, {p}), got {o.tolist()}")
  return o


def stored_weights(config: ml_collections.ConfigDict, model: nn.Module, x: np.ndarray,
                   sparsity: dict[str, float], opt_state: Any) -> dict[str, int] | None:
  """{layer: kept weights, 'dense': their dense size} of a mask method's masks, else None."""
  st = masks.find_state(opt_state)
  if name(config) not in MASKED or st is None:
    return None
  lays = mask_layers(config, model, x, sparsity)
  out = {k: int(np.asarray(lays[k].to_weights(np.asarray(u))).sum()) for k, u in st.masks.items()}
  out["dense"] = sum(l.m * l.n for l in lays.values())
  return out


__all__ = ["DIAG_DENSE", "MASKED", "METHODS", "diag_dense", "mask_layers", "mask_schedule",
           "masks", "name", "static_alpha", "stored_weights", "wrap_optimizer"]
