"""`diag_matmul`: x @ W for a K-(block-)diagonal W, one custom_vjp over switchable backends."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import pattern, sharding
from dynadiag_jax.pattern import Geometry


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Backend settings, a hashable value passed down as a static argument.

  bcsr_block: BCSR block of the pallas backend for block-1 patterns (16, 32, 64 or 128);
  batch_tile: rows per pallas program (None: automatic); cluster: reorder rows / columns
  of exact pallas layouts (paper Appendix D); interpret: pallas interpret mode (None: by
  platform); precision: `jax.lax.Precision` of the products (as `nn.Dense`'s).
  """
  bcsr_block: int = 16
  batch_tile: int | None = None
  cluster: bool = False
  interpret: bool | None = None
  precision: Any = None

  def __post_init__(self):
    for name in ("bcsr_block", "batch_tile"):
      v = getattr(self, name)
      if v is not None and v not in (16, 32, 64, 128):
        raise ValueError(f"KernelConfig.{name} must be a power of two >= 16 and <= 128 "
                         f"(16, 32, 64 or 128), got {v!r}")


def _offsets(o_K, geo, cfg):
  return o_K


@dataclasses.dataclass(frozen=True)
class Backend:
  """The three products a backend supplies; geo, cfg static, o_K int32 (numpy or traced).

  prepare(o_K, geo, cfg) -> pat              the pattern in the backend's own form (e.g.
                                              BCSR), built once per call and shared by the
                                              forward and the backward
  fwd(x_BxM, v, pat, geo, cfg) -> y_BxN      y = x @ W; v is (K, D) or (K, D, b, b)
  dx(dy_BxN, v, pat, geo, cfg) -> dx_BxM     dx = dy @ W.T (a diagonal pattern again)
  dv(x_BxM, dy_BxN, pat, geo, cfg) -> dv     shaped like v: dv[k, t] = x_rows.T @ dy_cols
  """
  name: str
  fwd: Callable
  dx: Callable
  dv: Callable
  prepare: Callable = _offsets


_BACKENDS: dict[str, Backend] = {}
# Backends whose module registers them on import, loaded only when first asked for.
_LAZY = {"pallas": "pallas_kernels.diag", "xla": "dynadiag_jax.backends.xla"}
NAMES = ("auto", "dense", "xla", "pallas")


def register_backend(backend: Backend) -> None:
  """Makes `backend` available to `diag_matmul(..., backend=backend.name)`."""
  _BACKENDS[backend.name] = backend


def auto_rule(geo: Geometry | None, rows: int | None, k: int | None, platform: str) -> str:
  """The backend 'auto' picks for this platform, geometry, row count and K."""
  from dynadiag_jax.backends import auto  # pylint: disable=import-outside-toplevel
  return auto.choose(geo, rows, k, platform)


def resolve_backend(name: str, geo: Geometry | None = None, rows: int | None = None,
                    k: int | None = None) -> Backend:
  """The Backend for `name`; 'auto' asks `auto_rule` (per platform, geometry, rows, K)."""
  if name == "auto":
    name = auto_rule(geo, rows, k, jax.default_backend())
  if name not in _BACKENDS and name in _LAZY:
    try:
      importlib.import_module(_LAZY[name])
    except ModuleNotFoundError as e:  # e.g. a dependency of the backend is not installed
      raise ValueError(f"diag_matmul backend {name!r} is not available: {e}") from e
  if name not in _BACKENDS:
    raise ValueError(f"unknown diag_matmul backend {name!r}; choose one of "
                     f"{sorted(set(NAMES) | set(_BACKENDS))}")
  return _BACKENDS[name]


def check_backend_name(name: str) -> str:
  """`name` if it names a backend (or 'auto'), else ValueError listing the choices."""
  if name != "auto":
    resolve_backend(name)
  return name


# -- dense backend: the correctness reference, any block size. ------------------------------

def _dense_w(v, o_K, geo):
  return pattern.densify(v, o_K, geo.m, geo.n, geo.block)


def _dense_fwd(x_BxM, v, o_K, geo, cfg):
  return jnp.matmul(x_BxM, _dense_w(v, o_K, geo), precision=cfg.precision)


def _dense_dx(dy_BxN, v, o_K, geo, cfg):
  return jnp.matmul(dy_BxN, _dense_w(v, o_K, geo).T, precision=cfg.precision)


