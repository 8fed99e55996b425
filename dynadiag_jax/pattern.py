"""Wrapped-diagonal geometry of an (m, n) = (in, out) kernel (DESIGN.md section 2)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _check_shape(m: int, n: int) -> None:
  for name, v in (("m", m), ("n", n)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"kernel size {name} must be a positive int, got {v!r}")


def num_diagonals(m: int, n: int) -> int:
  """P = max(m, n): how many wrapped diagonals partition an (m, n) kernel."""
  _check_shape(m, n)
  return int(max(m, n))


def diag_length(m: int, n: int) -> int:
  """D = min(m, n): the length of each diagonal."""
  _check_shape(m, n)
  return int(min(m, n))


def check_sparsity(sparsity: float) -> float:
  """Returns `sparsity` as float, or raises ValueError outside [0, 1)."""
  s = float(sparsity)
  if not (0.0 <= s < 1.0) or math.isnan(s):
    raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
  return s


def num_kept(m: int, n: int, sparsity: float) -> int:
  """K = clip(ceil((1 - s) * P - 1e-9), 1, P): diagonals kept at sparsity s."""
  s = check_sparsity(sparsity)
  p = num_diagonals(m, n)
  return int(min(max(math.ceil((1.0 - s) * p - 1e-9), 1), p))


def diagonal_coords(m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows_PxD, cols_PxD): the cell of entry t of diagonal p."""
  p, d = num_diagonals(m, n), diag_length(m, n)
  p_P1 = np.arange(p, dtype=np.int32)[:, None]
  t_1D = np.arange(d, dtype=np.int32)[None, :]
  wrapped = (p_P1 + t_1D) % p
  straight = np.broadcast_to(t_1D, (p, d))
  if m >= n:
    return wrapped.astype(np.int32), np.ascontiguousarray(straight)
  return np.ascontiguousarray(straight), wrapped.astype(np.int32)


def diagonal_index(m: int, n: int) -> np.ndarray:
  """idx_MxN: the diagonal p that holds each cell (inverse of `diagonal_coords`)."""
  p = num_diagonals(m, n)
  r_M1 = np.arange(m, dtype=np.int32)[:, None]
  c_1N = np.arange(n, dtype=np.int32)[None, :]
  return ((r_M1 - c_1N) % p if m >= n else (c_1N - r_M1) % p).astype(np.int32)


def offset_coords(offsets, m: int, n: int) -> tuple[jax.Array, jax.Array]:
  """(rows_KxD, cols_KxD) of the diagonals `offsets`, computed in-graph (no P x D table)."""
  o_K1 = jnp.asarray(offsets, jnp.int32)[:, None]
  t_1D = jnp.arange(diag_length(m, n), dtype=jnp.int32)[None, :]
  wrapped = (o_K1 + t_1D) % num_diagonals(m, n)
  straight = jnp.broadcast_to(t_1D, wrapped.shape)
  return (wrapped, straight) if m >= n else (straight, wrapped)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_offsets(offsets, m: int, n: int) -> None:
  """Raises ValueError for offsets that are not a 1-D set of distinct ints in [0, P)."""
  p = num_diagonals(m, n)
  if not _is_concrete(offsets):
    if jnp.ndim(offsets) != 1:
      raise ValueError(f"offsets must be 1-D, got shape {jnp.shape(offsets)}")
    return
  o = np.asarray(offsets)
  if o.ndim != 1:
    raise ValueError(f"offsets must be 1-D, got shape {o.shape}")
  if o.size and not np.issubdtype(o.dtype, np.integer):
    raise ValueError(f"offsets must be integers, got dtype {o.dtype}")
  if o.size and (o.min() < 0 or o.max() >= p):
    raise ValueError(f"offsets must lie in [0, {p}) for a {m}x{n} kernel, got range "
                     f"[{o.min()}, {o.max()}]")
  if np.unique(o).size != o.size:
    raise ValueError("offsets must not repeat a diagonal")


