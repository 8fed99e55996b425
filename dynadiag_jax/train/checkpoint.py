"""Orbax checkpoints of a `TrainState`: async, keep N, every M steps, phase-aware restore.

A checkpoint at step s holds two items:
- 'state': the state's leaves as a flat {path: numpy array} dict (OCDBT), and
- 'meta': JSON with the step (= data position), the phase (`level`, `frozen`), the
  signature {path: [shape, dtype]} and a crc32 per leaf, and the run's wall time.
The state's structure changes at every K_active level and at the freeze, so `restore`
reads 'meta' first, rebuilds that structure from a fresh state (`state.at_phase`),
checks it against the signature, restores, and verifies every checksum. Anything wrong
raises `CheckpointError` naming the directory; nothing on disk is touched.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from dynadiag_jax.train.state import TrainState

FORMAT = 1


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored (corrupt, incomplete or from another config)."""


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


class Checkpointer:
  """A `CheckpointManager` in `directory` saving every `every` steps, keeping `keep`."""

  def __init__(self, directory: str, every: int, keep: int = 3, async_save: bool = True):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint every and keep must be >= 1, got {every}, {keep}")
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None."""
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, state: TrainState, extra_meta: dict | None = None, force: bool = False) -> bool:
    """Starts saving an un-replicated (numpy) state at its step; returns whether it saves."""
    step = int(state.step)
    if not force and not self.should_save(step):
      return False
    if step in self.manager.all_steps():
      return False
    flat = flatten(state)
    meta = {"format": FORMAT, "step": step, "level": state.level, "frozen": bool(state.frozen),
            "signature": signature(flat), "crc32": checksums(flat), **(extra_meta or {})}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=force)

  def _where(self, step: int) -> str:
    steps = self.manager.all_steps()
    prev = [s for s in steps if s < step]
    here = os.path.join(self.directory, str(step))
    hint = (f" To resume from step {max(prev)} instead, move {here} out of the way." if prev else
            f" No older checkpoint exists; remove {self.directory} to start afresh.")
    return f"checkpoint at step {step} in {self.directory!r}.{hint}"

  def read_meta(self, step: int) -> dict:
    """The 'meta' item of the checkpoint at `step`."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Cannot read the metadata of the {self._where(step)} "
                            f"({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "signature" not in meta:
      raise CheckpointError(f"Unknown metadata format in the {self._where(step)}")
    return meta

  def restore_flat(self, step: int, want: dict[str, np.ndarray],
                   meta: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(flat arrays, meta) at `step`, checked against the signature `want` and the checksums."""
    meta = self.read_meta(step) if meta is None else meta
    if signature(want) != meta["signature"]:
      raise CheckpointError(
          f"The {self._where(step)} does not fit this run's model or optimizer (was it written "
          f"with another config?): {_diff(signature(want), meta['signature'])}")
    try:
      flat = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(want))).state
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Cannot read the arrays of the {self._where(step)} "
                            f"({type(e).__name__}: {str(e)[:500]})") from e
    flat = {k: np.asarray(v) for k, v in flat.items()}
    if signature(flat) != meta["signature"]:
      raise CheckpointError(f"Arrays of the {self._where(step)} do not match its metadata: "
                            f"{_diff(meta['signature'], signature(flat))}")
    bad = [k for k, c in checksums(flat).items() if c != meta["crc32"].get(k)]
    if bad:
      raise CheckpointError(f"Corrupt {self._where(step)}: checksum mismatch in {bad[:5]}"
                            + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    return flat, meta

  def restore(self, step: int, target: Callable[[dict], TrainState]) -> tuple[TrainState, dict]:
    """(state, meta) of the checkpoint at `step`; target(meta) builds a like-shaped state."""
    meta = self.read_meta(step)
    like = target(meta)
    flat, meta = self.restore_flat(step, flatten(like), meta)
    state = unflatten(like, flat)
    if int(state.step) != step:
      raise CheckpointError(f"The {self._where(step)} holds step {int(state.step)}")
    logging.info("Restored checkpoint step %d (level %s, frozen %s) from %s", step,
                 meta["level"], meta["frozen"], self.directory)
    return state, meta

  def wait(self):
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def load(directory: str, step: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
  """(flat {path: array}, meta) of the newest (or `step`) checkpoint in `directory`, verified."""
  ck = Checkpointer(directory, every=1)
  try:
    step = ck.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {ck.directory!r}")
    meta = ck.read_meta(step)
    want = {k: np.zeros(s, d) for k, (s, d) in meta["signature"].items()}
    return ck.restore_flat(step, want, meta)
  finally:
    ck.close()
