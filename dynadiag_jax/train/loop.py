"""`train_and_evaluate`: exploration, freeze and sparse fine-tuning, checkpointed and resumable."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

import dynadiag_jax as dd
from dynadiag_jax import data, methods
from dynadiag_jax.methods import records
from dynadiag_jax.train import build, checkpoint, distributed, guard, progress
from dynadiag_jax.train import state as state_lib
from dynadiag_jax.train.step import FAST_COMPILE, make_eval_step, make_train_step

CHECKPOINT_DIR = "checkpoints"


def local_devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
  """config.num_devices local devices (0: all of them)."""
  devs = jax.local_devices()
  n = config.num_devices or len(devs)
  if not 1 <= n <= len(devs):
    raise ValueError(f"config.num_devices = {config.num_devices}, but {len(devs)} local devices")
  if n != len(devs) and jax.process_count() > 1:
    raise ValueError("multi-host runs use all local devices; set config.num_devices = 0")
  return devs[:n]


def maybe_initialize_distributed(config: ml_collections.ConfigDict):
  """jax.distributed.initialize when config.distributed (before any other jax call)."""
  distributed.initialize(config)


class _Preemption:
  """Remembers a SIGTERM (single host, main thread only); restores the old handler on exit."""

  def __init__(self):
    self.flag, self._old = False, None

  def __enter__(self):
    if jax.process_count() == 1:  # multi-host: JAX's preemption service owns SIGTERM
      with contextlib.suppress(ValueError):  # not the main thread
        self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    """Whether to stop before `step`: SIGTERM here, or, multi-host, JAX's preemption sync point.

    Hosts must stop at the same step, so multi-host runs rely on the coordination
    service's preemption notice (all hosts agree on the step) instead of the local signal.
    """
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@functools.lru_cache(maxsize=8)
def _device_preprocess(source):
  """pmapped data.device.preprocess: uint8 -> normalized float32, mixup / cutmix, on the devices."""
  return jax.pmap(data.device.preprocess(source))


def evaluate(p_eval, rstate, source, spec: build.DataSpec, config, devices) -> dict[str, float]:
  """loss, accuracy (and perplexity for text) over the whole eval split."""
  n = len(devices) * jax.process_count()
  eb = int(math.ceil(config.eval_batch_size / n) * n)
  sums = None
  prep = _device_preprocess(source)
  with contextlib.closing(data.eval_batches(source, eb, num_devices=len(devices), raw=True,
                                            workers=data.num_workers(config.data, source),
                                            prefetch=config.data.prefetch)) as it:
    for batch in it:
      out = p_eval(rstate, prep(state_lib.shard(batch, devices)))
      sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  s = state_lib.unreplicate(sums)
  count = max(float(s["count"]), 1.0)
  out = {"loss": float(s["loss"]) / count, "accuracy": float(s["correct"]) / count}
  if spec.kind == "text":
    out["perplexity"] = float(math.exp(min(out["loss"], 700.0)))
  return out


def _check(config: ml_collections.ConfigDict):
  """Clear errors for config values that would fail later."""
  if config.batch_size < 1 or config.eval_batch_size < 1:
    raise ValueError(f"batch sizes must be >= 1, got {config.batch_size}, {config.eval_batch_size}")
  if config.sparse:
    dd.pattern.check_sparsity(config.sparsity)
  for k in ("log_every", "eval_every"):
    if config[k] < 0:
      raise ValueError(f"config.{k} must be >= 0, got {config[k]}")


@dataclasses.dataclass
class Run:
  """The fixed pieces of one run, built from its config."""
  config: ml_collections.ConfigDict
  devices: list[jax.Device]
  source: Any
  spec: build.DataSpec
  model: nn.Module
  sparsity: dict[str, float]  # {role: sparsity} of the DiagDense layers
  steps: int
  sched: dd.Schedule | None  # None for an all-dense model
  tx: optax.GradientTransformation
  lr: optax.Schedule
  options: dict | None  # compiler options

  @classmethod
  def build(cls, config: ml_collections.ConfigDict) -> "Run":
    source = data.build(config.data)
    spec = build.DataSpec.of(source)
    model, sparsity = build.build_model(config, spec)
    steps = build.total_steps(config, spec)
    spe = build.steps_per_epoch(config, spec)
    diag = sparsity and methods.diag_dense(config)
    sched = build.build_schedule(config, steps) if diag else None
    tx = build.build_optimizer(config, steps, sched, spe)
    tx = methods.wrap_optimizer(config, tx, model, spec.dummy_input(), sparsity, steps)
    return cls(config, local_devices(config), source, spec, model, sparsity, steps, sched, tx,
               build.learning_rate(config, steps, spe), _compile_options(config))

  @property
  def k_start_fraction(self) -> float:
    return self.sched.k_start_fraction if self.sched is not None else 1.0

  def fresh(self) -> state_lib.TrainState:
    """The initial state, un-replicated."""
    return state_lib.prepare(self.config, self.fresh_unprepared())

  def fresh_unprepared(self) -> state_lib.TrainState:
    """The initial state before the method's preparation (static_diag's freeze)."""
    x = self.spec.dummy_input()
    return state_lib.create(self.model, self.tx, x, self.config.seed, self.options)

  def like(self, meta: dict) -> state_lib.TrainState:
    """A fresh state in the phase a checkpoint's metadata names (its restore target)."""
    return state_lib.at_phase(self.fresh(), meta["level"], meta["frozen"])


