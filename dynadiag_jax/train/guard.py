"""What stops a run, and how: its errors, the exit statuses of train.py, the non-finite-loss watch.

Exit statuses of `train.py` (schedulers can tell them apart):
  0   finished (summary.json written)
  1   stopped on an error in the run (checkpoint, data); one line on stderr
  2   a command-line or config mistake; nothing was created
  3   diverged: a non-finite loss; the last good checkpoint is kept
  4   the workdir is in use by another live run (it holds the workdir's lock); nothing changed
  130 stopped by SIGINT (Ctrl-C), 143 by SIGTERM: every step trained is in a checkpoint (the
      current one was saved, or none had run yet); rerun the same command to resume
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_BUSY = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that SIGINT ended
EXIT_PREEMPTED = 143  # 128 + SIGTERM


class ConfigError(ValueError):
  """A config value a run cannot start with (raised before anything is written)."""


class WorkdirError(OSError):
  """A workdir that cannot be created or written."""


class Stopped(Exception):
  """A run stopped by SIGINT or SIGTERM at a step boundary; the message says what was saved."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.status = 128 + int(signum)


class DivergenceError(FloatingPointError):
  """A non-finite loss or gradient norm (training) or loss (evaluation) at `step`."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step


def _value(x: Any) -> float:
  """A scalar metric as a float (replicated device arrays: their first copy)."""
  return float(np.asarray(x).reshape(-1)[0])


class FiniteWatch:
  """Checks every step's loss and gradient norm without a host sync per step.

  `add` keeps the step's (device) metrics; `check` fetches what was added since the last
  check in one transfer and raises `DivergenceError` at the first non-finite value. The loop
  checks before every save, log, eval and at the end, and every `every` steps otherwise
  (then leaving the newest step unchecked, so that the fetch does not stall the pipeline).
  """

  KEYS = ("loss", "grad_norm")

  def __init__(self, every: int = 20):
    self.every = every
    self._todo: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: Mapping[str, Any]):
    """Records the metrics of the step that made `step` steps done."""
    self._todo.append((step, {k: metrics[k] for k in self.KEYS if k in metrics}))
    if len(self._todo) > self.every:
      self.check(all_steps=False)

  def check(self, all_steps: bool = True, where: str = ""):
    """Raises DivergenceError at the first non-finite loss or gradient norm added so far."""
    todo = self._todo if all_steps else self._todo[:-1]
    self._todo = [] if all_steps else self._todo[-1:]
    if not todo:
      return
    vals = jax.device_get([m for _, m in todo])
    for (step, _), m in zip(todo, vals):
      bad = {k: _value(v) for k, v in m.items() if not math.isfinite(_value(v))}
      if bad:
        self._todo = []
        what = ", ".join(f"{'gradient norm' if k == 'grad_norm' else k} {v}" for k, v in bad.items())
        raise DivergenceError(f"training diverged: {what} at step {step}{where}", step)


def check_eval(metrics: Mapping[str, float], step: int, where: str = ""):
  """Raises DivergenceError when an evaluation's loss is not finite."""
  if not math.isfinite(float(metrics["loss"])):
    raise DivergenceError(f"evaluation loss is {metrics['loss']} at step {step}{where}", step)


def finite_state(tree: Any) -> bool:
  """Whether every floating leaf of a host (numpy) tree is finite."""
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


OS_CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EFBIG: "file too large (a file size limit)"}


def os_error(e: OSError) -> str:
  """'disk full (No space left on device): <file>': an OSError in a few words, naming its file."""
  what = OS_CAUSES.get(e.errno)
  text = e.strerror or str(e)
  head = f"{what} ({text})" if what else f"{type(e).__name__}: {text}"
  return head + (f": {e.filename}" if getattr(e, "filename", None) else "")


def make_workdir(path: str) -> str:
  """The absolute workdir, created if needed and checked writable; WorkdirError otherwise."""
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise WorkdirError(f"cannot use {path!r} as workdir: {e.strerror or e}"
                       + (f" ({e.filename})" if e.filename and e.filename != path else "")) from e
  return path


_report_fd: int | None = None  # the terminal's stderr once a failed block silenced fd 2
_held_fd: int | None = None  # the terminal's stderr while a StderrHold holds fd 2 back
_ends_process = False  # train.py: after a failure, the process only reports it and exits


def failures_end_process(on: bool = True) -> None:
  """Lets a failed save silence fd 2 until exit (train.py); a library caller keeps its stderr."""
  global _ends_process
  _ends_process = on


@contextlib.contextmanager
def stderr_dropped_on_error():
  """Captures file descriptor 2 while the block runs: replayed if it succeeds. If it raises,
  fd 2 stays silenced until exit and `report` writes to the saved one, so that the run's
  one-line error is the whole report (orbax / tensorstore reads still in flight after a
  failed restore print asyncio tracebacks from their threads)."""
  global _report_fd
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
      _report_fd = saved
      raise
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    tmp.seek(0)
    sys.stderr.write(tmp.read().decode(errors="replace"))
    sys.stderr.flush()


class StderrHold:
  """Holds back what file descriptor 2 receives (into a temporary file) while an async checkpoint
  save runs: `release` replays it once the save landed, `drop` discards it when the save failed
  (tensorstore's threads print tracebacks of a failed write that the run's one-line error says
  in words). A progress bar printed meanwhile shows up when the save ends."""

  def __init__(self):
    self._saved: int | None = None
    self._tmp = None

  @property
  def holding(self) -> bool:
    return self._saved is not None

  def start(self):
    if self.holding or _report_fd is not None:
      return
    global _held_fd
    sys.stderr.flush()
    self._tmp = tempfile.TemporaryFile()
    self._saved = _held_fd = os.dup(2)
    os.dup2(self._tmp.fileno(), 2)

  def _end(self, replay: bool):
    global _held_fd
    if not self.holding:
      return
    _held_fd = None
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)
    self._saved = None
    if replay:
      self._tmp.seek(0)
      held = self._tmp.read()
      if held:
        os.write(2, held)
    self._tmp.close()
    self._tmp = None

  def release(self):
    """Back to the terminal, with what came meanwhile."""
    self._end(replay=True)

  def drop(self):
    """Silences fd 2 until exit (late tracebacks of the failed write's threads included);
    `report` writes the run's one line to the terminal's stderr."""
    global _report_fd, _held_fd
    if not self.holding:
      return
    if not _ends_process:
      self._end(replay=False)
      return
    _held_fd = None
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    _report_fd, self._saved = self._saved, None
    self._tmp.close()
    self._tmp = None


def terminal_fd() -> int:
  """The file descriptor of the user's stderr (fd 2, unless a failed block or a save holds it)."""
  for fd in (_report_fd, _held_fd):
    if fd is not None:
      return fd
  return 2


def report(line: str) -> None:
  """Writes one line to the user's stderr (also after `stderr_dropped_on_error` silenced it)."""
  try:
    sys.stderr.flush()
  except (OSError, ValueError):
    pass
  os.write(terminal_fd(), (line + "\n").encode())
