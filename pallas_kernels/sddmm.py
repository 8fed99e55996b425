"""dvalues = (x.T @ dy) on the kept blocks only: a block SDDMM in one Pallas (Triton) kernel."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _call
from pallas_kernels.bcsr import Layout, cdiv, check_block, unpack


def _sddmm_kernel(nnzb_ref, brow_ref, bcol_ref, x_ref, dy_ref, g_ref, *, b: int, bt: int,
                  n_tiles: int, precision=None):
  """g[s] (b, b) = x[:, block row of s].T @ dy[:, block col of s], summed over batch tiles."""
  s = pl.program_id(0)
  i0 = pl.multiple_of(brow_ref[s] * b, b)
  j0 = pl.multiple_of(bcol_ref[s] * b, b)

  def body(q, acc_BxB):
    r0 = pl.multiple_of(q * bt, bt)
    x_TxB = x_ref[pl.ds(r0, bt), pl.ds(i0, b)]
    dy_TxB = dy_ref[pl.ds(r0, bt), pl.ds(j0, b)]
    return acc_BxB + lax.dot_general(x_TxB, dy_TxB, (((0,), (0,)), ((), ())),
                                     precision=precision, preferred_element_type=jnp.float32)

  # Typed constants: jax 0.10.2's Triton lowering gives weak Python ints in a select the
  # predicate's type (i1), which made this loop bound a bool (pallas_kernels/triton_check.py).
  hi = jnp.where(s < nnzb_ref[0], jnp.int32(n_tiles), jnp.int32(0))  # padding: no work
  g_ref[...] = lax.fori_loop(0, hi, body, jnp.zeros((b, b), jnp.float32))


def sddmm_padded(nnzb, brow, bcol, x_BxM, dy_BxN, *, block: int, batch_tile: int,
                 interpret: bool = False, precision=None) -> jax.Array:
  """g (S, b, b) f32: the gradient of every stored block; x, dy padded to tiles."""
  s, b, bt = brow.shape[0], block, batch_tile
  rows = x_BxM.shape[0]
  if rows % bt or x_BxM.shape[1] % b or dy_BxN.shape[1] % b or dy_BxN.shape[0] != rows:
    raise ValueError(f"x {x_BxM.shape} and dy {dy_BxN.shape} are not padded to "
                     f"({bt}, {b}) tiles")
  params = _call.compiler_params("bcsr_sddmm", b, bt, x_BxM.dtype)  # refuses before XLA
  full = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(_sddmm_kernel, b=b, bt=bt, n_tiles=rows // bt, precision=precision),
      out_shape=jax.ShapeDtypeStruct((s, b, b), jnp.float32),
      grid=(s,),
      in_specs=[full(nnzb), full(brow), full(bcol), full(x_BxM), full(dy_BxN)],
      out_specs=pl.BlockSpec((None, b, b), lambda i: (i, 0, 0)),
      interpret=interpret,
      compiler_params=params,
      name="bcsr_sddmm",
  )(nnzb, brow, bcol, x_BxM, dy_BxN)


def sddmm(x_BxM, dy_BxN, lay: Layout, *, batch_tile: int | None = None,
          interpret: bool | None = None, precision=None) -> jax.Array:
  """g (S, b, b) f32: x.T @ dy restricted to the layout's stored blocks."""
  b = check_block(lay.b)
  if x_BxM.ndim != 2 or dy_BxN.ndim != 2 or x_BxM.shape[1] != lay.m or \
      dy_BxN.shape[1] != lay.n or x_BxM.shape[0] != dy_BxN.shape[0]:
    raise ValueError(f"x, dy must be (B, {lay.m}), (B, {lay.n}); got "
                     f"{tuple(x_BxM.shape)}, {tuple(dy_BxN.shape)}")
  dtype = jnp.result_type(x_BxM.dtype, dy_BxN.dtype)
  x, dy = x_BxM.astype(dtype), dy_BxN.astype(dtype)
  if lay.perm_rows is not None:
    x = x[:, jnp.asarray(lay.perm_rows)]
  if lay.perm_cols is not None:
    dy = dy[:, jnp.asarray(lay.perm_cols)]
  rows = x.shape[0]
  bt = _call.batch_tile(rows, batch_tile)
  if rows == 0:
    return jnp.zeros((lay.num_slots, b, b), jnp.float32)
  pad_b = cdiv(rows, bt) * bt - rows
  x = jnp.pad(x, ((0, pad_b), (0, lay.R * b - lay.m)))
  dy = jnp.pad(dy, ((0, pad_b), (0, lay.C * b - lay.n)))
  fn = functools.partial(sddmm_padded, block=b, batch_tile=bt, precision=precision)
  idx = (jnp.asarray(a, jnp.int32) for a in (lay.nnzb, lay.block_row, lay.block_col))
  return _call.dispatch(fn, *idx, x, dy, interpret=interpret)


def diag_sddmm(x_BxM, dy_BxN, lay: Layout, **kw) -> jax.Array:
  """dv_KxD f32: dv[k, t] = sum_b x[b, row(k, t)] * dy[b, col(k, t)], via stored blocks."""
  return unpack(sddmm(x_BxM, dy_BxN, lay, **kw), lay)
