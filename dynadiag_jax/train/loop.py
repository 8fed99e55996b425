"""`train_and_evaluate`: exploration, freeze and sparse fine-tuning, checkpointed and resumable."""

from __future__ import annotations

import contextlib
import dataclasses
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
from dynadiag_jax.train import build, checkpoint, distributed, guard, lock, parallel, progress
from dynadiag_jax.train import signals
from dynadiag_jax.train import state as state_lib
from dynadiag_jax.train.step import FAST_COMPILE

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


class _StopSignals:
  """Where the loop learns of SIGINT / SIGTERM (signals.py); restores the old handlers on exit.

  train.py installs the flag-only handlers at its first line. A run started from Python
  (tests, notebooks) gets one for SIGTERM here, for the loop's duration; its Ctrl-C stays
  Python's KeyboardInterrupt. Multi-host, JAX's preemption service owns SIGTERM.
  """

  def __init__(self):
    self._old = None

  def __enter__(self):
    if jax.process_count() == 1 and not signals.installed():
      signals.forget()  # a signal noted by an earlier run in this process
      with contextlib.suppress(ValueError):  # not the main thread
        self._old = signal.signal(signal.SIGTERM, signals._note)  # pylint: disable=protected-access
    return self

  def reached(self, step: int) -> int | None:
    """The signal to stop for before `step`, or None.

    Hosts must stop at the same step, so multi-host runs take SIGTERM from the coordination
    service's preemption notice (all hosts agree on the step) instead of the local signal.
    """
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        return signal.SIGTERM
    return signals.requested()

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _EvalStopped(Exception):
  """A stop signal came during an evaluation (it is abandoned: it changes no state)."""


def evaluate(p_eval, rstate, source, spec: build.DataSpec, config, par,
             interruptible: bool = False) -> dict[str, float]:
  """loss, accuracy (and perplexity for text) over the whole eval split (`par`: the run's
  parallel.Pmap or mesh.MeshParallel).

  interruptible: a stop signal (signals.py) abandons it between batches (_EvalStopped).
  """
  n = par.size
  eb = int(math.ceil(config.eval_batch_size / n) * n)
  sums = None
  with contextlib.closing(data.eval_batches(source, eb, num_devices=len(par.devices), raw=True,
                                            shard=par.shard_batches,
                                            workers=data.num_workers(config.data, source),
                                            prefetch=config.data.prefetch)) as it:
    for batch in it:
      if interruptible and signals.requested() is not None and jax.process_count() == 1:
        raise _EvalStopped()
      out = p_eval(rstate, par.batch(source, batch))
      sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  s = par.scalars(sums)
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
  for k in ("every", "keep"):
    if config.checkpoint[k] < 1:
      raise ValueError(f"config.checkpoint.{k} must be >= 1, got {config.checkpoint[k]}")


@dataclasses.dataclass
class Run:
  """The fixed pieces of one run, built from its config."""
  config: ml_collections.ConfigDict
  par: Any  # parallel.Pmap | mesh.MeshParallel: how the run spreads over its devices
  source: Any
  spec: build.DataSpec
  model: nn.Module
  sparsity: dict[str, float]  # {role: sparsity} of the DiagDense layers
  steps: int
  sched: dd.Schedule | None  # None for an all-dense model
  tx: optax.GradientTransformation
  lr: optax.Schedule
  options: dict | None  # compiler options
  _fresh: state_lib.TrainState | None = dataclasses.field(default=None, repr=False)

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
    return cls(config, parallel.build(config, local_devices(config)), source, spec, model,
               sparsity, steps, sched, tx, build.learning_rate(config, steps, spe),
               _compile_options(config))

  @property
  def k_start_fraction(self) -> float:
    return self.sched.k_start_fraction if self.sched is not None else 1.0

  def fresh(self) -> state_lib.TrainState:
    """The initial state, un-replicated (built once: it also validates the model's fields)."""
    if self._fresh is None:
      self._fresh = state_lib.prepare(self.config, self.fresh_unprepared())
    return self._fresh

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
  m = jax.tree.map(lambda *xs: float(np.mean(xs)), *_host_metrics(run.par, pending))
  rec = {"loss": m["loss"], "accuracy": m["accuracy"], "grad_norm": m["grad_norm"],
         "lr": float(run.lr(step)), "active": active, "steps_per_s": rate}
  if run.sched is not None and not frozen:
    rec["temperature"] = m["temperature"]
  return rec


