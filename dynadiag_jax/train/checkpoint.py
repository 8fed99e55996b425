"""Orbax checkpoints of a `TrainState`: async, keep N, every M steps, phase-aware restore.

A checkpoint at step s holds two items:
- 'state': the state's leaves as a flat {path: numpy array} dict (OCDBT), and
- 'meta': JSON with the step (= data position), the phase (`level`, `frozen`), the
  signature {path: [shape, dtype]} and a crc32 per leaf, the run's wall time, the config
  (JSON) that wrote it and the per-step metrics not yet logged.
The state's structure changes at every K_active level and at the freeze, so `restore`
reads 'meta' first, rebuilds that structure from a fresh state (`state.at_phase`),
checks it against the signature, restores, and verifies every checksum. Given the run's
config, it first compares it with the saved one (`config_diff`): only the fields of
`MAY_CHANGE` may differ on resume. Anything wrong raises `CheckpointError` naming the
directory and what to do; nothing on disk is touched. Saves land every `every` steps
(multiples of it; no initial save) and when forced (SIGTERM, the end of a run).
"""

from __future__ import annotations

import fnmatch
import dataclasses
import json
import logging
import os
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import save_decision_policy

from dynadiag_jax import recipe as recipe_lib
from dynadiag_jax.train import guard
from dynadiag_jax.train.state import TrainState

FORMAT = 1

# Config fields that may differ when a run resumes (fnmatch patterns over dotted paths):
# its length, reporting, checkpoint cadence, devices and how they are used (pmap or a mesh of
# any shape: a checkpoint holds one logical copy), compile and kernel settings, and
# where the data lives. Every other field defines the run and must match the saved config.
MAY_CHANGE = (
    "total_steps", "num_epochs", "log_every", "eval_every", "eval_batch_size", "progress_bar",
    "checkpoint.*", "num_devices", "parallel", "mesh.*", "distributed", "cluster.*", "fast_compile", "backend", "kernel.*",
    "data.data_dir", "data.vocab_dir", "data.text_dir", "data.*workers*", "data.*prefetch*",
)

# Fields added after the first release, with the value a checkpoint saved before the field
# existed ran with: a saved config that lacks one reads as having this value (old names:
# RENAMED applies after).
IMPLIED = {"alpha_lr": 1.0, "block": 1, "gate": "soft_topk", "method": "dynadiag",
           "static_patterns": "", "model.split_qkv": False, "hold_alpha": (), "mixing": "none"}
# Fields that moved into config.recipe (issues 21, 22): old dotted path -> new one.
RENAMED = {"block": "recipe.block", "mixing": "recipe.mixing", "gate": "recipe.gate",
           "l1": "recipe.l1", "alpha_lr": "recipe.alpha_lr",
           "hold_alpha": "recipe.experimental.hold",
           **{f"schedule.{k}": f"recipe.{k}" for k in (
               "freeze_fraction", "t_start", "t_end", "k_start_fraction", "num_levels")}}
# Research knobs measured and removed (their results stay in docs/RESEARCH.md), with the
# value that meant "off": a checkpoint saved with that value resumes; any other is refused.
REMOVED = {"select_every": 1, "select_after": 0, "alpha_spread": 1e-3, "alpha_update": "adam",
           "shadow_init": "random", "max_swaps": 0}


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored (corrupt, incomplete or from another config) or saved."""


# What a failed write says, and the words a person needs (the errno name buried in tensorstore's).
CAUSES = (("No space left on device", "disk full (No space left on device)"),
          ("Disk quota exceeded", "disk quota exceeded"),
          ("Read-only file system", "read-only file system"),
          ("Permission denied", "permission denied"),
          ("File too large", "file too large (a file size limit)"))


def cause(err: BaseException) -> str:
  """The cause of a failed checkpoint write in a few words, from the exception and its chain."""
  chain, e = [], err
  while e is not None and len(chain) < 20:
    chain.append(e)
    e = e.__cause__ or e.__context__
  text = " ".join(f"{type(x).__name__}: {x}" for x in chain)
  for needle, words in CAUSES:
    if needle in text:
      return words
  first = " ".join(f"{type(chain[-1]).__name__}: {chain[-1]}".split())
  return first[:300]


def _mb(n: int) -> str:
  return f"{n / 2**20:.1f} MB"


def check_directory(directory: str, must_exist: bool = False):
  """CheckpointError when `directory` is there but is not a readable directory (a damaged workdir)."""
  if not os.path.lexists(directory):
    if must_exist:
      raise CheckpointError(f"No checkpoint directory {directory!r}")
    return
  if not os.path.isdir(directory):
    raise CheckpointError(
        f"{directory!r} is not a directory, so its checkpoints are gone or hidden: this workdir is "
        "damaged and will not be restarted from step 0. Put the checkpoints directory back to "
        "resume, or use a new --workdir.")
  try:
    os.listdir(directory)
  except OSError as e:
    raise CheckpointError(f"Cannot read the checkpoint directory {directory!r}: {e.strerror}. "
                          "Fix its permissions to resume, or use a new --workdir.") from e


def flatten(state: TrainState) -> dict[str, np.ndarray]:
  """{'params/fc1/values': array, ...}: every leaf of the state by its path."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x) for p, x in leaves}


