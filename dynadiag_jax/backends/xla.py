"""`xla` backend: (block-)diagonal products in plain XLA, work proportional to K (DESIGN 4, 8).

Blocks (b > 1) run block-leading: x (B, m) is turned once into (M, B, b), so that every
product is a batched b x b matmul with the block axis leading (no per-call transposes
inside the dots). With the kernel's (M, N) block grid, two forms cover all products:
- gather form, out[t] = sum_k a[(o_k + t) % L] @ w[k, t] for t < S: K windows of a
  (static or dynamic slices of [a, a]), one batched product each, summed;
- scatter form, out[(o_k + t) % L] += a[t] @ w[k, t]: one batched product per input
  block for all k at once, then each output block is the sum of the pieces that land on
  it (frozen: a constant list per block; exploring: K window read-modify-writes).
Tall kernels (M >= N) run the forward in gather form and dx in scatter form, wide ones the
other way round; dvalues is a gather form over the rows (x_rows.T @ dy_cols per block).

With K <= 2 diagonals the frozen scatter form writes its output as K padded runs in one
fusion (each diagonal's S output blocks are contiguous, wrapping).

block = 1 reads only the K x D values: the same two forms on single columns, each a
fori_loop over groups of diagonals whose body is one small elementwise fusion with a
dynamic slice per diagonal, which LLVM vectorises (XLA emits one fusion of K static
slices as scalar code once it holds more than ~100 terms, and a chain of dependent
per-element adds); the scatter form updates windows of an accumulator in place, in row
tiles. Which form each product takes is `auto`'s rule (`auto.few_rows`, `auto.b1_windows`,
measured, docs/SPEED_CPU.md); the GEMM form is the dense backend's own product (`ops.DENSE`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import ops
from dynadiag_jax.backends.auto import b1_windows, few_rows
from dynadiag_jax.pattern import Geometry

# blocks: below this many rows the scatter form sums K padded pieces in one fusion.
_MANY_ROWS = 64
# frozen scatter form: up to this many diagonals, padded runs in one fusion (measured:
# 768x3072, b = 64, 1576 rows: K = 1 10.4x vs 7.2x per-block sums, K = 3 4.1x vs 4.7x)
_RUNS_MAX_K = 2
_F32 = jnp.float32


@jax.tree_util.register_static
class Frozen:
  """Frozen offsets as numpy: a pytree without leaves, so it stays static in residuals."""

  def __init__(self, o_K):
    self.o_K = np.asarray(o_K, np.int32)
    self._key = self.o_K.tobytes()

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other) -> bool:
    return isinstance(other, Frozen) and self._key == other._key


def prepare(o_K, geo: Geometry, cfg) -> Frozen | jax.Array:
  """Frozen (numpy) offsets stay constants; traced ones stay int32 arrays."""
  if isinstance(o_K, np.ndarray):
    return Frozen(o_K)
  return jnp.asarray(o_K, jnp.int32)


def _starts(pat) -> list:
  """Each offset as a Python int (frozen) or a traced scalar (exploring)."""
  if isinstance(pat, Frozen):
    return [int(p) for p in pat.o_K]
  return [pat[k] for k in range(pat.shape[0])]


def _offsets(pat) -> np.ndarray | jax.Array:
  """The offsets: numpy (frozen) or the traced int32 array (exploring)."""
  return pat.o_K if isinstance(pat, Frozen) else pat


def _offsets_np(pat) -> np.ndarray | None:
  return pat.o_K if isinstance(pat, Frozen) else None


def _win(a, start, size: int, axis: int = 0):
  """a[start : start + size] along `axis`, a constant slice when `start` is an int."""
  if isinstance(start, int):
    return jax.lax.slice_in_dim(a, start, start + size, axis=axis)
  return jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def _wrap(a, extra: int, axis: int = 0):
  """[a, a[:extra]] along `axis`: every window of length extra + 1 lies inside it."""
  if extra <= 0:
    return a
  return jnp.concatenate([a, jax.lax.slice_in_dim(a, 0, extra, axis=axis)], axis=axis)


def _out_dtype(*xs):
  return jnp.result_type(*xs)


# -- blocks (b > 1) --------------------------------------------------------------------------

def to_blocks(x_BxM, b: int) -> jax.Array:
  """(B, m) -> (M, B, b): block-leading, done once per call."""
  rows, m = x_BxM.shape
  return x_BxM.reshape(rows, m // b, b).transpose(1, 0, 2)


def from_blocks(y_LxBxb) -> jax.Array:
  """(L, B, b) -> (B, L * b)."""
  l, rows, b = y_LxBxb.shape
  return y_LxBxb.transpose(1, 0, 2).reshape(rows, l * b)


def _gather_form(a_LxBxb, w_KxSxbxb, starts: list, s: int, prec) -> jax.Array:
  """out_SxBxb[t] = sum_k a[(o_k + t) % L] @ w[k, t]."""
  aa = _wrap(a_LxBxb, s - 1)
  out = None
  for k, o in enumerate(starts):
    y = jnp.einsum("tzc,tcd->tzd", _win(aa, o, s), w_KxSxbxb[k], precision=prec,
                   preferred_element_type=_F32)
    out = y if out is None else out + y
  return out


@functools.lru_cache(maxsize=256)
def _landing(key: bytes, s: int, l: int) -> tuple[tuple[tuple[int, int], ...], ...]:
  """For each output block j < l, the (t, k) with (o_k + t) % l == j (frozen offsets)."""
  o_K = np.frombuffer(key, np.int32)
  lists: list[list[tuple[int, int]]] = [[] for _ in range(l)]
  for k, o in enumerate(o_K):
    for t in range(s):
      lists[(int(o) + t) % l].append((t, k))
  return tuple(tuple(c) for c in lists)


def _runs(z_SxBxq, o_K: np.ndarray, l: int) -> jax.Array:
  """y_Bx(L*b) = sum_k diagonal k's S output blocks, a contiguous (wrapping) run at o_k.

  One fusion writes y once, reading z through the transpose to (B, S * b): a few selects
  per element, so only for few diagonals (with more, the per-block sums are cheaper).
  """
  s, rows, q = z_SxBxq.shape
  b = q // len(o_K)
  terms = []
  for kk, o in enumerate(int(o) for o in o_K):
    z_k = z_SxBxq[:, :, kk * b:(kk + 1) * b].transpose(1, 0, 2).reshape(rows, s * b)
    if o + s <= l:
      terms.append(jnp.pad(z_k, ((0, 0), (o * b, (l - o - s) * b))))
    else:  # the run wraps: its last blocks land at the start
      c = (l - o) * b
      terms.append(jnp.pad(z_k[:, :c], ((0, 0), (o * b, 0))))
      terms.append(jnp.pad(z_k[:, c:], ((0, 0), (0, l * b - (s * b - c)))))
  return sum(terms[1:], terms[0])


def _scatter_form(a_SxBxb, w_KxSxbxb, pat, l: int, prec) -> jax.Array:
  """y_Bx(L*b): out[(o_k + t) % L] += a[t] @ w[k, t], returned in (B, L * b) layout."""
  s, rows, b = a_SxBxb.shape
  k = w_KxSxbxb.shape[0]
  w_Sxbxq = w_KxSxbxb.transpose(1, 2, 0, 3).reshape(s, b, k * b)
  z_SxBxq = jnp.einsum("tzc,tcq->tzq", a_SxBxb, w_Sxbxq, precision=prec,
                       preferred_element_type=_F32)
  o_np = _offsets_np(pat)
  if o_np is not None and k <= _RUNS_MAX_K:  # each diagonal's S blocks: one padded run
    return _runs(z_SxBxq, o_np, l)
  if o_np is not None and _many(rows, _MANY_ROWS):  # each output block: a constant sum of pieces
    y = jnp.zeros((rows, l * b), _F32)  # written in place, block by block
    for j, pieces in enumerate(_landing(o_np.tobytes(), s, l)):
      if pieces:
        blk = sum(z_SxBxq[t, :, kk * b:(kk + 1) * b] for t, kk in pieces)
        y = jax.lax.dynamic_update_slice(y, blk, (0, j * b))
    return y
  z_SxBxKxb = z_SxBxq.reshape(s, rows, k, b)
  if o_np is not None:  # few rows: K constant pads summed in one fusion
    yy = sum(jnp.pad(z_SxBxKxb[:, :, kk], ((int(o), l - int(o)), (0, 0), (0, 0)))
             for kk, o in enumerate(o_np))
    return from_blocks(yy[:l].at[:s].add(yy[l:]))
  yy = jnp.zeros((l + s, rows, b), _F32)
  for kk, o in enumerate(_starts(pat)):
    upd = jax.lax.dynamic_slice_in_dim(yy, o, s) + z_SxBxKxb[:, :, kk]
    yy = jax.lax.dynamic_update_slice_in_dim(yy, upd, o, axis=0)
  y = yy[:l].at[:s].add(yy[l:])  # windows running past L wrap around
  return from_blocks(y)


def _fwd_blocks(x_BxM, v, pat, geo: Geometry, cfg):
  xt = to_blocks(x_BxM, geo.block)
  if geo.M >= geo.N:
    y = from_blocks(_gather_form(xt, v, _starts(pat), geo.N, cfg.precision))
  else:
    y = _scatter_form(xt, v, pat, geo.N, cfg.precision)
  return y.astype(_out_dtype(x_BxM, v))


def _dx_blocks(dy_BxN, v, pat, geo: Geometry, cfg):
  dyt = to_blocks(dy_BxN, geo.block)
  v_t = jnp.swapaxes(v, -1, -2)
  if geo.M >= geo.N:  # dx[(o_k + t) % M] += dy[t] @ v[k, t].T
    dx = _scatter_form(dyt, v_t, pat, geo.M, cfg.precision)
  else:  # dx[t] = sum_k dy[(o_k + t) % N] @ v[k, t].T
    dx = from_blocks(_gather_form(dyt, v_t, _starts(pat), geo.M, cfg.precision))
  return dx.astype(_out_dtype(dy_BxN, v))


def _dv_blocks(x_BxM, dy_BxN, pat, geo: Geometry, cfg):
  xt, dyt = to_blocks(x_BxM, geo.block), to_blocks(dy_BxN, geo.block)
  prec = cfg.precision
  if geo.M >= geo.N:  # dv[k, t] = x[(o_k + t) % M].T @ dy[t]
    xx = _wrap(xt, geo.N - 1)
    dv = [jnp.einsum("tzc,tzd->tcd", _win(xx, o, geo.N), dyt, precision=prec,
                     preferred_element_type=_F32) for o in _starts(pat)]
  else:  # dv[k, t] = x[t].T @ dy[(o_k + t) % N]
    dyy = _wrap(dyt, geo.M - 1)
    dv = [jnp.einsum("tzc,tzd->tcd", xt, _win(dyy, o, geo.M), precision=prec,
                     preferred_element_type=_F32) for o in _starts(pat)]
  return jnp.stack(dv)


# -- single diagonals (b = 1) ----------------------------------------------------------------
# Two forms over a line of length L and windows of length S <= L (offsets o_K < L):
# - gather: out[:, t] = sum_k a[:, (o_k + t) % L] * v[k, t]          (t < S)
# - scatter: out[:, (o_k + t) % L] += a[:, t] * v[k, t]             (t < S)
# Each runs as a fori_loop over groups of diagonals with dynamic slices at the offsets, so
# that every group is one small elementwise fusion that LLVM vectorises (a single fusion
# of all K terms, as XLA builds from K static slices, is emitted as scalar code once it
# holds more than ~100 terms, a chain of K dependent adds per output).

_GATHER_GROUP = 64  # terms summed per loop step at 1 row (vectorised up to ~96), fewer with more rows
_SCATTER_GROUP = 4  # window updates per loop step
_ROWS_GROUP = 4  # rows of dvalues per loop step


def _offsets_arr(pat) -> jax.Array:
  return jnp.asarray(_offsets(pat))


def _at(a_K, i) -> jax.Array:
  """a[i] for a traced i known to be in range (no negative-index select)."""
  return jax.lax.dynamic_index_in_dim(a_K, i, keepdims=False)


def _grouped(k: int, g: int, step, tail, init):
  """init folded through step(j, acc) for the K // g full groups, then tail(k0, acc)."""
  full = k // g
  acc = jax.lax.fori_loop(0, full, step, init) if full else init
  return tail(full * g, acc) if full * g < k else acc


