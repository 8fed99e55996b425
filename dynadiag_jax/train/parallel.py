"""How a run spreads over its devices: `Pmap` (config.parallel='pmap') or `mesh.MeshParallel`
('mesh'). The loop only calls what both provide: place a host state on the devices and fetch
it back, place a batch, build the train and eval steps, read metrics."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

import dynadiag_jax as dd
from dynadiag_jax import data
from dynadiag_jax.train import state as state_lib
from dynadiag_jax.train.build import DataSpec
from dynadiag_jax.train.step import make_eval_step, make_train_step

MODES = ("pmap", "mesh")


@functools.lru_cache(maxsize=8)
def _device_preprocess(source):
  """pmapped data.device.preprocess: uint8 -> normalized float32, mixup / cutmix, on the devices."""
  return jax.pmap(data.device.preprocess(source))


class Pmap:
  """jax.pmap over the local devices: the state replicated on each, batches split over them,
  gradients pmean'd. Checkpoints hold one (the first) copy."""

  name = "pmap"
  shard_batches = True  # data.batches shaped (devices, per_device, ...)

  def __init__(self, devices: Sequence[jax.Device]):
    self.devices = list(devices)

  @property
  def size(self) -> int:
    """Devices over every host."""
    return len(self.devices) * jax.process_count()

  def describe(self) -> str:
    return f"{len(self.devices)} device(s) x {jax.process_count()} host(s) (pmap)"

  def put(self, host: state_lib.TrainState) -> state_lib.TrainState:
    return state_lib.replicate(host, self.devices)

  def host(self, tree: Any) -> Any:
    return state_lib.unreplicate(tree)

  def scalars(self, tree: Any) -> Any:
    """Step outputs (metrics, eval sums) as numpy."""
    return state_lib.unreplicate(tree)

  def leaf(self, x: Any) -> np.ndarray:
    """One leaf of a placed state as numpy (its first copy)."""
    return np.asarray(x.addressable_shards[0].data)[0]

  def batch(self, source, raw: dict) -> dict:
    return _device_preprocess(source)(state_lib.shard(raw, self.devices))

  def train_step(self, model: nn.Module, tx: optax.GradientTransformation,
                 sched: dd.Schedule | None, spec: DataSpec, label_smoothing: float,
                 options: dict | None) -> Callable:
    return make_train_step(model, tx, sched, spec, label_smoothing, options)

  def eval_step(self, model: nn.Module, spec: DataSpec, options: dict | None,
                sched: dd.Schedule | None) -> Callable:
    return make_eval_step(model, spec, options, sched)


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
  """The run's `Pmap` or `mesh.MeshParallel`, from config.parallel (and config.mesh)."""
  mode = config.get("parallel", "pmap")
  if mode not in MODES:
    raise ValueError(f"config.parallel must be one of {MODES}, got {mode!r}")
  if mode == "pmap":
    return Pmap(devices)
  from dynadiag_jax.train import mesh  # pylint: disable=g-import-not-at-top
  return mesh.MeshParallel.of(config, devices)