def _train_record(run: Run, pending: list[dict], step: int, active: int, frozen: bool,
                  rate: float) -> dict:
  """Means over the steps since the last record, with lr, T, active diagonals, steps/s."""
  m = jax.tree.map(lambda *xs: float(np.mean(xs)), *_host_metrics(pending))
  rec = {"loss": m["loss"], "accuracy": m["accuracy"], "grad_norm": m["grad_norm"],
         "lr": float(run.lr(step)), "active": active, "steps_per_s": rate}
  if run.sched is not None and not frozen:
    rec["temperature"] = m["temperature"]
  return rec


def _host_metrics(pending: list[dict]) -> list[dict]:
  """Per-step metrics as numpy float32 scalars (device ones fetched, saved ones as they are)."""
  dev = [i for i, m in enumerate(pending) if isinstance(next(iter(m.values())), jax.Array)]
  got = dict(zip(dev, state_lib.unreplicate([pending[i] for i in dev]))) if dev else {}
  return [got.get(i, m) for i, m in enumerate(pending)]


def _pending_json(pending: list[dict]) -> list[dict]:
  """The metrics of steps not yet logged, for a checkpoint (exact floats)."""
  return [{k: float(v) for k, v in m.items()} for m in _host_metrics(pending)]


def _pending_restored(meta: dict) -> list[dict]:
  """The unlogged metrics a checkpoint carries, as float32 scalars (bitwise as logged)."""
  return [{k: np.float32(v) for k, v in m.items()} for m in meta.get("pending", [])]


def _start(config: ml_collections.ConfigDict) -> "Run":
  """The run's pieces; config values that cannot run raise ConfigError (nothing is written)."""
  try:
    _check(config)
    return Run.build(config)
  except (guard.ConfigError, data.DataNotFoundError):
    raise
  except ValueError as e:
    raise guard.ConfigError(" ".join(str(e).split())) from e


def _diverged(e: guard.DivergenceError, ck: checkpoint.Checkpointer) -> guard.DivergenceError:
  """The one-line error of a diverged run, naming the last good checkpoint and what to try."""
  good = ck.latest_step()
  kept = (f"the last good checkpoint is step {good} in {ck.directory}" if good is not None else
          "no checkpoint was saved")
  return guard.DivergenceError(f"{e}; stopped, {kept}. Try a lower optimizer.lr or "
                               "optimizer.grad_clip > 0, in a new --workdir.", e.step)


def _summary(run: Run, host: state_lib.TrainState, ev: dict, wall_s: float, start: int | None,
             compiles: int) -> dict:
  """What summary.json holds."""
  text = run.spec.kind == "text"
  tot = dd.totals(run.model, host.variables, run.spec.dummy_input())
  return {
      ("perplexity" if text else "test_accuracy"): ev["perplexity" if text else "accuracy"],
      "test_loss": ev["loss"], **({"token_accuracy": ev["accuracy"]} if text else {}),
      "sparsity": tot["sparsity"], "stored_params": tot["stored_params"],
      "dense_params": tot["dense_params"], "steps": run.steps, "wall_s": wall_s,
      "resumed_from": start, "train_step_compiles": compiles, "layer_sparsity": run.sparsity,
      "model": run.config.model.name, "data": run.source.name, "method": methods.name(run.config),
      "code": progress.code_version(), **_mask_totals(run, host),
  }


