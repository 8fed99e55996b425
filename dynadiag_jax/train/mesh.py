"""config.parallel='mesh': one `jax.jit` step over a ('data', 'fsdp') device mesh.

The batch is split over every device (rows along ('data', 'fsdp')); parameters, optimizer
and mask states follow `spec` (FSDP: large matrices split along 'fsdp', the rest
replicated); XLA inserts the collectives. DiagDense products run per shard under
`dd.sharding.use_mesh`. The mesh's axes are `AxisType.Auto` (docs/SHARDING.md says why).
Checkpoints hold one logical (gathered) copy, as pmap's do, so a run resumes on any mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import dynadiag_jax as dd
from dynadiag_jax import data
from dynadiag_jax.train import state as state_lib
from dynadiag_jax.train.build import DataSpec
from dynadiag_jax.train.step import PatternStep, eval_body, train_body

AXES = ("data", "fsdp")
ROWS = P(AXES)  # a batch's rows split over every device


def mesh_shape(config: ml_collections.ConfigDict, n: int) -> tuple[int, int]:
  """(data, fsdp) from config.mesh for n devices (data = -1: n // fsdp)."""
  c = config.get("mesh") or ml_collections.ConfigDict()
  d, f = int(c.get("data", -1)), int(c.get("fsdp", 1))
  if f < 1 or n % f:
    raise ValueError(f"config.mesh.fsdp = {f} must be >= 1 and divide the {n} devices")
  if d == -1:
    d = n // f
  if d < 1 or d * f != n:
    raise ValueError(f"config.mesh data x fsdp = {d} x {f} must equal the {n} devices "
                     "(data = -1: all the devices fsdp leaves)")
  return d, f


def make_mesh(devices: Sequence[jax.Device], data_size: int, fsdp: int) -> Mesh:
  """A (data, fsdp) mesh of Auto axes over `devices` in their order (each host's contiguous)."""
  auto = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
  grid = np.asarray(devices, dtype=object).reshape(data_size, fsdp)
  if auto is None:
    return Mesh(grid, AXES)
  return Mesh(grid, AXES, axis_types=(auto, auto))


def spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """The sharding rule of one leaf of params / optimizer / mask state.

  A leaf of >= 2 axes and >= min_size elements is split along 'fsdp' on its largest axis
  that fsdp divides (the first of equal ones); every other leaf (vectors such as bias and
  alpha, scalars, small or indivisible matrices) is replicated.
  """
  shape = tuple(int(s) for s in shape)
  if fsdp == 1 or len(shape) < 2 or math.prod(shape) < min_size:
    return P()
  for i in sorted(range(len(shape)), key=lambda i: (-shape[i], i)):
    if shape[i] % fsdp == 0:
      return P(*([None] * i), "fsdp")
  return P()


@dataclasses.dataclass
class MeshParallel:
  """jax.jit over a ('data', 'fsdp') mesh of every device of every host."""
  mesh: Mesh
  devices: list  # this host's devices in the mesh (data.batches' divisibility)
  min_size: int

  name = "mesh"
  shard_batches = False  # data.batches shaped (per_host, ...)

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, local: Sequence[jax.Device]) -> "MeshParallel":
    devs = list(local) if jax.process_count() == 1 else jax.devices()
    d, f = mesh_shape(config, len(devs))
    c = config.get("mesh") or ml_collections.ConfigDict()
    return cls(make_mesh(devs, d, f), list(local), int(c.get("fsdp_min_size", 2**14)))

  @property
  def size(self) -> int:
    return self.mesh.size

  def describe(self) -> str:
    d, f = (self.mesh.shape[a] for a in AXES)
    return f"a {d}x{f} (data x fsdp) mesh of {self.size} device(s) x {jax.process_count()} host(s)"

  def sharding(self, pspec: P) -> NamedSharding:
    return NamedSharding(self.mesh, pspec)

  def shardings(self, state: state_lib.TrainState) -> state_lib.TrainState:
    """NamedShardings of a state: params and opt_state by `spec`, extra, step and rng replicated."""
    f = self.mesh.shape["fsdp"]
    rule = lambda x: self.sharding(spec(np.shape(x), f, self.min_size))
    rep = self.sharding(P())
    return state.replace(step=rep, params=jax.tree.map(rule, state.params),
                         extra=jax.tree.map(lambda _: rep, state.extra),
                         opt_state=jax.tree.map(rule, state.opt_state), rng=rep)

  def put(self, host: state_lib.TrainState) -> state_lib.TrainState:
    """A host (numpy) state on the mesh, each leaf as `shardings` says (any process count)."""
    def one(x, sh):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    return jax.tree.map(one, host, self.shardings(host))

  def host(self, tree: Any) -> Any:
    """Every leaf whole, as numpy on every host (one logical copy: what checkpoints hold)."""
    return jax.tree.map(_local, _gather(self.mesh)(tree))

  def scalars(self, tree: Any) -> Any:
    """Step outputs (metrics, eval sums: replicated scalars) as numpy, without a program."""
    return jax.tree.map(_local, tree)

  def leaf(self, x: Any) -> np.ndarray:
    """One leaf as numpy: a replicated one (alpha, the dynadiag collection) read locally, with
    no program, so process 0 alone may call it; a split one gathered (every process must)."""
    return _local(x) if x.sharding.is_fully_replicated else self.host(x)

  def batch(self, source, raw: dict) -> dict:
    """This host's rows of a batch placed on the mesh, preprocessed per device (as under pmap)."""
    sh = self.sharding(ROWS)
    glob = {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in raw.items()}
    return _preprocess(source, self.mesh)(glob)

  def train_step(self, model: nn.Module, tx: optax.GradientTransformation,
                 sched: dd.Schedule | None, spec_: DataSpec, label_smoothing: float,
                 options: dict | None) -> Callable:
    constrain = lambda s: jax.lax.with_sharding_constraint(s, self.shardings(s))
    body = train_body(model, tx, sched, spec_, label_smoothing, axis=None, context=self.context,
                      constrain=constrain)
    return PatternStep(body, options, donate=(0,), wrap=_jit, host=self.host)

  def eval_step(self, model: nn.Module, spec_: DataSpec, options: dict | None,
                sched: dd.Schedule | None) -> Callable:
    body = eval_body(model, spec_, sched, axis=None, context=self.context)
    return PatternStep(body, options, wrap=_jit, host=self.host)

  def context(self):
    """DiagDense products per shard of the batch rows (dd.sharding.use_mesh)."""
    return dd.sharding.use_mesh(self.mesh, batch_axes=AXES)


def _local(x: jax.Array) -> np.ndarray:
  """A replicated array's value from this process's first shard (no program runs)."""
  return np.array(x.addressable_shards[0].data)


def _jit(fn: Callable, donate: tuple[int, ...] = ()) -> Callable:
  return jax.jit(fn, donate_argnums=donate)


@functools.lru_cache(maxsize=8)
def _gather(mesh: Mesh) -> Callable:
  """A jitted copy of a tree with every leaf replicated on `mesh`."""
  return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=8)
def _preprocess(source, mesh: Mesh) -> Callable:
  """data.device.preprocess on each device's rows (shard_map: the same pairs as pmap's)."""
  fn = data.device.preprocess(source)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=ROWS, out_specs=ROWS))