def unflatten(like: TrainState, flat: dict[str, np.ndarray]) -> TrainState:
  """The leaves of `flat` in the structure of `like`."""
  paths = list(flatten(like))
  return jax.tree.unflatten(jax.tree.structure(like), [flat[p] for p in paths])


def signature(flat: dict[str, np.ndarray]) -> dict[str, list]:
  """{path: [shape, dtype]}."""
  return {k: [list(v.shape), str(v.dtype)] for k, v in flat.items()}


def checksums(flat: dict[str, np.ndarray]) -> dict[str, int]:
  """{path: crc32 of the leaf's bytes}."""
  return {k: zlib.crc32(np.ascontiguousarray(v).tobytes()) for k, v in flat.items()}


def _diff(want: dict, have: dict, limit: int = 5) -> str:
  """A few lines naming what differs between two signatures."""
  out = [f"missing in checkpoint: {k} {want[k]}" for k in want if k not in have]
  out += [f"not in this run: {k} {have[k]}" for k in have if k not in want]
  out += [f"{k}: checkpoint {have[k]}, this run {want[k]}" for k in want
          if k in have and want[k] != have[k]]
  more = f" (+{len(out) - limit} more)" if len(out) > limit else ""
  return "; ".join(out[:limit]) + more


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} of a nested dict (lists kept as values)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _resolved_recipe(leaves: dict[str, Any]) -> dict[str, Any]:
  """`leaves` with recipe.* as the values of the recipe they name (unset fields filled in)."""
  if not any(k.startswith("recipe.") for k in leaves):
    return leaves
  name = leaves.get("recipe.name") or "default"
  try:
    base = dataclasses.asdict(recipe_lib.get(name))
  except ValueError:
    return leaves  # an unknown name differs by itself
  full = {f"recipe.{k}": v for k, v in _leaves(json.loads(json.dumps(base))).items()}
  out = {k: v for k, v in leaves.items() if k != "recipe.name"}
  for k, v in full.items():
    if out.get(k) is None:
      out[k] = v
  return out


def config_json(config: Any) -> str:
  """A config (ConfigDict or dict) as the JSON a checkpoint stores."""
  if hasattr(config, "to_json_best_effort"):
    return config.to_json_best_effort(sort_keys=True)
  return json.dumps(config, sort_keys=True, default=str)


def config_diff(saved: Any, current: Any, may_change: tuple[str, ...] = MAY_CHANGE) -> list[str]:
  """'path: saved -> current' for each field that defines the run and differs.

  A field the saved config lacks counts as its `IMPLIED` value, old names read as their
  `RENAMED` ones, removed knobs at their off value are dropped (older checkpoints), and
  both recipes are compared as the values they resolve to (`recipe.name` and overrides).
  """
  load = lambda c: _leaves(json.loads(c if isinstance(c, str) else config_json(c)))
  a, b = load(saved), load(current)
  implied = json.loads(json.dumps(IMPLIED))  # as the saved JSON reads them: tuples are lists
  if "recipe.name" in b and "recipe.name" not in a:  # saved before config.recipe
    a = {**{k: v for k, v in implied.items() if RENAMED.get(k, k) in b or k in b}, **a}
    a = {RENAMED.get(k, k): v for k, v in a.items() if REMOVED.get(k, ()) != v}
  else:
    a = {**{k: v for k, v in implied.items() if k in b}, **a}
    for old, new in RENAMED.items():  # moved after config.recipe existed (block, mixing)
      if old in a and old not in b:
        v = a.pop(old)
        a[new] = v if a.get(new) is None else a[new]
  a, b = _resolved_recipe(a), _resolved_recipe(b)
  out = []
  for k in sorted(set(a) | set(b)):
    if any(fnmatch.fnmatchcase(k, p) for p in may_change) or a.get(k, ()) == b.get(k, ()):
      continue
    fmt = lambda d: json.dumps(d[k]) if k in d else "(absent)"
    out.append(f"{k}: {fmt(a)} -> {fmt(b)}")
  return out


