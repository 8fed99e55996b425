"""The fused sparse MLP against the two plain sparse layers and the dense MLP, one run.

    python -m benchmarks.fused_mlp            # ViT-S and ViT-B MLPs, 1576 rows, 90%, block 64
    python -m benchmarks.fused_mlp --quick    # ViT-S only, 3 rounds

An MLP is x (rows, d) -> act(x @ W1 + b1) @ W2 + b2 with W1 (d, 4d), W2 (4d, d), GELU as
the models have it (flax's nn.gelu, approximate=True). Variants, each jitted with frozen
offsets closed over as numpy: `dense` (two nn.Dense-like GEMMs), `unfused` (two
`diag_matmul` calls, backend auto, with GELU between: what the models ran before the fused
op) and `fused` (`backends.fused_mlp`). Modes: forward, and forward + backward (the loss,
dx and the gradients of both values and biases). Timed round-robin, interleaved, medians;
ratios are speed-ups over `dense` from the same rounds.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.layers import time_round_robin
from dynadiag_jax import ops, pattern
from dynadiag_jax.backends import fused_mlp

SHAPES = {"ViT-S": 384, "ViT-B": 768}


def variants(d: int, rows: int, sparsity: float, block: int, mode: str, overlap: bool,
             seed: int = 0) -> tuple[dict, tuple]:
  """{name: (fn, params, x)} for one MLP shape: dense, unfused and fused; (K1, P, K2, P, live).

  Offsets at random, or with `overlap` layer 2's equal to layer 1's (it reads exactly the
  hidden blocks layer 1 writes: no block is left out, the fused op's most work).
  """
  rng = np.random.default_rng(seed)
  h = 4 * d
  f32 = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
  x = f32(rows, d)
  b1, b2 = f32(h, scale=0.1), f32(d, scale=0.1)
  dense_p = (f32(d, h, scale=d ** -0.5), b1, f32(h, d, scale=h ** -0.5), b2)
  g1, g2 = pattern.Geometry(d, h, block), pattern.Geometry(h, d, block)
  k1, k2 = pattern.num_kept(d, h, sparsity, block), pattern.num_kept(h, d, sparsity, block)
  o1 = np.sort(rng.choice(g1.P, k1, replace=False)).astype(np.int32)
  o2 = o1.copy() if overlap else np.sort(rng.choice(g2.P, k2, replace=False)).astype(np.int32)
  live = len(set(((o1[:, None] + np.arange(g1.D)) % g1.P).flat)
             & set(((o2[:, None] + np.arange(g2.D)) % g2.P).flat))
  sparse_p = (f32(*g1.values_shape(k1), scale=(k1 * block) ** -0.5), b1,
              f32(*g2.values_shape(k2), scale=(k2 * block) ** -0.5), b2)
  applies = {
      "dense": lambda p, x: nn.gelu(x @ p[0] + p[1]) @ p[2] + p[3],
      "unfused": lambda p, x: ops.diag_matmul(
          nn.gelu(ops.diag_matmul(x, p[0], o1, d, h) + p[1]), p[2], o2, h, d) + p[3],
      "fused": lambda p, x: fused_mlp.fused_mlp(x, p[0], o1, p[1], p[2], o2, p[3], g1, g2),
  }
  out = {}
  for name, apply in applies.items():
    if mode == "fwd":
      fn = jax.jit(apply)
    else:
      fn = jax.jit(jax.value_and_grad(lambda p, x, a=apply: jnp.mean(a(p, x) ** 2),
                                      argnums=(0, 1)))
    params = dense_p if name == "dense" else sparse_p
    jax.block_until_ready(fn(params, x))
    out[name] = (fn, params, x)
  return out, (k1, g1.P, k2, g2.P, live)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="ViT-S only, 3 rounds")
  ap.add_argument("--rows", type=int, default=1576, help="rows (8 images x 197 tokens)")
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7)")
  args = ap.parse_args(argv)
  shapes = {"ViT-S": 384} if args.quick else SHAPES
  repeats = args.repeats or (3 if args.quick else 7)
  print(f"{jax.default_backend()}, float32, {args.rows} rows, sparsity {args.sparsity:g}, block "
        f"{args.block}, median of {repeats} interleaved rounds (3 calls each), load average at "
        f"start {os.getloadavg()[0]:.1f}\n")
  print("| MLP | mode | offsets | K in / P, K out / P | live hidden blocks | dense ms | unfused "
        "| fused | fused / unfused |")
  print("|---|---|---|---|---|---|---|---|---|")
  for label, d in shapes.items():
    for overlap in (True, False):
      for mode in ("fwd", "train"):
        vs, (k1, p1, k2, p2, live) = variants(d, args.rows, args.sparsity, args.block, mode,
                                              overlap)
        med = time_round_robin(vs, repeats, calls=3)
        base = med["dense"]
        print(f"| {label} {d}-{4 * d}-{d} | {'fwd' if mode == 'fwd' else 'fwd+bwd'} | "
              f"{'overlapping' if overlap else 'random'} | {k1} / {p1}, {k2} / {p2} | {live} / "
              f"{p1} | {base * 1e3:.2f} | {base / med['unfused']:.2f}x | "
              f"{base / med['fused']:.2f}x | {med['unfused'] / med['fused']:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
