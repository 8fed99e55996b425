"""The train and eval steps, pmapped (or jitted over a mesh, train/mesh.py): loss, gradients
averaged over devices, metrics."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dynadiag_jax as dd
from dynadiag_jax.train.build import DataSpec, input_key
from dynadiag_jax.train.state import AXIS, TrainState, model_at, unreplicate


# XLA's cheap CPU backend passes: about half the compile time, somewhat slower steps.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Compiled:
  """A jitted / pmapped fn that counts its compilations (one per input structure and shapes).

  With compiler `options` it compiles ahead of time with them and keeps the executables;
  without, it calls `fn` (jax's own cache and fast dispatch).
  """

  def __init__(self, fn: Callable, options: dict[str, Any] | None = None):
    self.fn, self.options = fn, dict(options or {})
    self._cache: dict[Any, Callable | None] = {}

  @property
  def num_compiled(self) -> int:
    """Distinct input signatures seen, i.e. compilations."""
    return len(self._cache)

  def __call__(self, *args):
    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves))
    if key not in self._cache:
      self._cache[key] = self.fn.lower(*args).compile(self.options) if self.options else None
    exe = self._cache[key]
    return self.fn(*args) if exe is None else exe(*args)


def pmapped(fn: Callable, donate: tuple[int, ...] = ()) -> Callable:
  """fn pmapped over AXIS (the pmap mode's transform of a step)."""
  return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate)


class PatternStep:
  """A pmapped (or `wrap`ped) step(state, batch) that, once frozen, closes over its pattern.

  After the freeze the `dynadiag` collection (the offsets) never changes, so the step
  takes it as a constant: `diag_matmul` then sees concrete offsets and the pallas
  backend builds its exact host BCSR layout at trace time (DESIGN.md section 3).
  `wrap(fn, donate)` compiles a step (pmap, or jit over a mesh); `host(tree)` fetches the
  state's offsets as numpy (the first copy of pmap's replicated leaves).
  """

  def __init__(self, fn: Callable, options: dict[str, Any] | None = None,
               donate: tuple[int, ...] = (), wrap: Callable = pmapped,
               host: Callable = unreplicate):
    self.fn, self.options, self.donate, self.wrap, self.host = fn, options, donate, wrap, host
    self.dynamic = Compiled(wrap(fn, donate), options)
    self.frozen: Compiled | None = None

  @property
  def num_compiled(self) -> int:
    return self.dynamic.num_compiled + (self.frozen.num_compiled if self.frozen else 0)

  def __call__(self, state: TrainState, batch: dict):
    if not (state.frozen and state.sparse):
      return self.dynamic(state, batch)
    if self.frozen is None:  # un-replicate the (constant) offsets once
      const = self.host(state.extra)
      fixed = lambda st, b: self.fn(st.replace(extra=const), b)
      self.frozen = Compiled(self.wrap(fixed, self.donate), self.options)
    return self.frozen(state, batch)


def losses(logits: jax.Array, target: jax.Array,
           label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(per-example loss, per-example correct) for int labels (..,) or soft labels (.., C)."""
  c = logits.shape[-1]
  soft = target.ndim == logits.ndim
  labels = target.argmax(-1) if soft else target
  if soft or label_smoothing:
    p = target if soft else jax.nn.one_hot(target, c, dtype=logits.dtype)
    if label_smoothing:
      p = optax.smooth_labels(p, label_smoothing)
    loss = optax.softmax_cross_entropy(logits, p)
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, target)
  return loss, (logits.argmax(-1) == labels).astype(jnp.float32)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, sched: dd.Schedule | None,
                    spec: DataSpec, label_smoothing: float = 0.0,
                    options: dict[str, Any] | None = None) -> Callable:
  """pmapped (state, batch) -> (state, metrics); grads and metrics are pmean'd over AXIS.

  `train_body` is the step itself (the mesh mode jits it over the whole batch instead).
  """
  return PatternStep(train_body(model, tx, sched, spec, label_smoothing, AXIS), options,
                     donate=(0,))


def train_body(model: nn.Module, tx: optax.GradientTransformation, sched: dd.Schedule | None,
               spec: DataSpec, label_smoothing: float = 0.0, axis: str | None = AXIS,
               context: Callable = contextlib.nullcontext,
               constrain: Callable = lambda s: s) -> Callable:
  """step(state, batch) -> (state, metrics) on one device's batch (`axis`: pmean over it) or on
  the whole batch (axis None: the mesh mode, where XLA sums over the devices).

  The model runs in the state's phase (`state.model_at`): its K_active level, static, and
  the temperature sched.temperature(s) of step s, computed inside the step. The step
  recompiles when the state's structure changes (each K_active level, the freeze); frozen
  patterns are closed over as constants (see `PatternStep`). The dropout key of step s is
  fold_in(rng, s), also folded with the device index under pmap. The gradients are taken
  inside `context()` (the mesh mode's `dd.sharding.use_mesh`); `constrain` pins the new
  state's shardings (the mesh mode's rule).
  """
  kx, ky = input_key(spec)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    if axis is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
    t = jnp.asarray(1.0, jnp.float32)
    if state.sparse and not state.frozen and sched is not None:
      t = sched.temperature(state.step)
    net = model_at(model, state, sched, t)

    def loss_fn(params):
      logits = net.apply({"params": params, **state.extra}, batch[kx], train=True,
                         rngs={"dropout": rng})
      loss, correct = losses(logits, batch[ky], label_smoothing)
      return loss.mean(), correct.mean()

    with context():
      (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    mean = (lambda x: jax.lax.pmean(x, axis)) if axis is not None else (lambda x: x)
    grads = mean(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = mean({"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)})
    metrics["temperature"] = t
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return constrain(new), metrics

  return step


def make_eval_step(model: nn.Module, spec: DataSpec, options: dict[str, Any] | None = None,
                   sched: dd.Schedule | None = None) -> Callable:
  """pmapped (state, batch) -> sums {loss, correct, count} over the masked batch, psum'd."""
  return PatternStep(eval_body(model, spec, sched, AXIS), options)


def eval_body(model: nn.Module, spec: DataSpec, sched: dd.Schedule | None = None,
              axis: str | None = AXIS, context: Callable = contextlib.nullcontext) -> Callable:
  """step(state, batch) -> sums {loss, correct, count} over the masked batch (psum'd over `axis`).

  While exploring, the model runs in the state's phase at the temperature of its last
  train step, sched.temperature(step - 1).
  """
  kx, ky = input_key(spec)

  def step(state: TrainState, batch: dict) -> dict:
    net = model if sched is None else model_at(
        model, state, sched, sched.temperature(jnp.maximum(state.step - 1, 0)))
    with context():
      logits = net.apply(state.variables, batch[kx], train=False)
    loss, correct = losses(logits, batch[ky])
    w = batch["mask"].reshape(batch["mask"].shape + (1,) * (loss.ndim - 1))
    w = jnp.broadcast_to(w, loss.shape)
    sums = {"loss": (loss * w).sum(), "correct": (correct * w).sum(), "count": w.sum()}
    return jax.lax.psum(sums, axis) if axis is not None else sums

  return step