def _dense_dv(x_BxM, dy_BxN, o_K, geo, cfg):
  dw_MxN = jnp.matmul(x_BxM.T, dy_BxN, precision=cfg.precision,
                      preferred_element_type=jnp.float32)
  return pattern.gather_diagonals(dw_MxN, o_K, geo.m, geo.n, geo.block)


DENSE = Backend("dense", _dense_fwd, _dense_dx, _dense_dv)  # also the GEMM form of `xla`
register_backend(DENSE)


# -- the primitive -------------------------------------------------------------------------

class StaticOffsets:
  """Concrete offsets carried as a static argument, so backends see them as numpy.

  A frozen pattern closed over by a jitted function (not passed in as an argument) thus
  reaches `Backend.prepare` as numpy: backends specialise on it (the pallas backend builds
  its exact host layout, the xla backend turns every index into a constant).
  """

  def __init__(self, o_K):
    self.o_K = np.asarray(o_K, np.int32)
    self._key = (self.o_K.shape, self.o_K.tobytes())

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other) -> bool:
    return isinstance(other, StaticOffsets) and self._key == other._key


def _prepared(be: Backend, o_K, static: StaticOffsets | None, geo, cfg):
  return be.prepare(o_K if static is None else static.o_K, geo, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _diag_matmul(x_BxM, v, o_K, geo, backend, cfg, static):
  be = resolve_backend(backend)
  return be.fwd(x_BxM, v, _prepared(be, o_K, static, geo, cfg), geo, cfg)


def _fwd(x_BxM, v, o_K, geo, backend, cfg, static):
  be = resolve_backend(backend)
  pat = _prepared(be, o_K, static, geo, cfg)
  return be.fwd(x_BxM, v, pat, geo, cfg), (x_BxM, v, pat)


def _bwd(geo, backend, cfg, static, res, dy_BxN):
  x_BxM, v, pat = res
  be = resolve_backend(backend)
  dx_BxM = be.dx(dy_BxN, v, pat, geo, cfg).astype(x_BxM.dtype)
  dv = be.dv(x_BxM, dy_BxN, pat, geo, cfg).astype(v.dtype)
  return dx_BxM, dv, None


_diag_matmul.defvjp(_fwd, _bwd)


def row_count(lead: tuple) -> Any:
  """prod(lead): an int, or a symbolic expression when a dimension is symbolic (jax.export).

  Code that branches on the row count treats a symbolic one as many rows (`auto.few_rows`).
  """
  if all(isinstance(d, (int, np.integer)) for d in lead):
    return int(np.prod(lead, dtype=np.int64))
  return functools.reduce(lambda a, d: a * d, lead, 1)


def diag_matmul(x, values, offsets, m: int, n: int, backend: str = "auto",
                kernel: KernelConfig | None = None) -> jax.Array:
  """y_...xN = x_...xM @ W, W the (m, n) kernel with `values` on the diagonals `offsets`.

  values is (K, D) for single diagonals or (K, D, b, b) for b x b block-diagonals (the
  block size is read off its shape). Traced offsets (exploration, or offsets passed into
  jit) reach the backend traced; concrete ones (eager, or closed over by jit) reach it as
  numpy, see `StaticOffsets`.
  """
  geo = Geometry(m, n, pattern.block_of(values))
  pattern.check_values(values, offsets, m, n, geo.block)
  cfg = KernelConfig() if kernel is None else kernel
  if x.shape[-1] != m:
    raise ValueError(f"x has {x.shape[-1]} features on its last axis, the kernel needs {m}")
  lead = x.shape[:-1]
  rows = row_count(lead)
  be = resolve_backend(backend, geo, rows, int(jnp.shape(offsets)[0]))
  if pattern.is_concrete(offsets):
    o_K, static = jnp.zeros((0,), jnp.int32), StaticOffsets(offsets)
  else:
    o_K, static = jnp.asarray(offsets, jnp.int32), None
  # per shard of a mesh set by `dynadiag_jax.sharding.use_mesh`, else the plain product
  y_BxN = sharding.product(_diag_matmul, x.reshape(-1, m), values, o_K, geo, be.name, cfg,
                           static)
  return y_BxN.reshape(*lead, n)
