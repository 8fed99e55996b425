"""An exported frozen model (jax.export, plain-jax loader) against the library's, one run.

    python -m benchmarks.export                  # 784-256-256-10 MLP, 90% in fc1 and fc2

Exports the frozen model twice into a temporary folder (symbolic batch, and every dimension
concrete at batch 1), loads each as docs/EXPORT.md does (deserialize, device_put the
weights, jit exp.call), and times them interleaved round-robin, medians, against the
library's jitted frozen model (offsets closed over) and the densified nn.Dense model. Prints
the artifact sizes and a markdown table of microseconds per call.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import dynadiag_jax as dd
from benchmarks.layers import time_round_robin
from dynadiag_jax import export as ddx
from dynadiag_jax.models import MLP


def _plain(path):
  """The loader of docs/EXPORT.md (plain jax + numpy)."""
  with open(os.path.join(path, ddx.EXPORTED), "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  weights = jax.device_put(dict(np.load(os.path.join(path, ddx.WEIGHTS))))
  run = jax.jit(exp.call)
  return lambda p, x: run(weights, x)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--batches", default="1,256")
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args(argv)

  model = MLP(hidden=(256, 256),
              linear=dd.LayerFactory.from_dict({"fc1": args.sparsity, "fc2": args.sparsity}))
  x1 = jnp.zeros((1, 28, 28))
  variables, _ = dd.freeze(model.init(jax.random.PRNGKey(0), x1))
  rest = {k: v for k, v in variables.items() if k != "params"}
  library = jax.jit(lambda p, x: model.apply({"params": p, **rest}, x))
  dense = ddx.dense_model(model)
  dense_variables = ddx.densify(model, variables)
  dense_apply = jax.jit(dense.apply)

  with tempfile.TemporaryDirectory() as tmp:
    sym, one = os.path.join(tmp, "symbolic"), os.path.join(tmp, "batch1")
    ddx.export(model, variables, x1, sym)
    ddx.export(model, variables, x1, one, symbolic=())
    size = lambda p, f: os.path.getsize(os.path.join(p, f))
    print(f"cpu, 784-256-256-10 MLP, {args.sparsity:g} in fc1 and fc2, frozen (untrained); "
          f"weights.npz {size(sym, ddx.WEIGHTS)} bytes, exported.bin {size(sym, ddx.EXPORTED)} "
          f"bytes; load average at start {os.getloadavg()[0]:.1f}")
    f_sym, f_one = _plain(sym), _plain(one)
    print("| batch | exported, symbolic batch | exported, concrete batch | library (jit) | "
          "densified nn.Dense (jit) |")
    print("|---|---|---|---|---|")
    for b in (int(s) for s in args.batches.split(",")):
      x = jnp.asarray(np.random.default_rng(b).normal(size=(b, 28, 28)), jnp.float32)
      vs = {"sym": (f_sym, None, x), "lib": (library, variables["params"], x),
            "dense": (dense_apply, dense_variables, x)}
      if b == 1:
        vs["one"] = (f_one, None, x)
      for fn, p, xs in vs.values():
        jax.block_until_ready(fn(p, xs))
      calls = 200 if b == 1 else 20
      t = time_round_robin(vs, args.repeats, calls)
      us = lambda k: f"{t[k] * 1e6:.0f} us" if k in t else "-"
      print(f"| {b} | {us('sym')} | {us('one')} | {us('lib')} | {us('dense')} |")


if __name__ == "__main__":
  main()
