"""What every pallas_call here shares: Triton compiler params and interpret-mode dispatch."""

from __future__ import annotations

import functools
from typing import Callable

import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.bcsr import check_block

compat.silence_triton_deprecation()  # jax 0.11 warns on every Triton lowering (compat.py)

# Shared memory one thread block may use on an H100 (sharedMemPerBlockOptin, 227 KiB;
# pallas_kernels/targets/h100_sxm.txtpb); an A100 allows 163 KiB.
SMEM_LIMIT = 232448


def dot_tiles(name: str, b: int, bt: int) -> tuple[int, int, int]:
  """Elements of the two tl.dot operands one program loads per loop step, and of its
  float32 accumulator."""
  if name == "bcsr_sddmm":
    return bt * b, bt * b, b * b  # x tile (bt, b), dy tile (bt, b); a (b, b) block
  return bt * b, b * b, bt * b    # x tile (bt, b), the block (b, b); a (bt, b) tile


def smem_estimate(name: str, b: int, bt: int, dtype, num_stages: int) -> int:
  """Bytes of shared memory a kernel needs at most: its dot operands once per pipeline
  stage, or its f32 accumulator when the epilogue stages it, whichever is larger.

  An upper bound of what Triton allocates (the GPU-compile suite checks it against every
  compiled kernel); the refusal below uses it, so a refused tile never reaches XLA.
  """
  a, w, acc = dot_tiles(name, b, bt)
  return max(num_stages * (a + w) * jnp.dtype(dtype).itemsize, 4 * acc)


def compiler_params(name: str, b: int, bt: int, dtype):
  """Triton params of one kernel; passing them on every pallas_call keeps GPU lowering off
  Mosaic GPU. 4 warps up to 32 x 32 blocks, 8 beyond (4 spill registers at 128 in f32);
  2 pipeline stages where they fit in shared memory, else 1; ValueError if even 1 does not.
  """
  num_warps = 4 if b <= 32 else 8
  for num_stages in (2, 1):
    if smem_estimate(name, b, bt, dtype, num_stages) <= SMEM_LIMIT:
      return compat.triton_compiler_params(num_warps=num_warps, num_stages=num_stages)
  raise ValueError(
      f"{name}: block {b} with batch tile {bt} in {jnp.dtype(dtype).name} needs "
      f"{smem_estimate(name, b, bt, dtype, 1)} bytes of shared memory per program, over "
      f"the {SMEM_LIMIT}-byte limit of an H100 (227 KiB): use a smaller block or batch tile")


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
