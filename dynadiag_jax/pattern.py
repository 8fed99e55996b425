"""Wrapped-(block-)diagonal geometry of an (m, n) = (in, out) kernel (docs/DESIGN.md sections 2, 8)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def _check_shape(m: int, n: int) -> None:
  for name, v in (("m", m), ("n", n)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"kernel size {name} must be a positive int, got {v!r}")


def valid_blocks(m: int, n: int) -> list[int]:
  """Block sizes b that divide both m and n, ascending."""
  _check_shape(m, n)
  g = math.gcd(int(m), int(n))
  return [b for b in range(1, g + 1) if g % b == 0]


def largest_block(m: int, n: int, block: int) -> int:
  """The largest valid block size of an (m, n) kernel that is <= `block`."""
  if int(block) < 1:
    raise ValueError(f"block must be >= 1, got {block!r}")
  return max(b for b in valid_blocks(m, n) if b <= block)


def check_block(m: int, n: int, block: int, name: str = "") -> int:
  """`block` as int, or ValueError naming the layer, its shape and the valid block sizes."""
  _check_shape(m, n)
  if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 1 or \
      m % block or n % block:
    layer = f"layer {name!r} " if name else ""
    raise ValueError(f"block={block!r} does not divide the {layer}{m}x{n} kernel; valid block "
                     f"sizes: {valid_blocks(m, n)}")
  return int(block)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """An (m, n) kernel as an (M, N) grid of b x b blocks: P block-diagonals of D blocks each."""
  m: int
  n: int
  block: int = 1

  def __post_init__(self):
    check_block(self.m, self.n, self.block)

  @property
  def M(self) -> int:  # pylint: disable=invalid-name
    return self.m // self.block

  @property
  def N(self) -> int:  # pylint: disable=invalid-name
    return self.n // self.block

  @property
  def P(self) -> int:  # pylint: disable=invalid-name
    return max(self.M, self.N)

  @property
  def D(self) -> int:  # pylint: disable=invalid-name
    return min(self.M, self.N)

  def values_shape(self, k: int) -> tuple[int, ...]:
    """(K, D) for block 1, (K, D, b, b) for blocks."""
    return (k, self.D) if self.block == 1 else (k, self.D, self.block, self.block)


def num_diagonals(m: int, n: int, block: int = 1) -> int:
  """P = max(M, N): how many wrapped (block-)diagonals partition an (m, n) kernel."""
  return Geometry(m, n, block).P


def diag_length(m: int, n: int, block: int = 1) -> int:
  """D = min(M, N): the length of each (block-)diagonal, in blocks."""
  return Geometry(m, n, block).D


def is_block_size(block) -> bool:
  """Whether `block` is an integer >= 1 (not a bool): a valid block-size setting."""
  return (not isinstance(block, bool) and isinstance(block, (int, np.integer))
          and block >= 1)


def check_sparsity(sparsity: float) -> float:
  """Returns `sparsity` as float, or raises ValueError outside [0, 1)."""
  s = float(sparsity)
  if not (0.0 <= s < 1.0) or math.isnan(s):
    raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
  return s


def num_kept(m: int, n: int, sparsity: float, block: int = 1) -> int:
  """K = clip(ceil((1 - s) * P - 1e-9), 1, P): (block-)diagonals kept at sparsity s."""
  s = check_sparsity(sparsity)
  p = num_diagonals(m, n, block)
  return int(min(max(math.ceil((1.0 - s) * p - 1e-9), 1), p))


def coverable(m: int, n: int, sparsity: float, block: int) -> bool:
  """Whether K kept (block-)diagonals can connect every input and output: K D >= P."""
  g = Geometry(m, n, block)
  return num_kept(m, n, sparsity, block) * g.D >= g.P


def largest_covering_block(m: int, n: int, sparsity: float, block: int) -> int:
  """The largest valid block b <= `block` whose K diagonals can cover the kernel (1 if none)."""
  return max((b for b in valid_blocks(m, n) if b <= block and coverable(m, n, sparsity, b)),
             default=1)


def diagonal_coords(m: int, n: int, block: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(rows_PxD, cols_PxD): the (block-)cell of entry t of diagonal p."""
  g = Geometry(m, n, block)
  p_P1 = np.arange(g.P, dtype=np.int32)[:, None]
  t_1D = np.arange(g.D, dtype=np.int32)[None, :]
  wrapped = (p_P1 + t_1D) % g.P
  straight = np.broadcast_to(t_1D, (g.P, g.D))
  if g.M >= g.N:
    return wrapped.astype(np.int32), np.ascontiguousarray(straight)
  return np.ascontiguousarray(straight), wrapped.astype(np.int32)


