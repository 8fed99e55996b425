"""The `pallas` backend of `dynadiag_jax.ops.diag_matmul`: BCSR SpMM, SpMM^T and SDDMM.

Block-diagonal patterns (block b in 16..128) are their own BCSR layout: every stored block
is one full (k, t) entry, the block data is `values.reshape(K * D, b, b)` (no conversion)
and only the index is computed from the offsets (`bcsr.block_layout`). Block-1 patterns
(the paper's diagonals) are converted to BCSR blocks of `KernelConfig.bcsr_block`.

Importing this module registers `ops.Backend("pallas", fwd, dx, dv, prepare)`; the
custom_vjp in ops wires them into jit, grad, vmap and pmap, and converts the pattern to
BCSR once per call (`prepare`): the forward and both backward products share it. Offsets
that are concrete use an exact, cached host layout (optionally clustered); traced offsets
(exploration under jit) use the jittable layout with a static bound on blocks. Settings
come from the static `ops.KernelConfig` of each call.
"""

from __future__ import annotations

import functools

import numpy as np

from dynadiag_jax import ops, pattern
from dynadiag_jax.ops import KernelConfig
from dynadiag_jax.pattern import Geometry
from pallas_kernels import bcsr, sddmm, spmm


@functools.lru_cache(maxsize=256)
def _host_layout(key: bytes, m: int, n: int, block: int, cluster: bool) -> bcsr.Layout:
  o_K = np.frombuffer(key, np.int32)
  return bcsr.host_layout(o_K, m, n, block, cluster=cluster)


def layout_for(o_K, m: int, n: int, cfg: KernelConfig = KernelConfig()) -> bcsr.Layout:
  """Host layout (cached) for concrete offsets, jittable bounded layout for traced ones."""
  bcsr.check_block(cfg.bcsr_block)
  if not pattern.is_concrete(o_K):
    return bcsr.jit_layout(o_K, m, n, cfg.bcsr_block)
  o_K = np.ascontiguousarray(np.asarray(o_K), np.int32)
  return _host_layout(o_K.tobytes(), m, n, cfg.bcsr_block, cfg.cluster)


@functools.lru_cache(maxsize=256)
def _host_block_layout(key: bytes, m: int, n: int, block: int) -> bcsr.Layout:
  return bcsr.block_layout(np.frombuffer(key, np.int32).copy(), m, n, block)


def block_layout_for(o_K, geo: Geometry) -> bcsr.Layout:
  """The layout of a block-diagonal pattern (block >= 16): numpy (cached) for concrete
  offsets, jittable for traced ones; the same shapes either way (S = K * D)."""
  if not pattern.is_concrete(o_K):
    return bcsr.block_layout(o_K, geo.m, geo.n, geo.block)
  o_K = np.ascontiguousarray(np.asarray(o_K), np.int32)
  return _host_block_layout(o_K.tobytes(), geo.m, geo.n, geo.block)


def _check_geometry(geo: Geometry) -> None:
  b = geo.block
  if b != 1 and (b < bcsr.MIN_BLOCK or b > bcsr.MAX_BLOCK or b & (b - 1)):
    raise ValueError(
        f"the pallas backend takes block 1 or a block-diagonal block of 16, 32, 64 or 128 "
        f"(Triton's tl.dot needs power-of-two tiles >= 16); got block {b} for a "
        f"{geo.m}x{geo.n} kernel: use backend='xla' or 'dense' for it")


def _prepare(o_K, geo: Geometry, cfg: KernelConfig) -> bcsr.Layout:
  _check_geometry(geo)
  if geo.block > 1:
    return block_layout_for(o_K, geo)
  return layout_for(o_K, geo.m, geo.n, cfg)


def _data(v, lay: bcsr.Layout, geo: Geometry):
  """Block data (S, b, b): the values themselves for blocks, packed for diagonals."""
  if geo.block > 1:
    return v.reshape(-1, geo.block, geo.block)
  return bcsr.pack(v, lay)


def _fwd(x_BxM, v, lay, geo, cfg):
  return spmm.spmm(x_BxM, _data(v, lay, geo), lay, batch_tile=cfg.batch_tile,
                   interpret=cfg.interpret, precision=cfg.precision)


def _dx(dy_BxN, v, lay, geo, cfg):
  return spmm.spmm(dy_BxN, _data(v, lay, geo), lay, transpose=True,
                   batch_tile=cfg.batch_tile, interpret=cfg.interpret,
                   precision=cfg.precision)


def _dv(x_BxM, dy_BxN, lay, geo, cfg):
  kw = dict(batch_tile=cfg.batch_tile, interpret=cfg.interpret, precision=cfg.precision)
  if geo.block > 1:  # one stored block per entry: the block gradients are dv
    g_SxBxB = sddmm.sddmm(x_BxM, dy_BxN, lay, **kw)
    return g_SxBxB.reshape(-1, geo.D, geo.block, geo.block)
  return sddmm.diag_sddmm(x_BxM, dy_BxN, lay, **kw)


BACKEND = ops.Backend("pallas", _fwd, _dx, _dv, prepare=_prepare)
ops.register_backend(BACKEND)
