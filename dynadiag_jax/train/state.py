"""`TrainState` and its host-side phase changes (K_active levels, the freeze), replication."""

from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import dynadiag_jax as dd
from dynadiag_jax import methods as dd_methods
from dynadiag_jax.diag_dense import COLLECTION

AXIS = "batch"  # the pmap axis


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step.

  step: () int32 steps done (also the data position); params; extra: the other variable
  collections ({'dynadiag': ...} or {}); opt_state; rng: (2,) uint32 base key (dropout key
  of step s = fold_in(rng, s)). Schedule state, static (part of the tree structure):
  `level` is the K_active level in use (None: as initialized, every diagonal) and `frozen`
  whether the freeze has happened; the step compiles once per value (`model_at`).
  """
  step: Any
  params: Any
  extra: Any
  opt_state: Any
  rng: Any
  level: float | None = flax.struct.field(pytree_node=False, default=None)
  frozen: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def variables(self) -> dict:
    """{'params': ..., **extra}: what model.apply takes."""
    return {"params": self.params, **self.extra}

  @property
  def active_level(self) -> float:
    """The K_active level the layers compute at (1.0, every diagonal, before any is set)."""
    return 1.0 if self.level is None else self.level

  @property
  def sparse(self) -> bool:
    """Whether the model has DiagDense layers."""
    return COLLECTION in self.extra


def _np_tree(tree: Any) -> Any:
  return jax.tree.map(np.asarray, flax.core.unfreeze(tree))


def create(model: nn.Module, tx: optax.GradientTransformation, x: np.ndarray, seed: int,
           options: dict[str, Any] | None = None) -> TrainState:
  """A fresh, un-replicated state (numpy leaves) for inputs like x (compiler `options` for init)."""
  k_init, k_run = jax.random.split(jax.random.PRNGKey(seed))
  init = jax.jit(lambda k: model.init(k, x, train=False))
  variables = init.lower(k_init).compile(options or None)(k_init)
  variables = _np_tree(variables)
  params = variables.pop("params")
  return TrainState(step=np.asarray(0, np.int32), params=params, extra=variables,
                    opt_state=_np_tree(tx.init(params)), rng=np.asarray(k_run, np.uint32))


def _frozen(state: TrainState, variables: dict, opt_state: Any) -> TrainState:
  """`state` holding the variables and optimizer state `dd.freeze` returned (plain arrays,
  for checkpoints: the step closes over the pattern itself, `step.PatternStep`)."""
  variables = _np_tree({**variables, COLLECTION: dd.static.arrays(variables[COLLECTION])})
  params = variables.pop("params")
  return state.replace(params=params, extra=variables, opt_state=_np_tree(opt_state),
                       level=0.0, frozen=True)


def freeze(state: TrainState, temperature: float = dd.phases.T_END) -> TrainState:
  """State after the freeze transition (`dd.freeze`): alpha dropped, top-K values and moments kept."""
  return _frozen(state, *dd.freeze(state.variables, state.opt_state, temperature))


def prepare(config: Any, state: TrainState) -> TrainState:
  """A fresh state made ready for the run's method (static_diag: frozen on its diagonals)."""
  params = dd_methods.static_alpha(config, state.variables)
  if params is None:
    return state
  return freeze(state.replace(params=params), dd.schedules.DEFAULT_TEMPERATURE)


def due(state: TrainState, sched: dd.Schedule | None, step: int) -> bool:
  """Whether a K_active level change or the freeze is due before running `step`."""
  if sched is None or not state.sparse or state.frozen:
    return False
  return sched.phase(step) != (state.level, False)


def advance(state: TrainState, sched: dd.Schedule | None, step: int) -> TrainState:
  """`state` in the phase of `step`: its K_active level, or frozen (`dd.advance`, the one freeze)."""
  if not due(state, sched, step):
    return state
  level, frozen = sched.phase(step)
  if not frozen:
    return state.replace(level=level)
  return _frozen(state, *dd.advance(state.variables, state.opt_state, sched, step))


def at_phase(state: TrainState, level: float | None, frozen: bool) -> TrainState:
  """A fresh state brought to the structure of (level, frozen): a restore target."""
  if not state.sparse:
    return state
  if frozen:
    return freeze(state)
  return state.replace(level=level)


def model_at(model: nn.Module, state: TrainState, sched: dd.Schedule | None,
             temperature: Any = dd.schedules.DEFAULT_TEMPERATURE) -> Any:
  """`model` in the exploration phase of `state` (its level) at `temperature`."""
  if not state.sparse or state.frozen or sched is None:
    return model
  return dd.with_phase(model, state.active_level, temperature, sched.k_start_fraction)


def active_diagonals(state: TrainState, k_start_fraction: float = 1.0) -> int:
  """Diagonals computed per step, summed over the DiagDense layers (kept K once frozen)."""
  total = 0

  def walk(col, params):
    nonlocal total
    if dd.phases.holds(col, "offsets"):
      total += int(np.shape(col["offsets"])[-1])
    elif dd.phases.holds(col, "k"):
      k = int(np.asarray(col["k"]).reshape(-1)[0])
      total += dd.schedules.k_active(np.shape(params["alpha"])[-1], k, state.active_level,
                                     k_start_fraction)
    else:
      for key, sub in col.items():
        walk(sub, params[key])

  walk(state.extra.get(COLLECTION, {}), state.params)
  return total


def mesh(devices: Sequence[jax.Device]) -> Mesh:
  """A 1-D mesh over the local devices the run uses."""
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(state: TrainState, devices: Sequence[jax.Device]) -> TrainState:
  """Every leaf with a leading device axis, one copy on each device (pmap input layout)."""
  sh = NamedSharding(mesh(devices), PartitionSpec(AXIS))
  n = len(devices)
  return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(x, (n, *np.shape(x))), sh), state)


def unreplicate(state: Any) -> Any:
  """The copy on the first device of every leaf, as numpy (copied: buffers get donated)."""
  return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data)[0], state)


def shard(batch: dict, devices: Sequence[jax.Device]) -> dict:
  """A (num_devices, per_device, ...) numpy batch onto the devices."""
  sh = NamedSharding(mesh(devices), PartitionSpec(AXIS))
  return jax.tree.map(lambda x: jax.device_put(x, sh), batch)