def _host_metrics(par, pending: list[dict]) -> list[dict]:
  """Per-step metrics as numpy float32 scalars (device ones fetched, saved ones as they are)."""
  dev = [i for i, m in enumerate(pending) if isinstance(next(iter(m.values())), jax.Array)]
  got = dict(zip(dev, par.scalars([pending[i] for i in dev]))) if dev else {}
  return [got.get(i, m) for i, m in enumerate(pending)]


def _pending_json(par, pending: list[dict]) -> list[dict]:
  """The metrics of steps not yet logged, for a checkpoint (exact floats)."""
  return [{k: float(v) for k, v in m.items()} for m in _host_metrics(par, pending)]


def _pending_restored(meta: dict) -> list[dict]:
  """The unlogged metrics a checkpoint carries, as float32 scalars (bitwise as logged)."""
  return [{k: np.float32(v) for k, v in m.items()} for m in meta.get("pending", [])]


def _start(config: ml_collections.ConfigDict) -> "Run":
  """The run's pieces and its initial state; config values that cannot run (any field the
  model, optimizer, method or data reads) raise ConfigError before anything is written."""
  try:
    _check(config)
    run = Run.build(config)
    data.check_splits(run.source)  # a missing or unreadable split stops now, not at the end
    run.fresh()
    return run
  except (guard.ConfigError, data.DataNotFoundError):
    raise
  except (ValueError, TypeError) as e:
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
  """What summary.json holds (a mask method's sparsity and stored weights from its masks)."""
  text = run.spec.kind == "text"
  kept = _masks_kept(run, host)
  tot = dd.totals(run.model, host.variables, run.spec.dummy_input(), masks_kept=kept)
  return {
      ("perplexity" if text else "test_accuracy"): ev["perplexity" if text else "accuracy"],
      "test_loss": ev["loss"], **({"token_accuracy": ev["accuracy"]} if text else {}),
      "sparsity": tot["sparsity"], "stored_params": tot["stored_params"],
      "dense_params": tot["dense_params"], "steps": run.steps, "wall_s": wall_s,
      "resumed_from": start, "train_step_compiles": compiles, "layer_sparsity": run.sparsity,
      "model": run.config.model.name, "data": run.source.name, "method": methods.name(run.config),
      "code": progress.code_version(), **({"layer_kept": kept} if kept is not None else {}),
  }


def _masks_kept(run: Run, host: state_lib.TrainState) -> dict[str, int] | None:
  """{'<layer>/kernel': weights its mask keeps} of a mask method, else None."""
  kept = methods.stored_weights(run.config, run.model, run.spec.dummy_input(), run.sparsity,
                                host.opt_state)
  if kept is not None:
    kept.pop("dense")
  return kept


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config's model on config's data, checkpointing into workdir; returns the summary.

  Resumes from the newest checkpoint in <workdir>/checkpoints. Writes metrics.jsonl,
  TensorBoard events and, at the end, summary.json. wall_s counts every run of the same
  workdir. Raises guard.ConfigError (before creating anything) for config values that cannot
  run, guard.WorkdirError (lock.WorkdirBusyError: another live run holds the workdir),
  CheckpointError (a checkpoint of another config, past total_steps, damaged, or a failed
  save), guard.DivergenceError at the first non-finite loss (the last good checkpoint is kept)
  and guard.Stopped after SIGINT / SIGTERM (the current step saved first).
  """
  t0 = time.perf_counter()
  maybe_initialize_distributed(config)
  try:
    return _train(config, workdir, t0)
  except BaseException:
    distributed.settle()  # multi-host: a dead peer is reported as such (exit 75), not aborted
    raise


def _train(config: ml_collections.ConfigDict, workdir: str, t0: float) -> dict:
  """train_and_evaluate after jax.distributed is up: start, resume, loop, finish."""
  run = _start(config)
  if signals.installed() and (signum := signals.requested()) is not None:  # nothing created yet
    raise guard.Stopped(f"{signals.name(signum)} before the first step: nothing trained, "
                        "nothing saved", signum)
  workdir = guard.make_workdir(workdir)
  with lock.WorkdirLock(workdir, jax.process_index()):
    distributed.check_shared_workdir(workdir)  # multi-host: one filesystem, or a clear error
    ck = _checkpointer(workdir, config)
    try:
      loop = Loop.resume(run, workdir, ck, t0)
      with loop.reporting(), _StopSignals() as stop, contextlib.closing(loop.batches):
        for step in range(loop.start, run.steps):
          if (signum := stop.reached(step)) is not None:
            loop.stop(step, signum)
          loop.maybe_advance_phase(step)
          loop.train_step(step)
          loop.log(step + 1)
          loop.evaluate(step + 1)
          loop.checkpoint(step + 1)
        loop.final_checkpoint()
    finally:
      ck.close()
    return loop.finish()


def _checkpointer(workdir: str, config: ml_collections.ConfigDict) -> checkpoint.Checkpointer:
  """The workdir's Checkpointer; CheckpointError when its checkpoints directory is damaged."""
  return checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), config.checkpoint.every,
                                 config.checkpoint.keep, config.checkpoint.async_save)


