"""K wrapped diagonals of an (m, n) kernel -> one BCSR layout that serves W and W.T.

A layout tiles the kernel, zero-padded to (R*b, C*b), into b x b blocks and keeps the
blocks that hold any kept cell. Block data is one array `data_SxBxB` (S slots, in CSR
order); two indexes point into it: CSR (row_ptr, block_col) for dx = dy @ W.T and CSC
(col_ptr, csc_slot, csc_row) for y = x @ W, so forward and backward share one conversion
(paper, section 3.3). `cell_KxD` maps every diagonal entry to its flat place in `data`,
which makes packing values and unpacking block gradients one scatter / one gather.

Two builders: `host_layout` (numpy, exact slot count, optional row/column clustering) for
frozen patterns, and `jit_layout` (jittable, traced offsets, a static upper bound on slots)
for exploration. Both return the same pytree, `Layout`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import pattern

MIN_BLOCK = 16   # a Triton tl.dot needs every dimension >= 16
MAX_BLOCK = 128  # past it a block (or batch tile) outgrows registers and shared memory
BLOCKS = (16, 32, 64, 128)  # every block size (and batch tile) the kernels accept


def check_block(b: Any, what: str = "block size") -> int:
  """b as int, or ValueError unless it is a power of two in [16, 128] (see BLOCKS)."""
  if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
    raise ValueError(f"{what} must be an int, got {b!r}")
  b = int(b)
  if b < MIN_BLOCK or b & (b - 1) or b > MAX_BLOCK:
    raise ValueError(
        f"{what} must be a power of two >= {MIN_BLOCK} and <= {MAX_BLOCK}, got {b}: Pallas "
        f"Triton needs power-of-two tensor sizes, tl.dot needs every dimension >= 16, and "
        f"larger tiles spill registers or overflow shared memory (use 16, 32, 64 or 128)")
  return b


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Layout:
  """BCSR layout of K diagonals of an (m, n) kernel in b x b blocks (arrays int32).

  Slots s in [0, S) are in CSR order (block row, then block column); slots >= nnzb are
  padding (jittable form). If the kernel was clustered, the blocks tile
  W' = W[perm_rows][:, perm_cols] and `inv_*` undo the permutations.
  """
  m: int
  n: int
  b: int
  row_ptr: Any    # (R+1,)  CSR: slots of block row i are [row_ptr[i], row_ptr[i+1])
  block_col: Any  # (S,)    block column of slot s
  block_row: Any  # (S,)    block row of slot s
  col_ptr: Any    # (C+1,)  CSC: entries of block column j are [col_ptr[j], col_ptr[j+1])
  csc_slot: Any   # (S,)    slot of CSC entry q
  csc_row: Any    # (S,)    block row of CSC entry q
  cell: Any       # (K, D)  flat index slot * b * b + (r % b) * b + c % b of each entry
  nnzb: Any       # (1,)    blocks in use
  perm_rows: Any = None  # (m,) or None
  inv_rows: Any = None
  perm_cols: Any = None  # (n,) or None
  inv_cols: Any = None
  csr_slot: Any = None   # (S,) slot of CSR entry q; None: slots are in CSR order
  csr_col: Any = None    # (S,) block column of CSR entry q (with csr_slot)

  _ARRAYS = ("row_ptr", "block_col", "block_row", "col_ptr", "csc_slot", "csc_row", "cell",
             "nnzb", "perm_rows", "inv_rows", "perm_cols", "inv_cols", "csr_slot", "csr_col")

  def tree_flatten(self):
    return tuple(getattr(self, f) for f in self._ARRAYS), (self.m, self.n, self.b)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*aux, *children)

  @property
  def R(self) -> int:
    return cdiv(self.m, self.b)

  @property
  def C(self) -> int:
    return cdiv(self.n, self.b)

  @property
  def num_slots(self) -> int:
    return int(self.block_row.shape[0])

  @property
  def k(self) -> int:
    if self.cell is None:  # block-diagonal layout: S = K * D slots
      return self.num_slots // min(self.R, self.C)
    return int(self.cell.shape[0])

  @property
  def clustered(self) -> bool:
    return self.perm_rows is not None or self.perm_cols is not None


class Stats(NamedTuple):
  """How well a layout packs its K*D non-zeros: fill = nnz / (blocks * b * b)."""
  blocks: Any      # blocks stored (in use)
  min_blocks: int  # ceil(nnz / b^2): no layout can store fewer
  total_blocks: int  # R * C, the dense grid
  fill: Any        # non-zeros / stored block cells
  slots: int       # allocated slots (== blocks for host layouts)


def max_blocks(k: int, m: int, n: int, b: int) -> int:
  """A static bound on the blocks K diagonals can touch: min(R*C, K * (2 ceil(D/b) + 1)).

  Along its D entries a diagonal crosses ceil(D/b) block columns (m >= n) or rows
  (m < n), meeting at most 2 blocks in each, plus 1 where it wraps around.
  """
  d = pattern.diag_length(m, n)
  return max(1, min(cdiv(m, b) * cdiv(n, b), k * (2 * cdiv(d, b) + 1)))


def host_layout(offsets, m: int, n: int, block: int = 16, *, cluster: bool = False,
                **cluster_kw) -> Layout:
  """Exact BCSR layout (numpy) of concrete offsets; `cluster` reorders rows/columns first."""
  b = check_block(block)
  pattern.check_offsets(offsets, m, n)
  o_K = np.asarray(offsets).astype(np.int64)
  r_KxD, c_KxD = pattern.offset_coords(o_K, m, n)
  perms = {}
  if cluster:
    from pallas_kernels import cluster as cluster_lib  # numpy only, imported on demand
    p_r, p_c = cluster_lib.cluster_order(o_K, m, n, b, **cluster_kw)
    i_r, i_c = np.argsort(p_r), np.argsort(p_c)
    r_KxD, c_KxD = i_r[r_KxD], i_c[c_KxD]
    perms = dict(perm_rows=p_r.astype(np.int32), inv_rows=i_r.astype(np.int32),
                 perm_cols=p_c.astype(np.int32), inv_cols=i_c.astype(np.int32))
  R, C = cdiv(m, b), cdiv(n, b)
  key_KxD = (r_KxD // b) * C + c_KxD // b
  occ_RxC = np.zeros(R * C, bool)
  occ_RxC[key_KxD.ravel()] = True
  occ_RxC = occ_RxC.reshape(R, C)
  slot_RxC = (np.cumsum(occ_RxC.ravel()) - 1).reshape(R, C)
  brow_S, bcol_S = np.nonzero(occ_RxC)          # row-major = CSR order
  ccol_S, crow_S = np.nonzero(occ_RxC.T)        # column-major = CSC order
  nnzb = brow_S.size
  pad = max(1, nnzb) - nnzb                      # keep one (empty) slot when K == 0
  i32 = lambda a: np.concatenate([a, np.zeros(pad, a.dtype)]).astype(np.int32)
  cell_KxD = slot_RxC.ravel()[key_KxD] * b * b + (r_KxD % b) * b + c_KxD % b
  return Layout(
      m, n, b,
      row_ptr=np.concatenate([[0], np.cumsum(occ_RxC.sum(1))]).astype(np.int32),
      block_col=i32(bcol_S), block_row=i32(brow_S),
      col_ptr=np.concatenate([[0], np.cumsum(occ_RxC.sum(0))]).astype(np.int32),
      csc_slot=i32(slot_RxC[crow_S, ccol_S]), csc_row=i32(crow_S),
      cell=cell_KxD.astype(np.int32), nnzb=np.array([nnzb], np.int32), **perms)


def jit_layout(o_K, m: int, n: int, block: int = 16, num_slots: int | None = None) -> Layout:
  """BCSR layout of (possibly traced) offsets with a static slot count (default: the bound).

  `num_slots` below the true block count silently drops blocks, so only pass a value
  known to be safe; the default `max_blocks(K, m, n, b)` always is.
  """
  b = check_block(block)
  pattern.check_offsets(o_K, m, n)
  o_K = jnp.asarray(o_K, jnp.int32)
  k = o_K.shape[0]
  s = max_blocks(k, m, n, b) if num_slots is None else int(num_slots)
  R, C = cdiv(m, b), cdiv(n, b)
  r_KxD, c_KxD = pattern.offset_coords(o_K, m, n)
  key_KxD = (r_KxD // b) * C + c_KxD // b
  occ = jnp.zeros(R * C, jnp.int32).at[key_KxD.ravel()].set(1)
  slot_of = jnp.cumsum(occ) - 1
  occ_RxC = occ.reshape(R, C)
  (key_S,) = jnp.nonzero(occ, size=s, fill_value=0)
  (keyT_S,) = jnp.nonzero(occ_RxC.T.ravel(), size=s, fill_value=0)
  crow_S, ccol_S = keyT_S % R, keyT_S // R
  zero = jnp.zeros((1,), jnp.int32)
  i32 = lambda a: a.astype(jnp.int32)
  return Layout(
      m, n, b,
      row_ptr=i32(jnp.concatenate([zero, jnp.cumsum(occ_RxC.sum(1))])),
      block_col=i32(key_S % C), block_row=i32(key_S // C),
      col_ptr=i32(jnp.concatenate([zero, jnp.cumsum(occ_RxC.sum(0))])),
      csc_slot=i32(slot_of[crow_S * C + ccol_S]), csc_row=i32(crow_S),
      cell=i32(slot_of[key_KxD] * b * b + (r_KxD % b) * b + c_KxD % b),
      nnzb=i32(occ.sum()[None]))


def block_layout(o_K, m: int, n: int, block: int) -> Layout:
  """BCSR layout of K block-diagonals of b x b blocks: slot k * D + t is entry (k, t).

  Every stored block is one full entry, so the block data is `values.reshape(K * D, b, b)`
  (no packing, `cell` is None) and S = K * D exactly. Each block column (row) holds at
  most K entries; the CSC and CSR indexes are stable sorts of the entries' columns (rows).
  numpy for concrete offsets, jittable (same static shapes) for traced ones.
  """
  b = check_block(block, "block size of a block-diagonal pattern")
  pattern.check_offsets(o_K, m, n, b)
  xp = np if isinstance(o_K, np.ndarray) else jnp
  r_KxD, c_KxD = pattern.offset_coords(o_K, m, n, b)  # block coordinates on the (M, N) grid
  row_S = xp.ravel(r_KxD).astype(xp.int32)
  col_S = xp.ravel(c_KxD).astype(xp.int32)
  R, C = m // b, n // b
  zero = xp.zeros((1,), xp.int32)
  count = (lambda a, k: np.bincount(a, minlength=k)) if xp is np else (
      lambda a, k: jnp.bincount(a, length=k))
  ptr = lambda a, k: xp.concatenate([zero, xp.cumsum(count(a, k))]).astype(xp.int32)
  csc = xp.argsort(col_S, stable=True).astype(xp.int32)
  csr = xp.argsort(row_S, stable=True).astype(xp.int32)
  return Layout(
      m, n, b, row_ptr=ptr(row_S, R), block_col=col_S, block_row=row_S,
      col_ptr=ptr(col_S, C), csc_slot=csc, csc_row=row_S[csc], cell=None,
      nnzb=xp.asarray([row_S.shape[0]], xp.int32), csr_slot=csr, csr_col=col_S[csr])


def pack(v_KxD, lay: Layout) -> jax.Array:
  """data_SxBxB: the values scattered into their blocks (zeros elsewhere)."""
  if tuple(v_KxD.shape) != tuple(lay.cell.shape):
    raise ValueError(f"values must have shape {tuple(lay.cell.shape)} for this layout, "
                     f"got {tuple(v_KxD.shape)}")
  s, b = lay.num_slots, lay.b
  flat = jnp.zeros(s * b * b, v_KxD.dtype).at[jnp.ravel(lay.cell)].set(
      jnp.ravel(v_KxD), unique_indices=True)
  return flat.reshape(s, b, b)


def unpack(data_SxBxB, lay: Layout) -> jax.Array:
  """v_KxD: each diagonal entry read back from its block (inverse of `pack`)."""
  return jnp.ravel(data_SxBxB)[lay.cell]


def to_dense(data_SxBxB, lay: Layout) -> jax.Array:
  """W (m, n) assembled from the blocks, permutations undone (for tests and checks)."""
  R, C, b = lay.R, lay.C, lay.b
  keep_S = jnp.arange(lay.num_slots) < jnp.asarray(lay.nnzb)[0]
  data = jnp.where(keep_S[:, None, None], data_SxBxB, 0)
  w = jnp.zeros((R, C, b, b), data.dtype).at[jnp.asarray(lay.block_row),
                                             jnp.asarray(lay.block_col)].add(data)
  w = w.transpose(0, 2, 1, 3).reshape(R * b, C * b)[:lay.m, :lay.n]
  if lay.inv_rows is not None:
    w = w[jnp.asarray(lay.inv_rows)]
  if lay.inv_cols is not None:
    w = w[:, jnp.asarray(lay.inv_cols)]
  return w


def stats(lay: Layout) -> Stats:
  """Blocks used, the fewest possible, the dense grid and the fill of a layout."""
  bb = lay.b * lay.b
  nnz = int(np.prod(lay.cell.shape)) if lay.cell is not None else lay.num_slots * bb
  blocks = lay.nnzb[0]
  if isinstance(blocks, np.integer):  # host layout: plain numbers
    blocks = int(blocks)
    fill = nnz / (max(blocks, 1) * bb)
  else:
    fill = nnz / (jnp.maximum(blocks, 1) * bb)
  return Stats(blocks=blocks, min_blocks=cdiv(nnz, bb), total_blocks=lay.R * lay.C,
               fill=fill, slots=lay.num_slots)
