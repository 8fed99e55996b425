"""`sparse_mlp`: a model's MLP (fc_in -> activation -> fc_out), fused when both layers allow it.

Models call `sparse_mlp(fc_in, fc_out, x)` with their two linears as built by the
`LayerFactory` (children of the calling module, named as before: the variable tree,
checkpoints, freeze and summaries are untouched). When both are frozen `DiagDense` layers
with one block size b > 1, static offsets and the `xla` backend (named, or what `auto` picks
for both on this platform, rows and K), the MLP runs as one `backends.fused_mlp` op whose
hidden activation stays block-leading; otherwise (exploring, block 1, `nn.Dense`, another
backend, traced offsets, a layer with an input permutation, active dropout between the two)
it is the two plain layer calls, as it is inside `unfused()` (which `dd.linear_calls`
enters, so summaries see both layers) and with `LayerFactory(fuse_mlp=False)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np

from dynadiag_jax import ops, pattern, sharding
from dynadiag_jax.diag_dense import COLLECTION, DiagDense
from dynadiag_jax.pattern import Geometry


_UNFUSED = contextvars.ContextVar("dynadiag_unfused_mlp", default=False)


@contextlib.contextmanager
def unfused() -> Iterator[None]:
  """Within this context (read at trace time) every `sparse_mlp` makes the two plain layer
  calls: `dd.linear_calls` (and so `dd.summarize`) sees each layer's `__call__`."""
  token = _UNFUSED.set(True)
  try:
    yield
  finally:
    _UNFUSED.reset(token)


@dataclasses.dataclass(frozen=True)
class FrozenLayer:
  """What a frozen block-diagonal DiagDense computes: its values, offsets, bias and settings."""
  values: jax.Array
  offsets: np.ndarray
  bias: jax.Array | None
  geo: Geometry
  precision: Any
  dtype: Any


def frozen_layer(layer: nn.Module, m: int) -> FrozenLayer | None:
  """The frozen (values, offsets, bias) of `layer` for `m` input features without applying it,
  or None where the fused path does not apply (see the module docstring)."""
  if not isinstance(layer, DiagDense) or layer.layer_mixing != "none":
    return None
  if not layer.has_variable(COLLECTION, "offsets") or not layer.has_variable("params", "values"):
    return None
  o_K = layer.get_variable(COLLECTION, "offsets")
  want = layer.get_variable(COLLECTION, "in_features") if layer.has_variable(
      COLLECTION, "in_features") else m
  if not pattern.is_concrete(o_K) or not pattern.is_concrete(want):
    return None
  if int(np.asarray(want).reshape(-1)[0]) != m:
    return None  # the plain call raises the layer's own error
  geo = Geometry(m, int(layer.features), layer.block_for(m))
  v = layer.get_variable("params", "values")
  o_K = np.asarray(o_K, np.int32)
  if geo.block < 2 or tuple(v.shape) != geo.values_shape(o_K.shape[0]):
    return None
  bias = layer.get_variable("params", "bias") if layer.use_bias else None
  return FrozenLayer(v, o_K, bias, geo, layer.layer_kernel_config.precision, layer.dtype)


def _xla_for(layer: nn.Module, f: FrozenLayer, rows: int) -> bool:
  """Whether the layer's products run on the `xla` backend (named, or picked by `auto`)."""
  if not isinstance(rows, (int, np.integer)):
    return False
  name = ops.resolve_backend(layer.backend, f.geo, int(rows), int(f.offsets.shape[0])).name
  return name == "xla"


def fusable(fc_in: nn.Module, fc_out: nn.Module, x: jax.Array) -> tuple[FrozenLayer, FrozenLayer] | None:
  """(layer 1, layer 2) as `FrozenLayer`s when the pair runs fused on `x`, else None."""
  m = int(x.shape[-1])
  f1 = frozen_layer(fc_in, m)
  f2 = None if f1 is None else frozen_layer(fc_out, f1.geo.n)
  if f2 is None or f1.geo.block != f2.geo.block or f1.dtype != f2.dtype:
    return None
  rows = ops.row_count(x.shape[:-1])
  if not (_xla_for(fc_in, f1, rows) and _xla_for(fc_out, f2, rows)):
    return None
  rule = sharding.current()
  if rule is not None and rule.shards > 1:  # per-shard products: the plain calls do that
    return None
  return f1, f2


def sparse_mlp(fc_in: nn.Module, fc_out: nn.Module, x: jax.Array,
               activation: Callable = nn.gelu, between: Callable | None = None,
               fuse: bool = True) -> jax.Array:
  """fc_out(between(activation(fc_in(x)))), fused (one op, hidden block-leading) when possible.

  `between` (e.g. an active dropout) runs on the hidden activation in the plain path; the
  caller passes None when it is the identity, else the pair is not fused. `fuse=False`
  always takes the plain path (the reference the tests compare against).
  """
  pair = fusable(fc_in, fc_out, x) if fuse and between is None and not _UNFUSED.get() else None
  if pair is None:
    h = activation(fc_in(x))
    return fc_out(h if between is None else between(h))
  from dynadiag_jax.backends import fused_mlp  # pylint: disable=import-outside-toplevel
  f1, f2 = pair
  x, v1, b1, v2, b2 = nn.dtypes.promote_dtype(x, f1.values, f1.bias, f2.values, f2.bias,
                                              dtype=f1.dtype)
  return fused_mlp.fused_mlp(x, v1, f1.offsets, b1, v2, f2.offsets, b2, f1.geo, f2.geo,
                             activation, f1.precision, f2.precision)
