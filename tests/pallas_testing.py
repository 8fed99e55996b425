"""Test helpers: fresh seeds, a float64 numpy reference of the three products, tolerances."""

from __future__ import annotations

import functools
import os
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import pattern

# Max-norm relative tolerances: |got - want| <= tol * (|want| + max|want|), elementwise.
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def fresh_seed() -> int:
  """A new seed every run (os.urandom mixed with the clock); print it so failures replay."""
  seed = int.from_bytes(os.urandom(4), "little") ^ (time.time_ns() & 0xFFFFFFFF)
  print(f"seed={seed}")
  return seed


def random_offsets(rng: np.random.Generator, m: int, n: int, k: int) -> np.ndarray:
  """k distinct sorted offsets in [0, P), int32."""
  p = pattern.num_diagonals(m, n)
  return np.sort(rng.choice(p, size=k, replace=False)).astype(np.int32)


def reference(x_BxM, v, o_K, m: int, n: int, dy_BxN, block: int = 1):
  """(y, dx, dv) in float64 numpy: y = x @ W, dx = dy @ W.T, dv = x.T @ dy on the entries.

  v is (K, D) for diagonals or (K, D, b, b) for b x b block-diagonals (DESIGN.md 2, 8).
  """
  x, v, dy = (np.asarray(a, np.float64) for a in (x_BxM, v, dy_BxN))
  rows_PxD, cols_PxD = pattern.diagonal_coords(m, n, block)
  o = np.asarray(o_K)
  r, c = rows_PxD[o], cols_PxD[o]
  b = block
  w4 = np.zeros((m // b, n // b, b, b))
  w4[r, c] = v.reshape(r.shape + (b, b))
  w = w4.transpose(0, 2, 1, 3).reshape(m, n)
  g4 = (x.T @ dy).reshape(m // b, b, n // b, b).transpose(0, 2, 1, 3)
  return x @ w, dy @ w.T, g4[r, c].reshape(v.shape)


def assert_close(got, want, dtype, seed: int, what: str = "") -> None:
  """chex allclose with the dtype's max-norm relative tolerance; names the seed on failure."""
  tol = TOL[jnp.dtype(dtype)]
  got64 = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want64 = np.asarray(want, np.float64)
  scale = float(np.abs(want64).max()) if want64.size else 0.0
  try:
    chex.assert_shape(got64, want64.shape)
    chex.assert_trees_all_close(got64, want64, rtol=tol, atol=tol * max(scale, 1e-30))
  except AssertionError as e:
    err = float(np.abs(got64 - want64).max()) / max(scale, 1e-30)
    raise AssertionError(f"{what}: max-norm rel. error {err:.3g} > {tol} (seed={seed})\n{e}")


def kernel_alone(kind: str, dtype, b: int, bt: int, tag: int = 0):
  """(f, ShapeDtypeStruct args) of one raw kernel on small padded shapes (4 x 4 blocks,
  8 + tag slots, 2 + tag batch tiles): for lowering and compile checks of a block x batch
  tile. Its grid, `kernel_grid(kind, tag)`, tells apart kernels compiled together."""
  from pallas_kernels import sddmm, spmm
  s, rows, i32 = 8 + tag, (2 + tag) * bt, jnp.int32
  sds = jax.ShapeDtypeStruct
  if kind == "bcsr_sddmm":
    f = functools.partial(sddmm.sddmm_padded, block=b, batch_tile=bt)
    return f, (sds((1,), i32), sds((s,), i32), sds((s,), i32), sds((rows, 4 * b), dtype),
               sds((rows, 4 * b), dtype))
  if kind not in ("bcsr_spmm", "bcsr_spmm_t"):
    raise ValueError(f"unknown kernel {kind!r}")
  f = functools.partial(spmm.spmm_padded, n_out_blocks=4, batch_tile=bt,
                        transpose=kind == "bcsr_spmm_t")
  return f, (sds((5,), i32), sds((s,), i32), sds((s,), i32), sds((rows, 4 * b), dtype),
             sds((s, b, b), dtype))


def kernel_grid(kind: str, tag: int = 0) -> tuple[int, int, int]:
  """The launch grid of `kernel_alone(kind, ..., tag)`."""
  return (8 + tag, 1, 1) if kind == "bcsr_sddmm" else (2 + tag, 4, 1)
