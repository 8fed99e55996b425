"""The `pallas` backend of `dynadiag_jax.ops.diag_matmul`: BCSR SpMM, SpMM^T and SDDMM.

Importing this module registers `ops.Backend("pallas", fwd, dx, dv, prepare)`; the
custom_vjp in ops wires them into jit, grad, vmap and pmap, and converts the pattern to
BCSR once per call (`prepare`): the forward and both backward products share it. Offsets that are concrete use an exact,
cached host layout (optionally clustered); traced offsets (exploration under jit) use the
jittable layout with a static bound on blocks. Settings are read at trace time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import numpy as np

from dynadiag_jax import ops
from pallas_kernels import bcsr, sddmm, spmm


@dataclasses.dataclass(frozen=True)
class Config:
  """block: BCSR block size (power of two >= 16); batch_tile: None = automatic;
  cluster: reorder rows/columns of host layouts; interpret: None = by platform."""
  block: int = 16
  batch_tile: int | None = None
  cluster: bool = False
  interpret: bool | None = None

  def __post_init__(self):
    bcsr.check_block(self.block)
    if self.batch_tile is not None:
      bcsr.check_block(self.batch_tile, "batch tile")


_config = Config()


def get_config() -> Config:
  """The settings the backend traces with."""
  return _config


def set_config(**changes) -> Config:
  """Changes settings (jit caches do not see them: re-trace after a change); returns the old."""
  global _config
  old, _config = _config, dataclasses.replace(_config, **changes)
  return old


@contextlib.contextmanager
def options(**changes):
  """with options(block=32): ... -- settings for the code traced inside."""
  old = set_config(**changes)
  try:
    yield _config
  finally:
    set_config(**dataclasses.asdict(old))


@functools.lru_cache(maxsize=256)
def _host_layout(key: bytes, m: int, n: int, block: int, cluster: bool) -> bcsr.Layout:
  o_K = np.frombuffer(key, np.int32)
  return bcsr.host_layout(o_K, m, n, block, cluster=cluster)


def layout_for(o_K, m: int, n: int, cfg: Config | None = None) -> bcsr.Layout:
  """Host layout (cached) for concrete offsets, jittable bounded layout for traced ones."""
  cfg = cfg or _config
  if isinstance(o_K, jax.core.Tracer):
    return bcsr.jit_layout(o_K, m, n, cfg.block)
  o_K = np.ascontiguousarray(np.asarray(o_K), np.int32)
  return _host_layout(o_K.tobytes(), m, n, cfg.block, cfg.cluster)


def _prepare(o_K, m, n) -> bcsr.Layout:
  return layout_for(o_K, m, n)


def _fwd(x_BxM, v_KxD, lay, m, n):
  return spmm.spmm(x_BxM, bcsr.pack(v_KxD, lay), lay, batch_tile=_config.batch_tile,
                   interpret=_config.interpret)


def _dx(dy_BxN, v_KxD, lay, m, n):
  return spmm.spmm(dy_BxN, bcsr.pack(v_KxD, lay), lay, transpose=True,
                   batch_tile=_config.batch_tile, interpret=_config.interpret)


def _dv(x_BxM, dy_BxN, lay, m, n):
  return sddmm.diag_sddmm(x_BxM, dy_BxN, lay, batch_tile=_config.batch_tile,
                          interpret=_config.interpret)


BACKEND = ops.Backend("pallas", _fwd, _dx, _dv, prepare=_prepare)
ops.register_backend(BACKEND)
