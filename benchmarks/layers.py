"""Measured on this machine: DiagDense (dense backend) against nn.Dense, forward + backward.

    python benchmarks/layers.py [--rows 197] [--repeats 15]

For ViT-B shapes at 90% sparsity: one jitted step computing the loss and the gradients
of params and inputs, for nn.Dense, an exploring DiagDense at K_active = P (the start of
exploration) and K_active = K (its end), and a frozen DiagDense (K diagonals, offsets
closed over as in the train step). Variants run interleaved, round-robin, and the table
gives medians and ratios to nn.Dense from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import dynadiag_jax as dd

SHAPES = ((768, 768), (768, 3072), (3072, 768))


def _step(model: nn.Module, variables: dict, closed: dict | None = None):
  """jit(params, x) -> (loss, grads): the work of one training step of one layer."""
  def loss(params, x, extra):
    return jnp.mean(model.apply({"params": params, **extra}, x) ** 2)

  if closed is None:
    extra = {k: v for k, v in variables.items() if k != "params"}
    return jax.jit(lambda p, x: jax.value_and_grad(loss, argnums=(0, 1))(p, x, extra))
  return jax.jit(lambda p, x: jax.value_and_grad(loss, argnums=(0, 1))(p, x, closed))


def variants(m: int, n: int, sparsity: float, x: jax.Array):
  """{name: (fn, params)} for the four layers of one shape."""
  key = jax.random.PRNGKey(0)
  out = {}
  dense = nn.Dense(n)
  vd = dense.init(key, x)
  out["nn.Dense"] = (_step(dense, vd), vd["params"])
  layer = dd.DiagDense(n, sparsity=sparsity, backend="dense")
  v = layer.init(key, x)
  v = {**v, "params": {**v["params"], "alpha": jax.random.normal(key, (max(m, n),))}}
  out["DiagDense K_active=P"] = (_step(layer, dd.set_k_active(v, 1.0)), v["params"])
  vk = dd.set_k_active(v, 0.0)
  out["DiagDense K_active=K"] = (_step(layer, vk), vk["params"])
  frozen, _ = dd.freeze(vk)
  const = jax.tree.map(np.asarray, {k: x for k, x in frozen.items() if k != "params"})
  out["DiagDense frozen"] = (_step(layer, frozen, closed=const), frozen["params"])
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=197, help="rows of x (tokens x batch)")
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--sparsity", type=float, default=0.9)
  args = ap.parse_args()
  print(f"{jax.default_backend()} ({jax.device_count()} device), x: {args.rows} rows, "
        f"sparsity {args.sparsity}, median of {args.repeats} interleaved runs, fwd + bwd\n")
  head = "| kernel (in x out) | K / P | layer | median ms | vs nn.Dense |"
  print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
  for m, n in SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(1), (args.rows, m))
    vs = variants(m, n, args.sparsity, x)
    times = {k: [] for k in vs}
    for fn, p in vs.values():
      jax.block_until_ready(fn(p, x))  # compile
    for _ in range(args.repeats):
      for k, (fn, p) in vs.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(p, x))
        times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    kp = f"{dd.pattern.num_kept(m, n, args.sparsity)} / {max(m, n)}"
    for k, ms in med.items():
      print(f"| {m}x{n} | {kp} | {k} | {ms:.2f} | {ms / med['nn.Dense']:.2f}x |")


if __name__ == "__main__":
  main()
