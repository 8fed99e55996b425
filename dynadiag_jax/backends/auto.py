"""The `auto` rule: which backend `diag_matmul` runs, by platform, block, rows and K / P.

Measured on CPU with `benchmarks/layers.py` (docs/SPEED_CPU.md, where the table and
this rule sit side by side):
- block = 1: the dense backend scatters the K diagonals into W on every call, which loses
  to `nn.Dense` itself by 4-20x at few rows; `xla` reads only the K x D values (windows
  of x, one vectorised fusion per group of diagonals). From `DENSE_ROWS_B1` rows on, `xla`
  takes dvalues from the GEMM x.T @ dy and keeps the windows for the gather-form product
  (y of a tall kernel, dx of a wide one) while K / P <= `WINDOWS_MAX_DENSITY_B1`, and for
  the scatter-form product (accumulator windows: y of a wide kernel, dx of a tall one)
  only while K / P <= `SCATTER_MAX_DENSITY_B1`, a GEMM on W above it (quiet-machine grid:
  768x3072 forward at K / P = 0.05 and 0.1 measured 0.79x / 0.64x of nn.Dense by windows
  against 0.91x by GEMM; 1.28x by windows at 0.01). Denser than
  `WINDOWS_MAX_DENSITY_B1`, every product is the dense backend's GEMM, so `dense` there.
- block >= 16: with few rows `xla` wins for the same reason; with many rows its batched
  b x b products beat the dense GEMM while K / P stays below a bound that grows with b
  (small blocks make small, inefficient products).
GPU is not measured here (no GPU in this project). Assumption, from the roofline of
`benchmarks/kernels.md`: full-block BCSR (block >= 16) does (1 - s) of the dense
tensor-core work, so `pallas` there; block = 1 with learned (scattered) offsets touches
nearly every BCSR block and estimates at 0.2-1.0x of dense, so `dense` there.
"""

from __future__ import annotations

from dynadiag_jax.pattern import Geometry

# block b -> largest K / P at which `xla` beats `dense` on CPU (measured, b >= 16).
CPU_XLA_MAX_DENSITY = {16: 0.07, 32: 0.15, 64: 0.3, 128: 0.4}
DENSE_ROWS_B1 = 64  # b = 1, xla backend: from here on dvalues come from a GEMM x.T @ dy
WINDOWS_MAX_DENSITY_B1 = 0.11  # b = 1, many rows: gather-form windows up to this K / P (90%)
SCATTER_MAX_DENSITY_B1 = 0.02  # b = 1, many rows: scatter-form windows up to this K / P


def _max_density(b: int) -> float:
  """The K / P bound of the largest measured block not above b (0 below 16)."""
  known = [k for k in CPU_XLA_MAX_DENSITY if k <= b]
  return CPU_XLA_MAX_DENSITY[max(known)] if known else 0.0


def few_rows(rows) -> bool:
  """rows < DENSE_ROWS_B1; a symbolic row count (jax.export, any batch) counts as many."""
  return isinstance(rows, int) and rows < DENSE_ROWS_B1


def b1_windows(rows, k: int, p: int, scatter: bool) -> bool:
  """Whether the `xla` backend runs a block-1 product y / dx as windows over the K diagonals
  (few rows, or K / P within the bound of its form: `scatter` for the accumulator form),
  else as the dense backend's GEMM on W."""
  bound = SCATTER_MAX_DENSITY_B1 if scatter else WINDOWS_MAX_DENSITY_B1
  return few_rows(rows) or k / p <= bound


def choose(geo: Geometry | None, rows: int | None, k: int | None, platform: str) -> str:
  """The backend name for one product: 'dense', 'xla' or 'pallas'."""
  if platform == "gpu":
    return "pallas" if geo is None or geo.block >= 16 else "dense"
  if geo is None or rows is None or k is None:
    return "dense"
  if few_rows(rows):
    return "xla"
  if geo.block == 1:
    return "xla" if k / geo.P <= WINDOWS_MAX_DENSITY_B1 else "dense"
  return "xla" if k / geo.P <= _max_density(geo.block) else "dense"
