"""`diag_matmul` on operands sharded over a device mesh: the products run per shard.

A `pallas_call` cannot be partitioned by XLA's SPMD partitioner, so inside a user's jitted
step whose batch is sharded by a `NamedSharding` the `pallas` backend (and, for the same
per-shard cost, the `xla` backend) run under `jax.shard_map`: each device multiplies its own
rows. The rule (docs/SHARDING.md):

  x (rows, m)        rows sharded along `batch_axes`, features replicated
  values, offsets    replicated (`P()`): parameters sharded along another axis (FSDP) are
                     all-gathered by XLA before the product, the FSDP rule
  y (rows, n)        rows sharded along `batch_axes`
  dx                 per shard, like x
  dvalues            per-shard partial sums, summed over `batch_axes` (`psum`): the
                     full-batch gradient, equal to the unsharded one

The custom_vjp'd product of `ops` runs inside the shard_map (forward, dx and dvalues per
shard); the transpose of a replicated input sums its cotangent over the mesh axes, which is
the `psum` above. Without `use_mesh` (or with one device along `batch_axes`) `ops.diag_matmul`
is unchanged: the hook returns the plain product.

    mesh = jax.make_mesh((2, 2), ("data", "fsdp"))

    @jax.jit
    def step(params, opt_state, x, y):
      with dd.sharding.use_mesh(mesh, batch_axes=("data",)):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      ...

`use_mesh` is read when `diag_matmul` is traced; `jax.jit` does not key its cache on it, so
enter it inside the jitted function (as above), or decorate that function with it (under
`jax.jit`: `@jax.jit @dd.sharding.use_mesh(mesh) def step(...)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

try:  # jax >= 0.6
  _shard_map = jax.shard_map
  _CHECK = "check_vma"
except AttributeError:  # older jax
  from jax.experimental.shard_map import shard_map as _shard_map  # type: ignore
  _CHECK = "check_rep"

# The backends whose products run per shard; 'dense' is one GEMM that XLA partitions itself.
SHARDED_BACKENDS = ("pallas", "xla")


@dataclasses.dataclass(frozen=True)
class MeshRule:
  """The mesh `diag_matmul` shards over, and the mesh axes the rows are split along."""
  mesh: Mesh
  batch_axes: tuple[str, ...] = ("data",)

  @property
  def shards(self) -> int:
    """How many row shards: the product of the mesh's sizes along `batch_axes`."""
    return int(np.prod([self.mesh.shape[a] for a in self.batch_axes], dtype=np.int64))


_STATE = threading.local()


def current() -> MeshRule | None:
  """The rule set by the innermost `use_mesh`, or None."""
  return getattr(_STATE, "rule", None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, batch_axes: str | Sequence[str] = ("data",)) -> Iterator[MeshRule]:
  """Within this context, `diag_matmul` (pallas / xla backends) runs per shard of `mesh`.

  Rows of x are split along `batch_axes` (mesh axis names; a batch sharded along 'data',
  or along ('data', 'fsdp') for FSDP's batch split); values and offsets are replicated.
  Read when `diag_matmul` is traced: enter it inside the jitted function.
  """
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  if not isinstance(mesh, Mesh):
    raise TypeError(f"use_mesh takes a jax.sharding.Mesh, got {type(mesh).__name__}")
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown or not axes:
    raise ValueError(f"batch_axes {axes!r} must name axes of the mesh, whose axes are "
                     f"{tuple(mesh.axis_names)!r}")
  rule, prev = MeshRule(mesh, axes), current()
  _STATE.rule = rule
  try:
    yield rule
  finally:
    _STATE.rule = prev


def product(fn: Callable, x_BxM, v, o_K, geo, backend: str, cfg, static) -> Any:
  """fn(x_BxM, v, o_K, geo, backend, cfg, static) (ops' custom_vjp'd product), per shard
  of the current mesh when one is set and splits the rows, else the plain call."""
  rule = current()
  if (rule is None or backend not in SHARDED_BACKENDS or rule.shards == 1
      or not isinstance(x_BxM.shape[0], (int, np.integer))  # symbolic rows (jax.export)
      or x_BxM.shape[0] % rule.shards  # rows not split evenly: XLA's own placement
      or _manual(rule.batch_axes)):  # already per shard (the caller's own shard_map)
    return fn(x_BxM, v, o_K, geo, backend, cfg, static)
  rows = P(rule.batch_axes, None)
  local = lambda x, v, o: fn(x, v, o, geo, backend, cfg, static)
  # check off: a pallas_call has no replication rule; values and offsets are P(), so the
  # transpose still sums their cotangents over the mesh (tested against one device).
  specs = (rows, P(), P())
  sharded = _shard_map(local, mesh=rule.mesh, in_specs=specs, out_specs=rows,
                       **{_CHECK: False})
  args = (x_BxM, v, o_K)
  if _explicit(rule.mesh):  # sharding in types: move the operands to the specs first
    args = tuple(jax.sharding.reshard(a, NamedSharding(rule.mesh, s))
                 for a, s in zip(args, specs))
  return sharded(*args)


def _manual(axes: tuple[str, ...]) -> bool:
  """Whether any of `axes` is already manual here (inside a shard_map over it)."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  manual = getattr(get(), "manual_axes", ()) if get is not None else ()
  return any(a in manual for a in axes)


def _explicit(mesh: Mesh) -> bool:
  """Whether any axis of `mesh` is `AxisType.Explicit` (the default of `jax.make_mesh`)."""
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  return explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ()))
