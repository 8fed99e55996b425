"""y = x @ W for W in BCSR: one Pallas (Triton) kernel; on the CSR index it gives dy @ W.T."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _call
from pallas_kernels.bcsr import Layout, cdiv, check_block


def _spmm_kernel(ptr_ref, slot_ref, kblk_ref, x_ref, w_ref, y_ref, *, b: int,
                 transpose: bool, precision=None):
  """y tile (bt, b) of output block column j = sum over its blocks of x tile @ block."""
  j = pl.program_id(1)
  dims = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))

  def body(q, acc_TxB):
    s, kb = slot_ref[q], kblk_ref[q]
    x_TxB = x_ref[:, pl.ds(pl.multiple_of(kb * b, b), b)]
    w_BxB = w_ref[s]
    return acc_TxB + lax.dot_general(x_TxB, w_BxB, dims, precision=precision,
                                     preferred_element_type=jnp.float32)

  acc_TxB = lax.fori_loop(ptr_ref[j], ptr_ref[j + 1], body,
                          jnp.zeros(y_ref.shape, jnp.float32))
  y_ref[...] = acc_TxB.astype(y_ref.dtype)


def spmm_padded(ptr, slot, kblk, x_BxK, data_SxBxB, *, n_out_blocks: int, batch_tile: int,
                transpose: bool = False, interpret: bool = False,
                precision=None) -> jax.Array:
  """y (B, n_out_blocks * b): output block column j sums x[:, kblk[q]] @ data[slot[q]]
  (block transposed if `transpose`) over q in [ptr[j], ptr[j+1]).

  x must already be padded: B a multiple of batch_tile, K a multiple of b.
  """
  s, b, b2 = data_SxBxB.shape
  if b != b2:
    raise ValueError(f"blocks must be square, got {data_SxBxB.shape[1:]}")
  rows, k = x_BxK.shape
  if rows % batch_tile or k % b:
    raise ValueError(f"x of shape {x_BxK.shape} is not padded to ({batch_tile}, {b}) tiles")
  name = "bcsr_spmm_t" if transpose else "bcsr_spmm"
  params = _call.compiler_params(name, b, batch_tile, x_BxK.dtype)  # refuses before XLA
  full = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(_spmm_kernel, b=b, transpose=transpose, precision=precision),
      out_shape=jax.ShapeDtypeStruct((rows, n_out_blocks * b), x_BxK.dtype),
      grid=(rows // batch_tile, n_out_blocks),
      in_specs=[full(ptr), full(slot), full(kblk),
                pl.BlockSpec((batch_tile, k), lambda i, j: (i, 0)), full(data_SxBxB)],
      out_specs=pl.BlockSpec((batch_tile, b), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=params,
      name=name,
  )(ptr, slot, kblk, x_BxK, data_SxBxB)


def spmm(x_BxM, data_SxBxB, lay: Layout, *, transpose: bool = False,
         batch_tile: int | None = None, interpret: bool | None = None,
         precision=None) -> jax.Array:
  """x @ W (B, n) from the CSC index, or, with `transpose`, x @ W.T (B, m) from the CSR
  index of the same blocks. interpret=None: Triton on GPU, interpreted elsewhere;
  precision: of the block products (None: TF32 for float32 on a GPU, like XLA's default)."""
  b = check_block(lay.b)
  if tuple(data_SxBxB.shape) != (lay.num_slots, b, b):
    raise ValueError(f"block data must have shape {(lay.num_slots, b, b)}, "
                     f"got {tuple(data_SxBxB.shape)}")
  if transpose:
    d_in, d_out, n_in, n_out = lay.n, lay.m, lay.C, lay.R
    if lay.csr_slot is None:  # slots stored in CSR order
      index = (lay.row_ptr, jnp.arange(lay.num_slots, dtype=jnp.int32), lay.block_col)
    else:
      index = (lay.row_ptr, lay.csr_slot, lay.csr_col)
    perm_in, inv_out = lay.perm_cols, lay.inv_rows
  else:
    d_in, d_out, n_in, n_out = lay.m, lay.n, lay.R, lay.C
    index = (lay.col_ptr, lay.csc_slot, lay.csc_row)
    perm_in, inv_out = lay.perm_rows, lay.inv_cols
  if x_BxM.ndim != 2 or x_BxM.shape[1] != d_in:
    raise ValueError(f"x must have shape (B, {d_in}), got {tuple(x_BxM.shape)}")
  dtype = jnp.result_type(x_BxM.dtype, data_SxBxB.dtype)
  x = x_BxM.astype(dtype)
  if perm_in is not None:
    x = x[:, jnp.asarray(perm_in)]
  rows = x.shape[0]
  bt = _call.batch_tile(rows, batch_tile)
  if rows == 0:
    return jnp.zeros((0, d_out), dtype)
  x = jnp.pad(x, ((0, cdiv(rows, bt) * bt - rows), (0, n_in * b - d_in)))
  fn = functools.partial(spmm_padded, n_out_blocks=n_out, batch_tile=bt, transpose=transpose,
                         precision=precision)
  y = _call.dispatch(fn, *(jnp.asarray(a, jnp.int32) for a in index), x,
                     data_SxBxB.astype(dtype), interpret=interpret)
  y = y[:rows, :d_out]
  return y if inv_out is None else y[:, jnp.asarray(inv_out)]
