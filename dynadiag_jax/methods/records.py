"""What a run leaves for the sweep: per-example test correctness, alpha over training, patterns."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

import dynadiag_jax as dd
from dynadiag_jax import data
from dynadiag_jax.diag_dense import COLLECTION

PREDICTIONS = "correct.npy"  # bool (num_test,) images / (num_test x tokens,) text
TRACE = "alpha.jsonl"  # {step, layer, temperature, k, alpha (float32, exact)}: one exploring layer
PATTERNS = "patterns.json"  # {layer: {m, n, block, offsets}} of DiagDense layers


def correct(model: nn.Module, variables: Any, source, kind: str, batch: int = 500) -> np.ndarray:
  """Whether each test example (each target token, for text) is predicted right, in order."""
  kx, ky = ("image", "label") if kind == "image" else ("inputs", "targets")
  const = jax.tree.map(np.asarray, variables)
  fn = jax.jit(lambda x: model.apply(const, x, train=False).argmax(-1))
  out = []
  with contextlib.closing(data.eval_batches(source, batch, num_devices=1)) as it:
    for b in it:
      x, y, m = b[kx][0], b[ky][0], np.asarray(b["mask"][0]).astype(bool)
      hit = np.asarray(fn(x)) == np.asarray(y)
      out.append(hit[m].reshape(-1))
  return np.concatenate(out)


def _first_exploring(variables: Any) -> tuple[str, ...] | None:
  paths = dd.exploring_layers(variables)
  return paths[0] if paths else None


def trace(workdir: str, step: int, state: Any, temperature: float,
          leaf: Callable[[Any], np.ndarray] | None = None) -> None:
  """Appends alpha, K and T of the first exploring layer of a replicated state to alpha.jsonl.

  leaf: reads one leaf as numpy (default: the first copy of a pmap-replicated leaf).
  """
  leaf = leaf or (lambda x: np.asarray(x.addressable_shards[0].data)[0])
  first = lambda x: leaf(x) if hasattr(x, "addressable_shards") else np.asarray(x)
  extra = state.extra
  if COLLECTION not in extra:
    return
  path = _first_exploring({COLLECTION: extra[COLLECTION]})
  if path is None:
    return
  p, c = state.params, extra[COLLECTION]
  for k in path:
    p, c = p[k], c[k]
  rec = {"step": int(step), "layer": "/".join(path), "temperature": float(temperature),
         "k": int(first(c["k"])), "gate": dd.gates.name_of(int(first(c["gate"]))),
         "alpha": [float(str(a)) for a in first(p["alpha"]).astype(np.float32)]}  # exact
  with open(os.path.join(workdir, TRACE), "a") as f:
    f.write(json.dumps(rec) + "\n")


def read_trace(workdir: str) -> list[dict]:
  """alpha.jsonl records by step (the last one written wins after a resume)."""
  path = os.path.join(workdir, TRACE)
  if not os.path.exists(path):
    return []
  by = {}
  with open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        r = json.loads(line)
        by[r["step"]] = r
  return [by[s] for s in sorted(by)]


def patterns(model: nn.Module, variables: Any, x: np.ndarray) -> dict[str, dict]:
  """{layer path: {m, n, block, offsets}} of the frozen DiagDense layers."""
  out = {}
  for c in dd.linear_calls(model, variables, x):
    if not (c.sparse and c.frozen):
      continue
    node = variables[COLLECTION]
    for k in c.path:
      node = node[k]
    out["/".join(c.path)] = {"m": c.m, "n": c.n, "block": int(getattr(c, "block", 1) or 1),
                             "offsets": np.asarray(node["offsets"]).astype(int).tolist()}
  return out


def read_patterns(path: str) -> dict[str, dict] | None:
  """{layer: {m, n, block, offsets}} from a patterns.json, or None when there is no such file."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write(workdir: str, model: nn.Module, variables: Any, source, kind: str,
          x: np.ndarray) -> None:
  """correct.npy and patterns.json of a finished run."""
  np.save(os.path.join(workdir, PREDICTIONS), correct(model, variables, source, kind))
  with open(os.path.join(workdir, PATTERNS), "w") as f:
    json.dump(patterns(model, variables, x), f)
