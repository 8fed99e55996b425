"""What the Pallas kernels compile to on an H100 (sm_90a), no GPU needed: a markdown table.

    python -m benchmarks.gpu_compile [--shape 768x3072] [--sparsity 0.9] [--rows 1576]
                                     [--tile N] [--blocks 16,32,64,128]

For diagonals in BCSR blocks of b, and for block-diagonal patterns of b x b blocks
(`DiagDense(block=b)`), each dtype x b: value_and_grad of `diag_matmul(...,
backend="pallas")` on one layer (random offsets closed over: the exact frozen layout) is
compiled for the
H100 target through XLA and Triton (`pallas_kernels.aot`); per kernel it prints the grid,
threads, pipeline stages, shared memory (XLA's thunk sequence), registers and spills
(`ptxas -v`), the MMA instruction and the PTX size. Runs itself in the compile venv of
`tests/gpu_compile_env.py` (created on first use), as the tests do.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _in_compile_venv() -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def _reexec() -> int:
  from tests import gpu_compile_env
  py = gpu_compile_env.ensure()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1",
             TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([str(py), "-m", "benchmarks.gpu_compile", *sys.argv[1:]], env=env,
                        cwd=ROOT).returncode


def mma_summary(instr: str) -> str:
  """'wgmma.mma_async.sync.aligned.m64n16k8.f32.tf32.tf32' -> 'wgmma m64n16k8 tf32'."""
  parts = instr.split(".")
  shape = next((p for p in parts if re.fullmatch(r"m\d+n\d+k\d+", p)), "?")
  inputs = next((p for p in parts if p in ("tf32", "bf16", "f16", "e4m3", "e5m2", "s8")), "?")
  return f"{'wgmma' if parts[0] == 'wgmma' else 'mma.sync'} {shape} {inputs}"


def rows_for(m: int, n: int, sparsity: float, rows: int, dtype: str, block: int, tile,
             device, block_diagonal: bool) -> list[str]:
  """Table rows of one compile: diagonals in BCSR blocks of `block`, or block-diagonals."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dynadiag_jax import ops, pattern
  from pallas_kernels import _call, aot
  geo = pattern.Geometry(m, n, block if block_diagonal else 1)
  k = pattern.num_kept(m, n, sparsity, geo.block)
  o = np.sort(np.random.default_rng(0).choice(geo.P, k, replace=False)).astype(np.int32)
  cfg = ops.KernelConfig(bcsr_block=16 if block_diagonal else block, batch_tile=tile)

  def loss(x, v):
    y = ops.diag_matmul(x, v, o, m, n, "pallas", kernel=cfg)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  sds = lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype))
  reps = aot.compile_kernels(jax.value_and_grad(loss, argnums=(0, 1)),
                             sds((rows, m)), sds(geo.values_shape(k)), device=device)
  what = f"block-diagonal, b = {block}" if block_diagonal else f"diagonals, BCSR {block}"
  bt = _call.batch_tile(rows, tile)
  out = []
  for r in sorted(reps, key=lambda r: ("bcsr_spmm", "bcsr_spmm_t", "bcsr_sddmm").index(r.name)):
    p = _call.compiler_params(r.name, block, bt, jnp.dtype(dtype))
    grid = "x".join(str(g) for g in r.grid if g > 1) or "1"
    mma = mma_summary(r.mma)
    out.append(f"| {what} | {r.name} | {dtype} | {block} | {bt} | {grid} | {r.threads} | "
               f"{p.num_stages} | {r.smem / 1024:.0f} KiB | {r.registers} | {r.spill_bytes} | "
               f"{mma} | {r.ptx_lines} |")
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="768x3072")
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--rows", type=int, default=197 * 8)
  ap.add_argument("--tile", type=int, default=None, help="batch tile (default: automatic)")
  ap.add_argument("--blocks", default="16,32,64,128")
  a = ap.parse_args()
  if not _in_compile_venv():
    return _reexec()
  from pallas_kernels import aot
  m, n = (int(s) for s in a.shape.split("x"))
  dev = aot.target_device()
  print(f"H100 (sm_90a) compile of value_and_grad(diag_matmul) at {m}x{n}, "
        f"{a.sparsity:.0%} sparsity, {a.rows} rows, random offsets (exact layout), "
        f"grid = batch tiles x output block columns (SpMM) or stored blocks (SDDMM)\n")
  print("| pattern | kernel | dtype | block | batch tile | grid | threads | stages | "
        "shared mem | registers | spill bytes | MMA | PTX lines |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for block_diagonal in (False, True):
    for dtype in ("float32", "bfloat16"):
      for b in (int(s) for s in a.blocks.split(",")):
        for line in rows_for(m, n, a.sparsity, a.rows, dtype, b, a.tile, dev, block_diagonal):
          print(line, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
