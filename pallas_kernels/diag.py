"""The `pallas` backend of `dynadiag_jax.ops.diag_matmul`: BCSR SpMM, SpMM^T and SDDMM.

Importing this module registers `ops.Backend("pallas", fwd, dx, dv, prepare)`; the
custom_vjp in ops wires them into jit, grad, vmap and pmap, and converts the pattern to
BCSR once per call (`prepare`): the forward and both backward products share it. Offsets
that are concrete use an exact, cached host layout (optionally clustered); traced offsets
(exploration under jit) use the jittable layout with a static bound on blocks. Settings
come from the static `ops.KernelConfig` of each call.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from dynadiag_jax import ops
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
  if isinstance(o_K, jax.core.Tracer):
    return bcsr.jit_layout(o_K, m, n, cfg.bcsr_block)
  o_K = np.ascontiguousarray(np.asarray(o_K), np.int32)
  return _host_layout(o_K.tobytes(), m, n, cfg.bcsr_block, cfg.cluster)


def _check_geometry(geo: Geometry) -> None:
  if geo.block != 1:
    raise ValueError(f"the pallas backend takes block-1 patterns; got block {geo.block} for a "
                     f"{geo.m}x{geo.n} kernel (use backend='dense' or 'xla' for blocks)")


def _prepare(o_K, geo: Geometry, cfg: KernelConfig) -> bcsr.Layout:
  _check_geometry(geo)
  return layout_for(o_K, geo.m, geo.n, cfg)


def _fwd(x_BxM, v_KxD, lay, geo, cfg):
  return spmm.spmm(x_BxM, bcsr.pack(v_KxD, lay), lay, batch_tile=cfg.batch_tile,
                   interpret=cfg.interpret)


def _dx(dy_BxN, v_KxD, lay, geo, cfg):
  return spmm.spmm(dy_BxN, bcsr.pack(v_KxD, lay), lay, transpose=True,
                   batch_tile=cfg.batch_tile, interpret=cfg.interpret)


def _dv(x_BxM, dy_BxN, lay, geo, cfg):
  return sddmm.diag_sddmm(x_BxM, dy_BxN, lay, batch_tile=cfg.batch_tile,
                          interpret=cfg.interpret)


BACKEND = ops.Backend("pallas", _fwd, _dx, _dv, prepare=_prepare)
ops.register_backend(BACKEND)