def _resume_point(run: Run, workdir: str, ck: checkpoint.Checkpointer) -> int | None:
  """The step to resume from (process 0 decides), or None to start; refuses what cannot be resumed.

  A checkpoint past total_steps is refused (ConfigError: it holds another, longer run), and so
  is a fresh start in a workdir whose metrics.jsonl already holds records: its checkpoints are
  gone or damaged, and starting over would overwrite that history (CheckpointError).
  """
  latest = distributed.agree(ck.latest_step())
  if latest is not None and latest > run.steps:
    raise guard.ConfigError(
        f"the checkpoint at step {latest} in {ck.directory} is past this run's {run.steps} "
        f"steps: it holds a longer run. Rerun with --config.total_steps={latest} (or more) to "
        "resume or report it, or use a new --workdir")
  if latest is None:
    old = [r.get("step", 0) for r in progress.read_metrics(workdir)]
    if old or os.path.exists(os.path.join(workdir, progress.SUMMARY_FILE)):
      upto = f" up to step {max(old)}" if old else ""
      raise checkpoint.CheckpointError(
          f"{workdir} holds the records of an earlier run{upto} ({progress.METRICS_FILE}) but no "
          f"checkpoint to resume from in {ck.directory}: it will not be restarted from step 0 over "
          f"them. Put its checkpoints back to resume, use a new --workdir, or remove "
          f"{progress.METRICS_FILE} and {progress.SUMMARY_FILE} there to start afresh.")
  return latest


