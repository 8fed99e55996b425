"""What every pallas_call here shares: Triton compiler params and interpret-mode dispatch."""

from __future__ import annotations

import functools
from typing import Callable

from jax import lax
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.bcsr import check_block

NUM_WARPS = 4
NUM_STAGES = 2


def compiler_params() -> pl_triton.CompilerParams:
  """Triton params; passing them on every pallas_call keeps GPU lowering off Mosaic GPU."""
  return pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def next_pow2(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


def batch_tile(rows: int, tile: int | None = None, cap: int = 64) -> int:
  """The batch tile: `tile` checked, else next_pow2(rows) clipped to [16, cap]."""
  if tile is not None:
    return check_block(tile, "batch tile")
  return min(cap, max(16, next_pow2(rows)))


def dispatch(fn: Callable, *args, interpret: bool | None = None):
  """fn(*args, interpret=...): None picks Triton on cuda/rocm and interpret elsewhere.

  The choice is made at lowering time (lax.platform_dependent), so the same jaxpr runs
  interpreted on CPU and lowers to `__gpu$xla.gpu.triton` when lowered for cuda.
  """
  if interpret is not None:
    return fn(*args, interpret=bool(interpret))
  gpu = functools.partial(fn, interpret=False)
  return lax.platform_dependent(*args, cuda=gpu, rocm=gpu,
                                default=functools.partial(fn, interpret=True))
