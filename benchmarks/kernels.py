"""BCSR block counts, fill and estimated (or, on a GPU, measured) speed of ViT-B layers.

    python -m benchmarks.kernels [--block 16] [--tokens 197] [--batches 1,16,256]

For each ViT-B kernel shape and sparsity: K diagonals at random or as one contiguous band,
converted plainly or with row/column clustering; the blocks stored (of the dense grid),
the fewest possible, the fill, and the forward time of the BCSR kernel against the dense
GEMM, estimated from the blocks actually stored with a roofline of an H100 (bf16). On a
GPU the same script also times `spmm` against `x @ W`. Prints markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


from dynadiag_jax import pattern
from pallas_kernels import _call, bcsr

SHAPES = ((768, 768), (768, 3072), (3072, 768))
SPARSITIES = (0.6, 0.8, 0.9, 0.95, 0.99)
SWEEP = ((16, 32, 64), (0.9, 0.99))  # block sizes x sparsities of the second table
BLOCK_SIZES, BLOCK_SPARSITIES = (16, 32, 64, 128), (0.9, 0.95, 0.99)  # third table


@dataclasses.dataclass(frozen=True)
class Gpu:
  """Roofline of one GPU: peak bf16 FLOP/s, HBM and L2 bytes/s, fixed cost per kernel."""
  flops: float = 990e12
  hbm: float = 3.35e12
  l2: float = 12e12  # assumed (public microbenchmarks put H100 SXM L2 near 12 TB/s)
  launch: float = 3e-6
  dense_tile: int = 128  # a GEMM's output tile: L2 traffic = 2 * F / tile bytes


def dense_time(rows: int, m: int, n: int, g: Gpu) -> float:
  """x @ W (bf16): max(FLOPs, HBM bytes of x, W, y, L2 bytes of a tiled GEMM) + launch."""
  f = 2.0 * rows * m * n
  hbm = 2.0 * (rows * m + m * n + rows * n)
  return g.launch + max(f / g.flops, hbm / g.hbm, 2 * f / g.dense_tile / g.l2)


def bcsr_time(rows: int, m: int, n: int, blocks: int, b: int, bt: int, g: Gpu) -> float:
  """The BCSR kernel: only stored blocks are multiplied, but each b x b block costs a
  (bt x b) tile of x from L2 per batch tile, i.e. only b FLOPs per byte of x."""
  rows_p = -(-rows // bt) * bt  # the batch is padded to whole tiles
  f = 2.0 * rows_p * blocks * b * b
  hbm = 2.0 * (rows * m + blocks * b * b + rows * n) + 4.0 * (blocks + n // b + 1)
  l2 = 2.0 * rows_p * blocks * b + 2.0 * blocks * b * b * (rows_p // bt)
  return g.launch + max(f / g.flops, hbm / g.hbm, l2 / g.l2)


def offsets(kind: str, m: int, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """K offsets: `random` (uniform, distinct) or `band` (contiguous from a random start)."""
  p = pattern.num_diagonals(m, n)
  if kind == "random":
    return np.sort(rng.choice(p, k, replace=False)).astype(np.int32)
  return np.sort((rng.integers(p) + np.arange(k)) % p).astype(np.int32)


def gpu_timer():
  """A function timing spmm vs x @ W on the default GPU, or None elsewhere."""
  import jax
  if jax.default_backend() != "gpu":
    return None
  import jax.numpy as jnp
  from pallas_kernels import spmm

  def bench(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    t = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      t.append(time.perf_counter() - t0)
    return float(np.median(t))

  def timed(lay, o, m, n, rows):
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (rows, m), jnp.bfloat16)
    b = 1 if lay.cell is not None else lay.b  # block-diagonal layouts: values are blocks
    v = jax.random.normal(key, pattern.Geometry(m, n, b).values_shape(len(o)), jnp.bfloat16)
    data = bcsr.pack(v, lay) if b == 1 else v.reshape(-1, lay.b, lay.b)
    w = pattern.densify(v, o, m, n, b)
    t_s = bench(jax.jit(lambda x, d: spmm.spmm(x, d, lay)), x, data)
    t_d = bench(jax.jit(lambda x, w: x @ w), x, w)
    return t_d / t_s

  return timed


def speedups(lay, o, rows_list, gpu: Gpu, timer) -> list[str]:
  """Estimated (and, on a GPU, measured) dense / BCSR forward time for each row count."""
  st, cells = bcsr.stats(lay), []
  for rows in rows_list:
    bt = _call.batch_tile(rows)  # the automatic tile (<= 64)
    est = dense_time(rows, lay.m, lay.n, gpu) / bcsr_time(rows, lay.m, lay.n, st.blocks,
                                                           lay.b, bt, gpu)
    cells.append(f"{est:.2f}x" + (f" [{timer(lay, o, lay.m, lay.n, rows):.2f}x]"
                                  if timer else ""))
  return cells


def row(lay, s: float, kind: str, conv: str, cells: list[str]) -> str:
  st = bcsr.stats(lay)
  return (f"| {lay.m}x{lay.n} | {s:.0%} | {lay.k} | {kind} | {conv} | {lay.b} | "
          f"{st.blocks} / {st.total_blocks} ({st.blocks / st.total_blocks:.1%}) | "
          f"{st.min_blocks} | {st.fill:.1%} | " + " | ".join(cells) + " |")


def header(batches: list[int]) -> str:
  head = [f"x{bb}" for bb in batches]
  return ("| kernel | sparsity | K | offsets | conversion | block | blocks stored / grid | "
          "fewest possible | fill | " + " | ".join(head) + " |\n"
          "|---|---|---|---|---|---|---|---|---|" + "---|" * len(head))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--block", type=int, default=16)
  ap.add_argument("--tokens", type=int, default=197, help="rows of x per batch element")
  ap.add_argument("--batches", default="1,16,256")
  ap.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
  ap.add_argument("--no-cluster", action="store_true")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  b = bcsr.check_block(args.block)
  batches = [int(s) for s in args.batches.split(",")]
  rows_list = [bb * args.tokens for bb in batches]
  sparsities = [float(s) for s in args.sparsities.split(",")]
  gpu, timer = Gpu(), gpu_timer()
  t_start = time.perf_counter()

  print(f"ViT-B kernels (in x out); x has batch x {args.tokens} rows; the last columns are "
        f"the forward speed-up of the BCSR kernel over the dense GEMM (bf16) at batch "
        f"{', '.join(map(str, batches))}, estimated from the blocks stored on an H100 "
        f"roofline: {gpu.flops / 1e12:.0f} TFLOP/s, HBM {gpu.hbm / 1e12:.2f} TB/s, "
        f"L2 {gpu.l2 / 1e12:.0f} TB/s (assumed), {gpu.launch * 1e6:.0f} us per kernel; "
        f"BCSR loads a (batch tile x b) slice of x from L2 for every stored block, dense is "
        f"a GEMM with {gpu.dense_tile}x{gpu.dense_tile} tiles"
        + ("; [measured on this GPU]" if timer else "") + ".\n")
  print(header(batches))
  gains, rng = [], np.random.default_rng(args.seed)
  pats = {}
  for m, n in SHAPES:
    for s in sparsities:
      k = pattern.num_kept(m, n, s)
      for kind in ("random", "band"):
        o = pats[m, n, s, kind] = offsets(kind, m, n, k, rng)
        plain = bcsr.host_layout(o, m, n, b)
        print(row(plain, s, kind, "plain", speedups(plain, o, rows_list, gpu, timer)))
        if not args.no_cluster:
          clus = bcsr.host_layout(o, m, n, b, cluster=True)
          print(row(clus, s, kind, "clustered", speedups(clus, o, rows_list, gpu, timer)))
          gains.append((kind, bcsr.stats(plain).blocks, bcsr.stats(clus).blocks))

  if gains:
    print("\nClustering (rows then columns grouped by Jaccard similarity of their block "
          "supports mixed with proximity, paper Appendix D; best of two similarity metrics "
          "and the identity): share of blocks saved over plain conversion, all rows above\n")
    print("| offsets | layouts | min saved | mean saved | max saved |")
    print("|---|---|---|---|---|")
    for kind in ("random", "band"):
      sav = [1 - c / p for kd, p, c in gains if kd == kind]
      print(f"| {kind} | {len(sav)} | {min(sav):.1%} | {np.mean(sav):.1%} | {max(sav):.1%} |")

  blocks, sweep_s = SWEEP
  print("\nBlock size: fill against L2 traffic per FLOP (same patterns, plain conversion)\n")
  print(header(batches))
  for m, n in SHAPES:
    for s in sweep_s:
      for kind in ("random", "band"):
        o = pats.get((m, n, s, kind))
        if o is None:
          o = offsets(kind, m, n, pattern.num_kept(m, n, s), rng)
        for bb in blocks:
          lay = bcsr.host_layout(o, m, n, bb)
          print(row(lay, s, kind, "plain", speedups(lay, o, rows_list, gpu, timer)))
  print("\nBlock-diagonal patterns (DESIGN.md section 8, `DiagDense(block=b)`): K "
        "block-diagonals of b x b blocks, random offsets; the layout is the pattern "
        "(every stored block full, no conversion)\n")
  print(header(batches))
  for m, n in SHAPES:
    for s in BLOCK_SPARSITIES:
      for bb in BLOCK_SIZES:
        geo = pattern.Geometry(m, n, bb)
        o = np.sort(rng.choice(geo.P, pattern.num_kept(m, n, s, bb),
                               replace=False)).astype(np.int32)
        lay = bcsr.block_layout(o, m, n, bb)
        print(row(lay, s, "random", "none", speedups(lay, o, rows_list, gpu, timer)))
  print(f"\n({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
  main()