def check_values(values, offsets, m: int, n: int) -> None:
  """Raises ValueError unless values is (K, D) for K = len(offsets)."""
  check_offsets(offsets, m, n)
  want = (jnp.shape(offsets)[0], diag_length(m, n))
  if tuple(jnp.shape(values)) != want:
    raise ValueError(f"values must have shape (K, D) = {want} for a {m}x{n} kernel with "
                     f"{want[0]} offsets, got {tuple(jnp.shape(values))}")


def densify(values, offsets, m: int, n: int) -> jax.Array:
  """W_MxN with values_KxD placed on the diagonals `offsets`, zeros elsewhere."""
  check_values(values, offsets, m, n)
  v_KxD = jnp.asarray(values)
  w_MxN = jnp.zeros((m, n), v_KxD.dtype)
  return w_MxN.at[offset_coords(offsets, m, n)].set(v_KxD, unique_indices=True)


def densify_all(values_PxD, m: int, n: int) -> jax.Array:
  """densify(values, arange(P), m, n) by slicing and reshaping alone (no scatter).

  Every diagonal is present, so W (or W.T) is the skew of values.T: row t of values.T
  rolled by t, done as a strided read of [values.T, values.T] flattened.
  """
  p, d = num_diagonals(m, n), diag_length(m, n)
  if tuple(jnp.shape(values_PxD)) != (p, d):
    raise ValueError(f"values must have shape (P, D) = {(p, d)}, got {jnp.shape(values_PxD)}")
  y_DxP = jnp.asarray(values_PxD).T
  flat = jnp.concatenate([y_DxP, y_DxP], axis=1).reshape(-1)  # rows of length 2P
  flat = jnp.pad(flat, (0, p))  # the last row's stride overruns by up to P - 1
  # z[t, r] = y[t, (r - t) % P] = flat[t * 2P + P - t + r] = flat[P + t * (2P - 1) + r]
  z_DxP = jax.lax.slice(flat, (p,), (p + d * (2 * p - 1),)).reshape(d, 2 * p - 1)[:, :p]
  return z_DxP.T if m >= n else z_DxP


def gather_diagonals(w_MxN, offsets, m: int, n: int) -> jax.Array:
  """values_KxD read off the diagonals `offsets` of a dense W (inverse of `densify`)."""
  check_offsets(offsets, m, n)
  if tuple(jnp.shape(w_MxN)) != (m, n):
    raise ValueError(f"W must have shape {(m, n)}, got {tuple(jnp.shape(w_MxN))}")
  return jnp.asarray(w_MxN)[offset_coords(offsets, m, n)]


def transpose_offsets(offsets, m: int, n: int):
  """Offsets in the (n, m) transpose's geometry of diagonals `offsets` of an (m, n) kernel.

  Rectangular kernels keep each diagonal's offset and entry order; a square kernel maps
  offset p to (-p) mod n with its entries rolled by p (see `transpose_pattern`).
  """
  check_offsets(offsets, m, n)
  if m != n:
    return offsets
  xp = np if _is_concrete(offsets) and isinstance(offsets, np.ndarray) else jnp
  return (-xp.asarray(offsets)) % n


def transpose_pattern(values, offsets, m: int, n: int):
  """(values_T, offsets_T): the same matrix's transpose W.T (n, m) as a diagonal pattern.

  densify(values_T, offsets_T, n, m) == densify(values, offsets, m, n).T; offsets_T is
  not re-sorted (for a square kernel it runs in the reverse order of `offsets`).
  """
  check_values(values, offsets, m, n)
  offsets_T = transpose_offsets(offsets, m, n)
  if m != n:
    return values, offsets_T
  # Square: entry t of diagonal p sits at ((p + t) % n, t); in W.T it is entry
  # t' = (p + t) % n of diagonal -p, so values_T[k, t'] = values[k, (t' - p) % n].
  t_1D = jnp.arange(n)[None, :]
  src_KxD = (t_1D - jnp.asarray(offsets)[:, None]) % n
  return jnp.take_along_axis(jnp.asarray(values), src_KxD, axis=1), offsets_T