@dataclasses.dataclass
class Loop:
  """One pass of the training loop over [start, run.steps): the replicated state, the metrics
  not yet logged, and where they go. Each periodic task is one method, called in order by
  `_train` for every step: maybe_advance_phase, train_step, log, evaluate, checkpoint."""
  run: Run
  workdir: str
  ck: checkpoint.Checkpointer
  rep: progress.Reporter
  start: int
  resumed: bool  # from a checkpoint (else a fresh start)
  wall0: float  # wall seconds of the runs before this one
  t0: float
  rstate: Any = None  # replicated TrainState
  active: int = 0  # diagonals computed per step
  pending: list = dataclasses.field(default_factory=list)  # per-step metrics since the last record
  watch: guard.FiniteWatch = dataclasses.field(default_factory=guard.FiniteWatch)
  p_train: Any = None
  p_eval: Any = None
  batches: Any = None
  host: Any = None  # the final un-replicated state, once trained

  @classmethod
  def resume(cls, run: Run, workdir: str, ck: checkpoint.Checkpointer, t0: float) -> "Loop":
    """Restores the newest checkpoint (or starts fresh), opens the reports, compiles lazily."""
    config, lead = run.config, jax.process_index() == 0
    latest, wall0, carried = _resume_point(run, workdir, ck), 0.0, []
    if latest is None:
      host = run.fresh()
    else:
      with guard.stderr_dropped_on_error():
        host, meta = ck.restore(latest, run.like, config)
      wall0, carried = float(meta.get("wall_s", 0.0)), _pending_restored(meta)
    start = int(host.step)
    rep = progress.Reporter(workdir, run.steps, start, active=lead, bar=config.progress_bar)
    loop = cls(run, workdir, ck, rep, start, latest is not None, wall0, t0, pending=carried)
    loop.greet(host)
    loop.place(host)
    loop.p_train = run.par.train_step(run.model, run.tx, run.sched, run.spec,
                                      config.label_smoothing, run.options)
    loop.p_eval = run.par.eval_step(run.model, run.spec, run.options, run.sched)
    loop.batches = data.batches(run.source, config.batch_size, seed=config.seed,
                                start_step=start, num_devices=len(run.par.devices), raw=True,
                                shard=run.par.shard_batches,
                                prefetch=config.data.prefetch,
                                workers=data.num_workers(config.data, run.source),
                                num_steps=run.steps - start)
    return loop

  @property
  def lead(self) -> bool:
    return jax.process_index() == 0

  def wall(self) -> float:
    """Wall seconds of every run of this workdir so far."""
    return self.wall0 + time.perf_counter() - self.t0

  def greet(self, host: state_lib.TrainState):
    """The run's first line: where it resumed, or what it trains."""
    run, config = self.run, self.run.config
    if self.resumed:
      self.rep.event(self.start, "restore", level=host.level, frozen=host.frozen)
      self.rep.message(f"Resumed from {self.ck.directory} at step {self.start} "
                       f"({'frozen' if host.frozen else f'K_active level {host.level}'}).")
    else:
      self.rep.message(
          f"{type(run.model).__name__} on {run.source.name}: {run.steps} steps, batch "
          f"{config.batch_size} over {run.par.describe()}, " + (f"freeze at step {run.sched.freeze_step}" if run.sched else "dense"))

  def place(self, host: state_lib.TrainState):
    """Puts a host state on the devices (pmap: replicated; mesh: sharded); its diagonals per step."""
    self.rstate = self.run.par.put(host)
    self.active = state_lib.active_diagonals(host, self.run.k_start_fraction)

  def maybe_advance_phase(self, step: int):
    """A K_active level change or the freeze, when one is due before `step`."""
    if state_lib.due(self.rstate, self.run.sched, step):
      host = state_lib.advance(self.run.par.host(self.rstate), self.run.sched, step)
      if host.frozen:
        self.rep.event(step, "freeze")
      self.place(host)

  def train_step(self, step: int):
    """One optimizer step on the batch of `step`; its metrics are watched and kept for `log`."""
    batch = self.run.par.batch(self.run.source, next(self.batches))
    self.rstate, metrics = self.p_train(self.rstate, batch)
    self.rep.tick()
    self.watch.add(step + 1, metrics)
    if self.run.config.log_every:
      self.pending.append(metrics)

  def log(self, done: int):
    """A train record every log_every steps (and at the end), plus the alpha trace."""
    run, every = self.run, self.run.config.log_every
    if not every or (done % every and done != run.steps):
      return
    self.watch.check()
    rec = _train_record(run, self.pending, done - 1, self.active, self.rstate.frozen,
                        self.rep.steps_per_s(done))
    self.rep.write(done, "train", rec, postfix=True)
    self.pending = []
    if self.lead and self.rstate.sparse and not self.rstate.frozen:
      records.trace(self.workdir, done, self.rstate, float(run.sched.temperature(done - 1)),
                    leaf=run.par.leaf)

  def evaluate(self, done: int):
    """An eval record every eval_every steps (the last step's comes from `finish`)."""
    config = self.run.config
    if not config.eval_every or done % config.eval_every or done >= self.run.steps:
      return
    self.watch.check()
    try:
      ev = evaluate(self.p_eval, self.rstate, self.run.source, self.run.spec, config,
                    self.run.par, interruptible=True)
    except _EvalStopped:
      return  # the loop stops at the next boundary, saving this step
    guard.check_eval(ev, done)
    self.rep.write(done, "eval", ev)

  def checkpoint(self, done: int):
    """A save at every multiple of checkpoint.every; a failed earlier save stops the run here."""
    if done < self.run.steps and self.ck.should_save(done):
      self.save(self.run.par.host(self.rstate))
    else:
      self.ck.check()

  def save(self, host: state_lib.TrainState, force: bool = False):
    """Starts saving `host` (never past a non-finite loss or with non-finite parameters)."""
    self.watch.check()
    if not guard.finite_state(host.params):
      raise guard.DivergenceError(
          f"training diverged: non-finite parameters at step {int(host.step)}", int(host.step))
    self.ck.save(host, {"wall_s": self.wall(), "config": checkpoint.config_json(self.run.config),
                        "pending": _pending_json(self.run.par, self.pending)}, force)

  def stop(self, step: int, signum: int):
    """Saves `step` if this run trained it, ends the reports and raises guard.Stopped."""
    what = signals.name(signum)
    if jax.process_count() > 1 and signum != signal.SIGTERM:  # a save needs every host
      kept = self.ck.latest_step()
      msg = (f"{what} at step {step}: a multi-host run saves only on SIGTERM (every host); the "
             f"newest checkpoint is " + (f"step {kept}" if kept is not None else "none"))
    elif step > self.start:
      self._end_saved(self.run.par.host(self.rstate))
      self.rep.event(step, "preempted" if signum == signal.SIGTERM else "interrupted")
      msg = f"{what}: saved step {step} to {self.ck.directory}; rerun the same command to resume"
    elif self.resumed:
      msg = (f"{what} before training further: step {step} is already saved in "
             f"{self.ck.directory}; rerun the same command to resume")
    else:
      msg = f"{what} before the first step: nothing trained, nothing saved"
    self.rep.close()
    distributed.finish()
    raise guard.Stopped(msg, signum)

  def _end_saved(self, host: state_lib.TrainState):
    """Saves `host` and waits until it is on disk (later signals are only noted meanwhile)."""
    self.save(host, force=True)
    self.ck.wait()

  def final_checkpoint(self):
    """The last step's checkpoint, on disk before evaluation; a signal now stops after it."""
    self.host = self.run.par.host(self.rstate)
    self._end_saved(self.host)
    if signals.requested() is not None and jax.process_count() == 1:
      self._stopped_at_end(signals.requested())

  @contextlib.contextmanager
  def reporting(self):
    """Closes the reports on the way out of the loop; a divergence is recorded and reworded."""
    try:
      yield
    except guard.DivergenceError as e:
      self._diverged(e)
    except BaseException:
      self.rep.close()
      raise

  def _stopped_at_end(self, signum: int):
    self.rep.event(self.run.steps, "preempted" if signum == signal.SIGTERM else "interrupted")
    self.rep.close()
    distributed.finish()
    raise guard.Stopped(
        f"{signals.name(signum)} after the last step: step {self.run.steps} is saved in "
        f"{self.ck.directory}, summary.json is not written; rerun the same command to finish",
        signum)

  def _diverged(self, e: guard.DivergenceError):
    """Records the divergence and raises its one-line error naming the last good checkpoint."""
    try:
      self.ck.wait()
    except checkpoint.CheckpointError:
      pass
    self.rep.event(e.step or 0, "diverged", error=str(e))
    self.rep.close()
    raise _diverged(e, self.ck) from None

  def finish(self) -> dict:
    """The final evaluation, summary.json, the per-layer table and the summary line."""
    run, host = self.run, self.host
    if run.sched is not None and not host.frozen:  # freeze_fraction = 1: freeze at the end
      host = state_lib.freeze(host, float(run.sched.temperature(run.steps)))
    try:
      ev = evaluate(self.p_eval, run.par.put(host), run.source, run.spec, run.config, run.par,
                    interruptible=True)
      guard.check_eval(ev, run.steps)
    except _EvalStopped:
      self._stopped_at_end(signals.requested())
    except guard.DivergenceError as e:
      self.rep.close()
      raise guard.DivergenceError(f"{e}; its checkpoint is kept in {self.ck.directory}") from None
    if not self.rep.has(run.steps, "eval"):  # a rerun of a finished run evaluates, records once
      self.rep.write(run.steps, "eval", ev)
    if signals.requested() is not None and jax.process_count() == 1:
      self._stopped_at_end(signals.requested())
    summary = _summary(run, host, ev, self.wall(), self.start if self.resumed else None,
                       self.p_train.num_compiled)
    self.rep.close()
    if self.lead:
      _report(run, host, self.workdir, summary)
    run.source.close()
    distributed.finish()
    return summary


def _report(run: Run, host: state_lib.TrainState, workdir: str, summary: dict):
  """Process 0's outputs of a finished run: records for the sweep, summary.json, the table."""
  records.write(workdir, run.model, host.variables, run.source, run.spec.kind,
                run.spec.dummy_input())
  path = progress.write_summary(workdir, summary)
  print(summarize(run, host), flush=True)
  key = "perplexity" if run.spec.kind == "text" else "test_accuracy"
  print(f"{key} {summary[key]:.4f}  sparsity {summary['sparsity']:.4f}  stored "
        f"{summary['stored_params']:,} / dense {summary['dense_params']:,} params  "
        f"{run.steps} steps  {summary['wall_s']:.1f} s  -> {path}", flush=True)


def summarize(run: Run, host: state_lib.TrainState) -> str:
  """The per-layer table of the final model (a mask method's layers at what their masks keep)."""
  return dd.summarize(run.model, host.variables, run.spec.dummy_input(),
                      masks_kept=_masks_kept(run, host))
