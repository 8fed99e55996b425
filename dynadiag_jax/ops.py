"""`diag_matmul`: x @ W for a K-diagonal W, one custom_vjp over switchable backends."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import pattern


def _offsets(o_K, m, n):
  return o_K


@dataclasses.dataclass(frozen=True)
class Backend:
  """The three products a backend supplies; m, n are static ints, o_K int32 (maybe traced).

  prepare(o_K, m, n) -> pat                    the pattern in the backend's own form
                                                (e.g. BCSR), built once per call and
                                                shared by the forward and the backward
  fwd(x_BxM, v_KxD, pat, m, n) -> y_BxN        y = x @ W
  dx(dy_BxN, v_KxD, pat, m, n) -> dx_BxM      dx = dy @ W.T (a diagonal pattern again)
  dv(x_BxM, dy_BxN, pat, m, n) -> dv_KxD      dv[k, t] = sum_b x[b, row] * dy[b, col]
  """
  name: str
  fwd: Callable
  dx: Callable
  dv: Callable
  prepare: Callable = _offsets


_BACKENDS: dict[str, Backend] = {}
# Backends whose module registers them on import, loaded only when first asked for.
_LAZY = {"pallas": "pallas_kernels.diag"}
NAMES = ("auto", "dense", "pallas")


def register_backend(backend: Backend) -> None:
  """Makes `backend` available to `diag_matmul(..., backend=backend.name)`."""
  _BACKENDS[backend.name] = backend


def resolve_backend(name: str) -> Backend:
  """The Backend for `name`; 'auto' is pallas on GPU, dense elsewhere."""
  if name == "auto":
    name = "pallas" if jax.default_backend() == "gpu" else "dense"
  if name not in _BACKENDS and name in _LAZY:
    importlib.import_module(_LAZY[name])
  if name not in _BACKENDS:
    raise ValueError(f"unknown diag_matmul backend {name!r}; choose one of "
                     f"{sorted(set(NAMES) | set(_BACKENDS))}")
  return _BACKENDS[name]


# -- dense backend: the correctness reference, and the fastest path on CPU. --------------

def _dense_fwd(x_BxM, v_KxD, o_K, m, n):
  return x_BxM @ pattern.densify(v_KxD, o_K, m, n)


def _dense_dx(dy_BxN, v_KxD, o_K, m, n):
  return dy_BxN @ pattern.densify(v_KxD, o_K, m, n).T


def _dense_dv(x_BxM, dy_BxN, o_K, m, n):
  dw_MxN = jnp.matmul(x_BxM.T, dy_BxN, preferred_element_type=jnp.float32)
  return pattern.gather_diagonals(dw_MxN, o_K, m, n)


register_backend(Backend("dense", _dense_fwd, _dense_dx, _dense_dv))


# -- the primitive -------------------------------------------------------------------------

class StaticOffsets:
  """Concrete offsets carried as a static argument, so backends see them as numpy.

  A frozen pattern closed over by a jitted function (not passed in as an argument) thus
  reaches `Backend.prepare` as numpy, and the pallas backend can build its exact host
  BCSR layout at trace time instead of the bounded jittable one.
  """

  def __init__(self, o_K):
    self.o_K = np.asarray(o_K, np.int32)
    self._key = (self.o_K.shape, self.o_K.tobytes())

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other) -> bool:
    return isinstance(other, StaticOffsets) and self._key == other._key


def _prepared(be: Backend, o_K, static: StaticOffsets | None, m: int, n: int):
  return be.prepare(o_K if static is None else static.o_K, m, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _diag_matmul(x_BxM, v_KxD, o_K, m, n, backend, static):
  be = resolve_backend(backend)
  return be.fwd(x_BxM, v_KxD, _prepared(be, o_K, static, m, n), m, n)


def _fwd(x_BxM, v_KxD, o_K, m, n, backend, static):
  be = resolve_backend(backend)
  pat = _prepared(be, o_K, static, m, n)
  return be.fwd(x_BxM, v_KxD, pat, m, n), (x_BxM, v_KxD, pat)


def _bwd(m, n, backend, static, res, dy_BxN):
  x_BxM, v_KxD, pat = res
  be = resolve_backend(backend)
  dx_BxM = be.dx(dy_BxN, v_KxD, pat, m, n).astype(x_BxM.dtype)
  dv_KxD = be.dv(x_BxM, dy_BxN, pat, m, n).astype(v_KxD.dtype)
  return dx_BxM, dv_KxD, None


_diag_matmul.defvjp(_fwd, _bwd)


def diag_matmul(x, values, offsets, m: int, n: int, backend: str = "auto") -> jax.Array:
  """y_...xN = x_...xM @ W, W the (m, n) kernel with values_KxD on diagonals offsets_K.

  Traced offsets (exploration, or offsets passed into jit) reach the backend traced;
  concrete ones (eager, or closed over by jit) reach it as numpy, see `StaticOffsets`.
  """
  pattern.check_values(values, offsets, m, n)
  be = resolve_backend(backend)  # fail early on an unknown name
  if x.shape[-1] != m:
    raise ValueError(f"x has {x.shape[-1]} features on its last axis, the kernel needs {m}")
  lead = x.shape[:-1]
  if isinstance(offsets, jax.core.Tracer):
    o_K, static = jnp.asarray(offsets, jnp.int32), None
  else:
    o_K, static = jnp.zeros((0,), jnp.int32), StaticOffsets(offsets)
  y_BxN = _diag_matmul(x.reshape(-1, m), values, o_K, m, n, be.name, static)
  return y_BxN.reshape(*lead, n)