class Checkpointer:
  """A `CheckpointManager` in `directory` saving every `every` steps, keeping `keep`.

  `read_only`: never creates, cleans up or deletes anything (verify, also beside a live run).
  """

  def __init__(self, directory: str, every: int, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint every and keep must be >= 1, got {every}, {keep}")
    self.directory = os.path.abspath(directory)
    self.every = every
    self._saving: int | None = None  # the step of the save in flight, until it is checked
    self._hold = guard.StderrHold() if async_save and not read_only else None
    check_directory(self.directory, must_exist=read_only)
    if read_only:
      opts = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                          cleanup_tmp_directories=False, save_root_metadata=False)
    else:
      opts = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, cleanup_tmp_directories=True,
          save_decision_policy=save_decision_policy.FixedIntervalPolicy(every),
          enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None."""
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is a multiple of `every` not saved yet."""
    return step % self.every == 0 and self.manager.should_save(step)

  def save(self, state: TrainState, extra_meta: dict | None = None, force: bool = False) -> bool:
    """Starts saving an un-replicated (numpy) state at its step; returns whether it saves.

    Raises CheckpointError, before writing, when the filesystem lacks room for it, and when
    the previous save failed (`check`).
    """
    step = int(state.step)
    if not force and not self.should_save(step):
      return False
    self.check(wait=True)
    if step in self.manager.all_steps():
      return False
    flat = flatten(state)
    self._check_space(step, sum(v.nbytes for v in flat.values()))
    meta = {"format": FORMAT, "step": step, "level": state.level, "frozen": bool(state.frozen),
            "signature": signature(flat), "crc32": checksums(flat), **(extra_meta or {})}
    if self._hold is not None:
      self._hold.start()
    try:
      started = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._release(ok=False)
      raise self._save_failed(step, e) from None
    self._saving = step if started else None
    if not started:
      self._release(ok=True)
    return started

  def _release(self, ok: bool):
    """Ends holding stderr back: replayed after a save that landed, dropped after a failed one."""
    if self._hold is not None:
      self._hold.release() if ok else self._hold.drop()  # pylint: disable=expression-not-assigned

  def _check_space(self, step: int, nbytes: int):
    """CheckpointError when the filesystem has less room than one more checkpoint needs."""
    try:
      st = os.statvfs(self.directory)
    except OSError:
      return
    free, need = st.f_bavail * st.f_frsize, int(nbytes * 1.2) + (1 << 20)
    if free < need:
      raise CheckpointError(
          f"Cannot save the checkpoint at step {step} in {self.directory!r}: disk full (needs "
          f"about {_mb(need)}, {_mb(free)} free). The run stopped; {self._newest()} Free space, "
          "then rerun the same command to resume.")

  def check(self, wait: bool = False):
    """Raises CheckpointError if the last save failed (once it has ended; `wait`: wait for it)."""
    step = self._saving
    if step is None or (not wait and self.manager.is_saving_in_progress()):
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._release(ok=False)
      self._saving = None
      raise self._save_failed(step, e) from None
    landed = os.path.isdir(os.path.join(self.directory, str(step)))  # committed
    self._release(ok=landed)
    self._saving = None
    if not landed:
      raise self._save_failed(step, None)

  def _newest(self) -> str:
    """'the newest checkpoint kept is step N.' (or that there is none)."""
    steps = [s for s in self.manager.all_steps() if s != self._saving]
    return (f"the newest checkpoint kept is step {max(steps)}." if steps else
            "no checkpoint was saved.")

  def _save_failed(self, step: int, err: BaseException | None) -> "CheckpointError":
    """The one-line error of a failed save, naming its cause (disk full, read-only, ...)."""
    return CheckpointError(f"Cannot save the checkpoint at step {step} in {self.directory!r}: "
                           f"{cause(err) if err else 'it did not land'}. The run stopped; "
                           f"{self._newest()} Rerun the same command to resume once it is fixed.")

  def _where(self, step: int) -> str:
    return f"checkpoint at step {step} in {self.directory!r}"

  def _older(self, step: int) -> str:
    """What to do about an unusable checkpoint at `step`: fall back to an older one, or start over."""
    prev = [s for s in self.manager.all_steps() if s < step]
    here = os.path.join(self.directory, str(step))
    return (f"To resume from step {max(prev)} instead, move {here} out of the way." if prev else
            f"No older checkpoint exists; remove {self.directory} to start afresh.")

  def _other_run(self) -> str:
    workdir = os.path.dirname(self.directory)
    return (f"Rerun with the config (and code) that wrote it, or give this run a new --workdir "
            f"(not {workdir}).")

  def check_config(self, step: int, meta: dict, config: Any):
    """Raises CheckpointError when `config` differs from the saved one in a field of the run."""
    if "config" not in meta:
      return
    diff = config_diff(meta["config"], config)
    if diff:
      more = f" (+{len(diff) - 8} more)" if len(diff) > 8 else ""
      raise CheckpointError(
          f"The {self._where(step)} was written with another config: {'; '.join(diff[:8])}{more}. "
          "These fields define the run (only its length, logging, evaluation, checkpoint and "
          f"device settings may change on resume). {self._other_run()}")

  def read_meta(self, step: int) -> dict:
    """The 'meta' item of the checkpoint at `step`."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      err = " ".join(f"{type(e).__name__}: {e}".split())[:300]
      raise CheckpointError(f"Cannot read the metadata of the {self._where(step)} ({err}). "
                            f"{self._older(step)}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "signature" not in meta:
      raise CheckpointError(f"Unknown metadata format in the {self._where(step)}. "
                            f"{self._older(step)}")
    return meta

  def restore_flat(self, step: int, want: dict[str, np.ndarray],
                   meta: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(flat arrays, meta) at `step`, checked against the signature `want` and the checksums."""
    meta = self.read_meta(step) if meta is None else meta
    if signature(want) != meta["signature"]:
      raise CheckpointError(
          f"The {self._where(step)} does not fit this run's model or optimizer: "
          f"{_diff(signature(want), meta['signature'])}. {self._other_run()}")
    try:
      flat = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(want))).state
    except Exception as e:  # pylint: disable=broad-except
      err = " ".join(f"{type(e).__name__}: {e}".split())[:300]
      raise CheckpointError(f"Cannot read the arrays of the {self._where(step)} ({err}). "
                            f"{self._older(step)}") from e
    flat = {k: np.asarray(v) for k, v in flat.items()}
    if signature(flat) != meta["signature"]:
      raise CheckpointError(f"Arrays of the {self._where(step)} do not match its metadata: "
                            f"{_diff(meta['signature'], signature(flat))}. {self._older(step)}")
    bad = [k for k, c in checksums(flat).items() if c != meta["crc32"].get(k)]
    if bad:
      more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
      raise CheckpointError(f"Corrupt {self._where(step)}: checksum mismatch in {bad[:5]}{more}. "
                            f"{self._older(step)}")
    return flat, meta

  def restore(self, step: int, target: Callable[[dict], TrainState],
              config: Any = None) -> tuple[TrainState, dict]:
    """(state, meta) of the checkpoint at `step`; target(meta) builds a like-shaped state.

    With `config`, first checks it against the saved config (`check_config`).
    """
    meta = self.read_meta(step)
    if config is not None:
      self.check_config(step, meta, config)
    like = target(meta)
    flat, meta = self.restore_flat(step, flatten(like), meta)
    state = unflatten(like, flat)
    if int(state.step) != step:
      raise CheckpointError(f"The {self._where(step)} holds step {int(state.step)}. "
                            f"{self._older(step)}")
    logging.info("Restored checkpoint step %d (level %s, frozen %s) from %s", step,
                 meta["level"], meta["frozen"], self.directory)
    return state, meta

  def wait(self):
    """Blocks until pending async saves are on disk; CheckpointError if one failed."""
    self.check(wait=True)

  def close(self):
    """Waits for pending saves and releases the manager (a failed save was reported by `check`)."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    self._release(ok=self._saving is None or os.path.isdir(
        os.path.join(self.directory, str(self._saving))))
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      pass


def load(directory: str, step: int | None = None, tries: int = 5) -> tuple[dict[str, np.ndarray], dict]:
  """(flat {path: array}, meta) of the newest (or `step`) checkpoint in `directory`, verified.

  Reads only: nothing in `directory` is created, renamed or deleted (safe beside a live run;
  a step that the run deletes while it is read is tried again, `tries` times in all).
  """
  for attempt in range(tries):
    try:
      return _load_once(directory, step)
    except (OSError, CheckpointError) as e:
      gone = isinstance(e, FileNotFoundError) or isinstance(e.__cause__, FileNotFoundError)
      if not gone or attempt == tries - 1:
        if isinstance(e, CheckpointError):
          raise
        raise CheckpointError(f"Cannot read the checkpoints in {os.path.abspath(directory)!r}: "
                              f"{e.strerror or e} ({e.filename})") from e
  raise AssertionError("unreachable")


def _load_once(directory: str, step: int | None) -> tuple[dict[str, np.ndarray], dict]:
  ck = Checkpointer(directory, every=1, read_only=True)
  try:
    step = ck.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {ck.directory!r}")
    meta = ck.read_meta(step)
    want = {k: np.zeros(s, d) for k, (s, d) in meta["signature"].items()}
    return ck.restore_flat(step, want, meta)
  finally:
    ck.close()