def diagonal_index(m: int, n: int, block: int = 1) -> np.ndarray:
  """idx_MxN: the diagonal p that holds each (block-)cell (inverse of `diagonal_coords`)."""
  g = Geometry(m, n, block)
  r_M1 = np.arange(g.M, dtype=np.int32)[:, None]
  c_1N = np.arange(g.N, dtype=np.int32)[None, :]
  return ((r_M1 - c_1N) % g.P if g.M >= g.N else (c_1N - r_M1) % g.P).astype(np.int32)


def offset_coords(offsets, m: int, n: int, block: int = 1):
  """(rows_KxD, cols_KxD) (block indices) of the diagonals `offsets`; no P x D table.

  numpy for numpy offsets (host layouts), jax arrays otherwise (in-graph, maybe traced).
  """
  g = Geometry(m, n, block)
  xp = np if isinstance(offsets, np.ndarray) else jnp
  o_K1 = xp.asarray(offsets).astype(xp.int32)[:, None]
  t_1D = xp.arange(g.D, dtype=xp.int32)[None, :]
  wrapped = (o_K1 + t_1D) % g.P
  straight = xp.broadcast_to(t_1D, wrapped.shape)
  return (wrapped, straight) if g.M >= g.N else (straight, wrapped)


def is_concrete(x) -> bool:
  """Whether `x` is a value known at trace time (not a jax Tracer)."""
  return not isinstance(x, jax.core.Tracer)


def check_offsets(offsets, m: int, n: int, block: int = 1) -> None:
  """Raises ValueError for offsets that are not a 1-D set of distinct ints in [0, P)."""
  p = num_diagonals(m, n, block)
  if not is_concrete(offsets):
    if jnp.ndim(offsets) != 1:
      raise ValueError(f"offsets must be 1-D, got shape {jnp.shape(offsets)}")
    return
  o = np.asarray(offsets)
  if o.ndim != 1:
    raise ValueError(f"offsets must be 1-D, got shape {o.shape}")
  if o.size and not np.issubdtype(o.dtype, np.integer):
    raise ValueError(f"offsets must be integers, got dtype {o.dtype}")
  if o.size and (o.min() < 0 or o.max() >= p):
    what = f"{m}x{n} kernel" + (f" with block {block}" if block != 1 else "")
    raise ValueError(f"offsets must lie in [0, {p}) for a {what}, got range "
                     f"[{o.min()}, {o.max()}]")
  if np.unique(o).size != o.size:
    raise ValueError("offsets must not repeat a diagonal")


def check_values(values, offsets, m: int, n: int, block: int = 1) -> None:
  """Raises ValueError unless values is (K, D) (block 1) or (K, D, b, b), K = len(offsets)."""
  check_offsets(offsets, m, n, block)
  g = Geometry(m, n, block)
  want = g.values_shape(jnp.shape(offsets)[0])
  if tuple(jnp.shape(values)) != want:
    what = "(K, D)" if block == 1 else "(K, D, b, b)"
    raise ValueError(f"values must have shape {what} = {want} for a {m}x{n} kernel"
                     f"{f' with block {block}' if block != 1 else ''} and {want[0]} offsets, "
                     f"got {tuple(jnp.shape(values))}")


def block_of(values) -> int:
  """The block size b of a values array: 1 for (K, D), b for (K, D, b, b)."""
  shape = jnp.shape(values)
  if len(shape) == 4 and shape[2] == shape[3]:
    return int(shape[3])
  if len(shape) == 2:
    return 1
  raise ValueError(f"values must be (K, D) or (K, D, b, b), got shape {tuple(shape)}")


def _unblock(w4_MxNxBxB, m: int, n: int) -> jax.Array:
  """(M, N, b, b) blocks -> (m, n)."""
  mb, nb, b, _ = w4_MxNxBxB.shape
  return w4_MxNxBxB.transpose(0, 2, 1, 3).reshape(m, n) if b > 1 else w4_MxNxBxB.reshape(m, n)


