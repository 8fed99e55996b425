"""Frozen (block-)diagonal layers against nn.Dense on this machine: speed-ups, one run.

    python -m benchmarks.layers            # the full table (30-60 min on 2 busy cores)
    python -m benchmarks.layers --quick    # ViT-B MLP shapes, 1 and 1576 rows, 90 / 99%
    python -m benchmarks.layers --single --rows 1 --blocks 1 --modes fwd   # single-call latency

For each kernel shape, row count and mode (forward; forward + backward = the loss, dx and
the gradients of values and bias), every variant (nn.Dense, and a frozen layer
`diag_matmul(x, values, offsets) + bias` with offsets closed over as numpy, for each
sparsity, block and backend) is compiled, then all are timed round-robin, interleaved, and
the table gives medians as speed-ups over nn.Dense from the same rounds. Each timed sample
is n back-to-back calls of one variant (n chosen once per group so that nn.Dense's sample
lasts >= 100 ms; the same n for every variant), so weights are warm in cache as in repeated
calls of one layer, and scheduler preemptions average out on a loaded machine. A timed call
applies R distinct layers of one shape, unrolled (R = 4 at 1 row, 2 at 8 rows, 1 at 1576),
so that the ~0.05-0.1 ms of a jitted call's dispatch does not hide a 1-row layer; every
layer reads its own weight arrays, as successive layers of a model do (a `lax.scan` over
stacked weights would copy each slice first and triple nn.Dense's memory traffic).
`--single` times what an online server sees instead: one layer per call (R = 1), each
sample one call, dispatch included, median of many interleaved rounds.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import ops, pattern

SHAPES = ((768, 3072), (3072, 768), (768, 768))


def layers_per_call(rows: int) -> int:
  """R: how many layers one timed call applies (enough to dwarf dispatch at few rows)."""
  return 4 if rows == 1 else 2 if rows < 64 else 1


def _loss(apply):
  """loss(params, xs) summed over the R layers (lists of per-layer arrays)."""
  def loss(params, xs):
    return sum(jnp.mean(apply(p, x).astype(jnp.float32) ** 2) for p, x in zip(params, xs))
  return loss


def _compiled(apply, mode: str, params, xs):
  """A jitted call: forward over R layers, or loss with grads of params and x."""
  if mode == "fwd":
    fn = jax.jit(lambda ps, xs: [apply(p, x) for p, x in zip(ps, xs)])
  else:
    fn = jax.jit(jax.value_and_grad(_loss(apply), argnums=(0, 1)))
  jax.block_until_ready(fn(params, xs))
  return fn


def variants(m: int, n: int, rows: int, mode: str, sparsities, blocks, backends, seed=0,
             r: int | None = None):
  """{(sparsity, block, backend) or 'nn.Dense': (fn, params, xs)} for one shape and row count
  (r layers per call; default `layers_per_call(rows)`)."""
  r = r or layers_per_call(rows)
  rng = np.random.default_rng(seed)
  xs = [jnp.asarray(rng.normal(size=(rows, m)), jnp.float32) for _ in range(r)]
  bias = [jnp.zeros((n,), jnp.float32) for _ in range(r)]
  wb = [(jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), jnp.float32), b) for b in bias]
  out = {"nn.Dense": (_compiled(lambda p, x: x @ p[0] + p[1], mode, wb, xs), wb, xs)}
  for s in sparsities:
    for b in blocks:
      geo = pattern.Geometry(m, n, b)
      k = pattern.num_kept(m, n, s, b)
      o = np.sort(rng.choice(geo.P, k, replace=False)).astype(np.int32)
      vb = [(jnp.asarray(rng.normal(size=geo.values_shape(k)) / np.sqrt(k * b), jnp.float32), b_)
            for b_ in bias]
      for be in backends:
        apply = (lambda be_, o_: lambda p, x: ops.diag_matmul(x, p[0], o_, m, n, be_) + p[1])(be, o)
        out[(s, b, be)] = (_compiled(apply, mode, vb, xs), vb, xs)
  return out


def calls_per_sample(vs: dict, target_s: float = 0.1) -> int:
  """n: back-to-back calls per timed sample, so that nn.Dense's sample lasts >= target_s.

  On a loaded machine a call much shorter than a scheduler time slice is either untouched
  or preempted whole, and medians of such calls swing by several x (measured: 1-row
  ratios moved 2-10x between runs); samples of many calls average the preemptions out.
  """
  fn, p, xs = vs["nn.Dense"]
  t = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(fn(p, xs))
  return max(1, math.ceil(target_s / ((time.perf_counter() - t) / 3)))


def time_round_robin(vs: dict, repeats: int, calls: int = 1) -> dict:
  """Median seconds per call of each variant; all timed in turn, `calls` back to back."""
  times = {k: [] for k in vs}
  for _ in range(repeats):
    for key, (fn, p, xs) in vs.items():
      t = time.perf_counter()
      for _ in range(calls):
        out = fn(p, xs)
      jax.block_until_ready(out)
      times[key].append((time.perf_counter() - t) / calls)
  return {k: statistics.median(t) for k, t in times.items()}


def auto_choice(m, n, b, s, rows) -> str:
  k = pattern.num_kept(m, n, s, b)
  return ops.resolve_backend("auto", pattern.Geometry(m, n, b), rows, k).name


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="ViT-B MLP shapes, rows 1 and 1576, sparsity 0.9 and 0.99, blocks 1 and 64")
  ap.add_argument("--shapes", default=None, help="e.g. 768x3072,3072x768")
  ap.add_argument("--rows", default=None, help="e.g. 1,8,1576")
  ap.add_argument("--sparsity", default=None, help="e.g. 0.9,0.95,0.99")
  ap.add_argument("--blocks", default=None, help="e.g. 1,16,32,64")
  ap.add_argument("--backends", default="dense,xla",
                  help="backends timed; the 'auto' column is the backend auto picks (it "
                       "dispatches at trace time, so its program is that backend's)")
  ap.add_argument("--modes", default="fwd,train", help="fwd and/or train (fwd + bwd)")
  ap.add_argument("--repeats", type=int, default=None,
                  help="timed rounds (default 7, quick 5, single 201)")
  ap.add_argument("--single", action="store_true",
                  help="single calls: one layer per call, one call per sample (latency)")
  args = ap.parse_args(argv)
  q = args.quick
  shapes = ([tuple(int(a) for a in s.split("x")) for s in args.shapes.split(",")] if args.shapes
            else [(768, 3072), (3072, 768)] if q else list(SHAPES))
  rows_l = [int(a) for a in (args.rows or ("1,1576" if q else "1,8,1576")).split(",")]
  sps = [float(a) for a in (args.sparsity or ("0.9,0.99" if q else "0.9,0.95,0.99")).split(",")]
  blocks = [int(a) for a in (args.blocks or ("1,64" if q else "1,16,32,64")).split(",")]
  backends = args.backends.split(",")
  modes = args.modes.split(",")
  repeats = args.repeats or (201 if args.single else 5 if q else 7)
  for be in backends:
    ops.check_backend_name(be)
  sample = ("each sample one call of one layer (dispatch included)" if args.single else
            "each sample n back-to-back calls (n: nn.Dense's sample >= 100 ms)")
  print(f"{jax.default_backend()} ({jax.device_count()} device), float32, median of {repeats} "
        f"interleaved rounds, {sample}; "
        f"numbers are speed-ups over nn.Dense (higher is faster); load average at start "
        f"{os.getloadavg()[0]:.1f}", flush=True)
  head = ("| kernel | rows | mode | sparsity | K / P | block | nn.Dense ms | "
          + " | ".join(backends) + " | auto | auto / best |")
  lines = [head, "|---" * (head.count("|") - 1) + "|"]
  print("\n".join(lines), flush=True)
  for m, n in shapes:
    for rows in rows_l:
      for mode in modes:
        t0 = time.perf_counter()
        print(f"  compiling {m}x{n}, {rows} rows, {mode} ...", file=sys.stderr, flush=True)
        vs = variants(m, n, rows, mode, sps, blocks, backends, r=1 if args.single else None)
        calls = 1 if args.single else calls_per_sample(vs)
        print(f"  timing {len(vs)} variants, {calls} calls per sample "
              f"({time.perf_counter() - t0:.0f} s to compile) ...", file=sys.stderr, flush=True)
        med = time_round_robin(vs, repeats, calls)
        r = 1 if args.single else layers_per_call(rows)
        base = med["nn.Dense"]
        for s in sps:
          for b in blocks:
            geo = pattern.Geometry(m, n, b)
            k = pattern.num_kept(m, n, s, b)
            up = {be: base / med[(s, b, be)] for be in backends}
            cells = [f"{up[be]:.2f}x" for be in backends]
            pick = auto_choice(m, n, b, s, rows)
            auto = (f"{pick} {up[pick]:.2f}x | {up[pick] / max(up.values()):.2f}" if pick in up
                    else f"{pick} | -")
            line = (f"| {m}x{n} | {rows} | {'fwd' if mode == 'fwd' else 'fwd+bwd'} | {s:g} | "
                    f"{k} / {geo.P} | {b} | {base / r * 1e3:.3f} | " + " | ".join(cells)
                    + f" | {auto} |")
            lines.append(line)
            print(line, flush=True)
        del vs


if __name__ == "__main__":
  main()