def _mask_totals(run: Run, host: state_lib.TrainState) -> dict:
  """sparsity and stored_params of a mask method from its masks (dense kernels otherwise)."""
  kept = methods.stored_weights(run.config, run.model, run.spec.dummy_input(), run.sparsity,
                                host.opt_state)
  if kept is None:
    return {}
  dense = kept.pop("dense")
  tot = dd.totals(run.model, host.variables, run.spec.dummy_input())
  n = sum(kept.values())
  return {"sparsity": 1.0 - n / dense, "stored_params": tot["stored_params"] - dense + n,
          "layer_kept": kept}


def _compile_options(config: ml_collections.ConfigDict) -> dict | None:
  """FAST_COMPILE for config.fast_compile, single-process runs only (jax's ahead-of-time pmap
  expects every process's devices; multi-host runs compile with XLA's defaults, said once)."""
  if not config.get("fast_compile"):
    return None
  if jax.process_count() > 1:
    logging.getLogger(__name__).warning(
        "fast_compile=True is ignored in a multi-process run: jax's ahead-of-time pmap "
        "compiles for the global devices; XLA's default passes are used.")
    return None
  return FAST_COMPILE


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Trains config's model on config's data, checkpointing into workdir; returns the summary.

  Resumes from the newest checkpoint in <workdir>/checkpoints. Writes metrics.jsonl,
  TensorBoard events and, at the end, summary.json. Returns None when stopped by SIGTERM
  (after saving a checkpoint to resume from). wall_s counts every run of the same workdir.
  Raises guard.ConfigError (before creating anything) for config values that cannot run,
  guard.WorkdirError, CheckpointError (also for a checkpoint of another config) and
  guard.DivergenceError at the first non-finite loss (the last good checkpoint is kept).
  """
  t0 = time.perf_counter()
  maybe_initialize_distributed(config)
  try:
    return _train(config, workdir, t0)
  except BaseException:
    distributed.settle()  # multi-host: a dead peer is reported as such (exit 75), not aborted
    raise


def _train(config: ml_collections.ConfigDict, workdir: str, t0: float) -> dict | None:
  """train_and_evaluate after jax.distributed is up."""
  run = _start(config)
  workdir = guard.make_workdir(workdir)
  distributed.check_shared_workdir(workdir)  # multi-host: one filesystem, or a clear error
  devices, lead = run.devices, jax.process_index() == 0

  ck = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), config.checkpoint.every,
                               config.checkpoint.keep, config.checkpoint.async_save)
  latest, wall0, carried = distributed.agree(ck.latest_step()), 0.0, []  # process 0 decides
  if latest is None:
    host = run.fresh()
  else:
    with guard.stderr_dropped_on_error():
      try:
        host, meta = ck.restore(latest, run.like, config)
      except BaseException:
        ck.close()  # orbax's async threads end before the error surfaces
        raise
    wall0, carried = float(meta.get("wall_s", 0.0)), _pending_restored(meta)
  wall = lambda: wall0 + time.perf_counter() - t0
  start = int(host.step)
  rep = progress.Reporter(workdir, run.steps, start, active=lead, bar=config.progress_bar)
  if latest is not None:
    rep.event(start, "restore", level=host.level, frozen=host.frozen)
    rep.message(f"Resumed from {ck.directory} at step {start} "
                f"({'frozen' if host.frozen else f'K_active level {host.level}'}).")
  else:
    rep.message(f"{type(run.model).__name__} on {run.source.name}: {run.steps} steps, batch "
                f"{config.batch_size} over {len(devices)} device(s) x {jax.process_count()} "
                f"host(s), "
                + (f"freeze at step {run.sched.freeze_step}" if run.sched else "dense"))

  p_train = make_train_step(run.model, run.tx, run.sched, run.spec, config.label_smoothing,
                            run.options)
  p_eval = make_eval_step(run.model, run.spec, run.options, run.sched)
  watch = guard.FiniteWatch()

  def save(h: state_lib.TrainState, force: bool = False):
    watch.check()  # never save past a non-finite loss
    if not guard.finite_state(h.params):
      raise guard.DivergenceError(
          f"training diverged: non-finite parameters at step {int(h.step)}", int(h.step))
    ck.save(h, {"wall_s": wall(), "config": checkpoint.config_json(config),
                "pending": _pending_json(pending)}, force)

  def place(h: state_lib.TrainState) -> tuple[state_lib.TrainState, int]:
    """(replicated state, diagonals it computes per step)."""
    return state_lib.replicate(h, devices), state_lib.active_diagonals(h, run.k_start_fraction)

  rstate, active = place(host)
  pending: list[dict] = carried  # per-step metrics since the last train record
  batches = data.batches(run.source, config.batch_size, seed=config.seed, start_step=start,
                         num_devices=len(devices), raw=True, prefetch=config.data.prefetch,
                         workers=data.num_workers(config.data, run.source),
                         num_steps=run.steps - start)
  prep = _device_preprocess(run.source)
  try:
    with _Preemption() as stop, contextlib.closing(batches):
      for step in range(start, run.steps):
        if stop.reached(step):
          save(state_lib.unreplicate(rstate), force=True)
          ck.wait()
          rep.event(step, "preempted")
          rep.message(f"SIGTERM: saved step {step} to {ck.directory}; rerun to resume.")
          rep.close()
          distributed.finish()
          return None
        if state_lib.due(rstate, run.sched, step):
          host = state_lib.advance(state_lib.unreplicate(rstate), run.sched, step)
          if host.frozen:
            rep.event(step, "freeze")
          rstate, active = place(host)
        rstate, metrics = p_train(rstate, prep(state_lib.shard(next(batches), devices)))
        done = step + 1
        rep.tick()
        watch.add(done, metrics)
        if config.log_every:
          pending.append(metrics)
          if done % config.log_every == 0 or done == run.steps:
            watch.check()
            rec = _train_record(run, pending, step, active, rstate.frozen, rep.steps_per_s(done))
            rep.write(done, "train", rec, postfix=True)
            pending = []
            if lead and rstate.sparse and not rstate.frozen:
              records.trace(workdir, done, rstate, float(run.sched.temperature(step)))
        if config.eval_every and done % config.eval_every == 0 and done < run.steps:
          watch.check()
          ev = evaluate(p_eval, rstate, run.source, run.spec, config, devices)
          guard.check_eval(ev, done)
          rep.write(done, "eval", ev)
        if done < run.steps and ck.should_save(done):
          save(state_lib.unreplicate(rstate))
    host = state_lib.unreplicate(rstate)
    save(host, force=True)
    ck.wait()
  except guard.DivergenceError as e:
    ck.wait()
    rep.event(e.step or 0, "diverged", error=str(e))
    rep.close()
    raise _diverged(e, ck) from None
  except BaseException:
    rep.close()
    raise
  finally:
    ck.close()

  if run.sched is not None and not host.frozen:  # freeze_fraction = 1: freeze at the end
    host = state_lib.freeze(host, float(run.sched.temperature(run.steps)))
  ev = evaluate(p_eval, state_lib.replicate(host, devices), run.source, run.spec, config, devices)
  try:
    guard.check_eval(ev, run.steps)
  except guard.DivergenceError as e:
    rep.close()
    raise guard.DivergenceError(f"{e}; its checkpoint is kept in {ck.directory}") from None
  if not rep.has(run.steps, "eval"):  # a rerun of a finished run evaluates, records once
    rep.write(run.steps, "eval", ev)
  summary = _summary(run, host, ev, wall(), start if latest is not None else None,
                     p_train.num_compiled)
  rep.close()
  if lead:
    records.write(workdir, run.model, host.variables, run.source, run.spec.kind,
                  run.spec.dummy_input())
    path = progress.write_summary(workdir, summary)
    x0 = run.spec.dummy_input()
    print(dd.summarize(run.model, host.variables, x0))
    key = "perplexity" if run.spec.kind == "text" else "test_accuracy"
    print(f"{key} {summary[key]:.4f}  sparsity {summary['sparsity']:.4f}  stored "
          f"{summary['stored_params']:,} / dense {summary['dense_params']:,} params  "
          f"{run.steps} steps  {summary['wall_s']:.1f} s  -> {path}", flush=True)
  run.source.close()
  distributed.finish()
  return summary