def _to_blocks(w_MxN, m: int, n: int, block: int) -> jax.Array:
  """(m, n) -> (M, N, b, b) blocks."""
  b = block
  return jnp.asarray(w_MxN).reshape(m // b, b, n // b, b).transpose(0, 2, 1, 3)


def densify(values, offsets, m: int, n: int, block: int = 1) -> jax.Array:
  """W_MxN with values (K, D[, b, b]) placed on the (block-)diagonals `offsets`."""
  check_values(values, offsets, m, n, block)
  v = jnp.asarray(values)
  g = Geometry(m, n, block)
  coords = offset_coords(offsets, m, n, block)
  if block == 1:
    return jnp.zeros((m, n), v.dtype).at[coords].set(v, unique_indices=True)
  w4 = jnp.zeros((g.M, g.N, block, block), v.dtype).at[coords].set(v, unique_indices=True)
  return _unblock(w4, m, n)


def densify_all(values_PxD, m: int, n: int, block: int = 1) -> jax.Array:
  """densify(values, arange(P), m, n, block) by slicing and reshaping alone (no scatter).

  Every diagonal is present, so the (block) grid of W (or W.T) is the skew of values.T:
  row t of values.T rolled by t, done as a strided read of [values.T, values.T] flattened.
  """
  g = Geometry(m, n, block)
  p, d = g.P, g.D
  if tuple(jnp.shape(values_PxD)) != g.values_shape(p):
    raise ValueError(f"values must have shape {g.values_shape(p)}, got {jnp.shape(values_PxD)}")
  tail = tuple(jnp.shape(values_PxD)[2:])
  y_DxP = jnp.swapaxes(jnp.asarray(values_PxD), 0, 1)
  flat = jnp.concatenate([y_DxP, y_DxP], axis=1).reshape(-1, *tail)  # rows of length 2P
  flat = jnp.pad(flat, ((0, p),) + ((0, 0),) * len(tail))  # the last row overruns by < P
  # z[t, r] = y[t, (r - t) % P] = flat[t * 2P + P - t + r] = flat[P + t * (2P - 1) + r]
  z_DxP = jax.lax.slice_in_dim(flat, p, p + d * (2 * p - 1)).reshape(d, 2 * p - 1, *tail)[:, :p]
  w4 = jnp.swapaxes(z_DxP, 0, 1) if g.M >= g.N else z_DxP
  return w4 if block == 1 else _unblock(w4, m, n)


def gather_diagonals(w_MxN, offsets, m: int, n: int, block: int = 1) -> jax.Array:
  """values (K, D[, b, b]) read off the (block-)diagonals `offsets` of a dense W."""
  check_offsets(offsets, m, n, block)
  if tuple(jnp.shape(w_MxN)) != (m, n):
    raise ValueError(f"W must have shape {(m, n)}, got {tuple(jnp.shape(w_MxN))}")
  coords = offset_coords(offsets, m, n, block)
  if block == 1:
    return jnp.asarray(w_MxN)[coords]
  return _to_blocks(w_MxN, m, n, block)[coords]


def transpose_offsets(offsets, m: int, n: int, block: int = 1):
  """Offsets in the (n, m) transpose's geometry of diagonals `offsets` of an (m, n) kernel.

  Rectangular grids keep each diagonal's offset and entry order; a square grid maps
  offset p to (-p) mod N with its entries rolled by p (see `transpose_pattern`).
  """
  check_offsets(offsets, m, n, block)
  g = Geometry(m, n, block)
  if g.M != g.N:
    return offsets
  xp = np if is_concrete(offsets) and isinstance(offsets, np.ndarray) else jnp
  return (-xp.asarray(offsets)) % g.N


def transpose_pattern(values, offsets, m: int, n: int, block: int = 1):
  """(values_T, offsets_T): the same matrix's transpose W.T (n, m) as a diagonal pattern.

  densify(values_T, offsets_T, n, m, b) == densify(values, offsets, m, n, b).T; offsets_T
  is not re-sorted (for a square grid it runs in the reverse order of `offsets`).
  """
  check_values(values, offsets, m, n, block)
  g = Geometry(m, n, block)
  offsets_T = transpose_offsets(offsets, m, n, block)
  v = jnp.asarray(values)
  if block > 1:
    v = jnp.swapaxes(v, -1, -2)  # each block transposes too
  if g.M != g.N:
    return v, offsets_T
  # Square grid: entry t of diagonal p sits at ((p + t) % N, t); in W.T it is entry
  # t' = (p + t) % N of diagonal -p, so values_T[k, t'] = values[k, (t' - p) % N].
  t_1D = jnp.arange(g.N)[None, :]
  src_KxD = (t_1D - jnp.asarray(offsets)[:, None]) % g.N
  src = src_KxD.reshape(src_KxD.shape + (1,) * (v.ndim - 2))
  return jnp.take_along_axis(v, src, axis=1), offsets_T