def _gather_b1(a_BxL, v_KxS, pat, s: int) -> jax.Array:
  """out_BxS[:, t] = sum_k a[:, (o_k + t) % L] * v[k, t], accumulated in float32."""
  rows, l = a_BxL.shape
  k = v_KxS.shape[0]
  aa = _wrap(a_BxL.astype(_F32), s - 1, axis=1)
  o_K = _offsets_arr(pat)
  starts = _starts(pat)

  def term(i, o):
    return _win(aa, o, s, axis=1) * _at(v_KxS, i)

  g = max(16, _GATHER_GROUP // rows) if isinstance(rows, int) else 16  # 64 at 1 row, 16 at 8

  def step(j, acc):
    i0 = j * g
    return acc + sum(term(i0 + i, _at(o_K, i0 + i)) for i in range(g))

  def tail(k0, acc):
    return acc + sum(_win(aa, starts[i], s, axis=1) * v_KxS[i] for i in range(k0, k))

  return _grouped(k, g, step, tail, jnp.zeros((rows, s), _F32))


def _scatter_b1(a_BxS, v_KxS, pat, l: int) -> jax.Array:
  """out_BxL[:, (o_k + t) % L] += a[:, t] * v[k, t], accumulated in float32."""
  rows, s = a_BxS.shape
  k = v_KxS.shape[0]
  a = a_BxS.astype(_F32)
  o_K = _offsets_arr(pat)
  starts = _starts(pat)

  def add(acc, i, o):  # acc[:, o : o + S] += a * v[i]
    vi = v_KxS[i] if isinstance(i, int) else _at(v_KxS, i)
    upd = jax.lax.dynamic_slice_in_dim(acc, o, s, axis=1) + a * vi
    return jax.lax.dynamic_update_slice_in_dim(acc, upd, o, axis=1)

  def step(j, acc):
    i0 = j * _SCATTER_GROUP
    for i in range(_SCATTER_GROUP):
      acc = add(acc, i0 + i, _at(o_K, i0 + i))
    return acc

  def tail(k0, acc):
    for i in range(k0, k):
      acc = add(acc, i, starts[i])
    return acc

  acc = _grouped(k, _SCATTER_GROUP, step, tail, jnp.zeros((rows, l + s), _F32))
  return acc[:, :l].at[:, :s].add(acc[:, l:])  # windows running past L wrap around


_ROW_TILE = 64  # rows per tile of the scatter form (its windows of acc stay in cache)


def _tiled(f, a_BxL, *rest):
  """f over tiles of _ROW_TILE rows (so that each tile's windows stay in cache)."""
  rows, l = a_BxL.shape
  if not _many(rows, _ROW_TILE + 1):
    return f(a_BxL, *rest)
  nt = -(-rows // _ROW_TILE)
  a = jnp.pad(a_BxL, ((0, nt * _ROW_TILE - rows), (0, 0))).reshape(nt, _ROW_TILE, l)
  y = jax.lax.map(lambda t: f(t, *rest), a)
  return y.reshape(nt * _ROW_TILE, y.shape[-1])[:rows]


def _fwd_b1(x_BxM, v_KxD, pat, m: int, n: int):
  """y = x @ W for few rows, reading only the K x D values."""
  if m >= n:  # entry t of diagonal k: (row (o_k + t) % m, column t)
    return _gather_b1(x_BxM, v_KxD, pat, n)
  return _tiled(_scatter_b1, x_BxM, v_KxD, pat, n)  # entry t: (row t, column (o_k + t) % n)


def _dx_b1(dy_BxN, v_KxD, pat, m: int, n: int):
  """dx = dy @ W.T for few rows: the same two forms with the roles swapped."""
  if m >= n:
    return _tiled(_scatter_b1, dy_BxN, v_KxD, pat, m)
  return _gather_b1(dy_BxN, v_KxD, pat, m)


def _rows_b1(a_BxL, c_BxS, pat, k: int) -> jax.Array:
  """dv_KxS[k, t] = sum_rows a[:, (o_k + t) % L] * c[:, t]: one row of dv per window."""
  rows, s = c_BxS.shape
  aa = _wrap(a_BxL.astype(_F32), s - 1, axis=1)
  c = c_BxS.astype(_F32)
  o_K = _offsets_arr(pat)
  starts = _starts(pat)

  aa_R = [aa[r:r + 1] for r in range(rows)]  # one window per row: each slice has one
  c_R = [c[r:r + 1] for r in range(rows)]  # user, so XLA hoists its index (vectorised)

  def rows_at(os):  # (len(os), S): the rows of dv for windows starting at os
    return jnp.concatenate([sum(_win(a, o, s, axis=1) * cr for a, cr in zip(aa_R, c_R))
                            for o in os], axis=0)

  def step(j, dv):
    i0 = j * _ROWS_GROUP
    blk = rows_at([_at(o_K, i0 + i) for i in range(_ROWS_GROUP)])
    return jax.lax.dynamic_update_slice_in_dim(dv, blk, i0, axis=0)

  def tail(k0, dv):
    return jax.lax.dynamic_update_slice_in_dim(dv, rows_at(starts[k0:]), k0, axis=0)

  return _grouped(k, _ROWS_GROUP, step, tail, jnp.zeros((k, s), _F32))


def _dv_b1(x_BxM, dy_BxN, pat, m: int, n: int, k: int):
  """dv[k, t] = sum_rows x[:, row(k, t)] * dy[:, col(k, t)], window by window."""
  if m >= n:
    return _rows_b1(x_BxM, dy_BxN, pat, k)
  return _rows_b1(dy_BxN, x_BxM, pat, k)


def _num(pat) -> int:
  return _offsets(pat).shape[0]


def _many(rows, bound: int) -> bool:
  """rows >= bound; a symbolic row count (jax.export) counts as many."""
  return not isinstance(rows, int) or rows >= bound


# -- the backend -----------------------------------------------------------------------------

def fwd(x_BxM, v, pat, geo: Geometry, cfg):
  """y = x @ W."""
  if geo.block > 1:
    return _fwd_blocks(x_BxM, v, pat, geo, cfg)
  if b1_windows(x_BxM.shape[0], _num(pat), geo.P, scatter=geo.m < geo.n):
    return _fwd_b1(x_BxM, v, pat, geo.m, geo.n).astype(_out_dtype(x_BxM, v))
  return ops.DENSE.fwd(x_BxM, v, _offsets(pat), geo, cfg)


def dx(dy_BxN, v, pat, geo: Geometry, cfg):
  """dx = dy @ W.T."""
  if geo.block > 1:
    return _dx_blocks(dy_BxN, v, pat, geo, cfg)
  if b1_windows(dy_BxN.shape[0], _num(pat), geo.P, scatter=geo.m >= geo.n):
    return _dx_b1(dy_BxN, v, pat, geo.m, geo.n).astype(_out_dtype(dy_BxN, v))
  return ops.DENSE.dx(dy_BxN, v, _offsets(pat), geo, cfg)


def dv(x_BxM, dy_BxN, pat, geo: Geometry, cfg):
  """dv[k, t] = x_rows.T @ dy_cols, shaped like the values."""
  if geo.block > 1:
    return _dv_blocks(x_BxM, dy_BxN, pat, geo, cfg)
  if few_rows(x_BxM.shape[0]):
    return _dv_b1(x_BxM, dy_BxN, pat, geo.m, geo.n, _num(pat))
  return ops.DENSE.dv(x_BxM, dy_BxN, _offsets(pat), geo, cfg)


BACKEND = ops.Backend("xla", fwd, dx, dv, prepare)
ops.register_backend(BACKEND)
