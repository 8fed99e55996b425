"""What a person sees: a tqdm bar, metrics as JSON lines and TensorBoard events, summary.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from typing import Any, Mapping

import tqdm

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tensorboard"


def _clean(v: Any) -> Any:
  """JSON-safe scalars (NaN/inf as strings)."""
  if isinstance(v, (bool, int, str)) or v is None:
    return v
  if isinstance(v, Mapping):
    return {str(k): _clean(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_clean(x) for x in v]
  v = float(v)
  return v if math.isfinite(v) else str(v)


def read_metrics(workdir: str) -> list[dict]:
  """Every record of <workdir>/metrics.jsonl (a line torn by a kill or a full disk is skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
  return [r for r in out if isinstance(r, dict)]


def _kept(rec: Mapping[str, Any], start_step: int) -> bool:
  """Whether a record survives a resume from start_step: what happened before it.

  Records of steps past start_step were written after the checkpoint and will be written
  again. A record at start_step describes the state after start_step steps, except a
  `freeze` event, which happens before running step start_step and is made again.
  """
  step = rec.get("step", 0)
  return step < start_step or (step == start_step and rec.get("event") != "freeze")


class Reporter:
  """Progress bar, metrics.jsonl and TensorBoard writer of one run (silent unless `active`).

  On resume from `start_step`, records past it (written before an interruption) are
  dropped from metrics.jsonl and purged from TensorBoard so every step appears once.
  The bar appears at the first `tick`, after the first step has compiled, so its rate and
  ETA count only steps of this run after compilation.
  """

  def __init__(self, workdir: str, total: int, start_step: int = 0, active: bool = True,
               bar: bool = True):
    self.active, self.total = active, total
    self.bar = None
    self._n, self._want_bar = start_step, bar
    self._have: set[tuple[int, str]] = set()
    self.writer = None
    self._file = self._path = None
    self._last = (start_step, time.perf_counter())
    if not active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    keep = [r for r in read_metrics(workdir) if _kept(r, start_step)]
    self._have = {(r["step"], r["split"]) for r in keep if "split" in r}
    with open(path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)
    self._path = path
    self._file = open(path, "a", buffering=1)
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self.writer = tensorboardX.SummaryWriter(os.path.join(workdir, TB_DIR),
                                             purge_step=start_step or None)

  def steps_per_s(self, step: int) -> float:
    """Steps per second since the last call."""
    s0, t0 = self._last
    now = time.perf_counter()
    self._last = (step, now)
    return (step - s0) / max(now - t0, 1e-9)

  def has(self, step: int, split: str) -> bool:
    """Whether metrics.jsonl already holds a `split` record of `step` (kept from a former run)."""
    return (int(step), split) in self._have

  def tick(self, n: int = 1):
    """n more steps done; the first call shows the bar (after the first step's compile)."""
    self._n += n
    if self.bar is not None:
      self.bar.update(n)
    elif self.active and self._want_bar:
      self.bar = tqdm.tqdm(total=self.total, initial=self._n, dynamic_ncols=True, unit="step",
                           smoothing=0.1)

  def write(self, step: int, split: str, metrics: Mapping[str, Any], postfix: bool = False):
    """One record {step, split, **metrics} to JSON lines and TensorBoard (split/name)."""
    if not self.active:
      return
    rec = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
    self._append(rec)
    self._have.add((int(step), split))
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self.writer.add_scalar(f"{split}/{k}", v, int(step))
    if postfix and self.bar is not None:
      short = {"loss": "loss", "accuracy": "acc", "temperature": "T", "active": "diag",
               "perplexity": "ppl"}  # the rate is tqdm's own
      self.bar.set_postfix({short[k]: (f"{v:.4g}" if isinstance(v, float) else v)
                            for k, v in metrics.items() if k in short}, refresh=False)

  def event(self, step: int, event: str, **info):
    """A non-metric record (restore, freeze, preemption) in metrics.jsonl."""
    if self.active:
      self._append({"step": int(step), "event": event, **{k: _clean(v) for k, v in info.items()}})

  def _append(self, rec: dict):
    """One JSON line to metrics.jsonl, reopened first if the file was deleted or replaced."""
    try:
      same = os.path.samestat(os.fstat(self._file.fileno()), os.stat(self._path))
    except OSError:
      same = False
    try:
      if not same:
        self._file.close()
        self._file = open(self._path, "a", buffering=1)
      self._file.write(json.dumps(rec) + "\n")
    except OSError as e:  # disk full, read-only: name the file
      raise OSError(e.errno, e.strerror, self._path) from None

  def message(self, text: str):
    """A line of text above the bar (or on stdout)."""
    if not self.active:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    """Closes the bar, TensorBoard and metrics.jsonl; never raises (it also runs on the way out of
    a failed run, e.g. on a full disk, whose own error is the one to report)."""
    for part in (self.bar, self.writer, self._file):
      if part is not None:
        try:
          part.close()
        except (OSError, ValueError):
          pass
    self.bar = self.writer = self._file = None
    self._want_bar = False


def code_version() -> dict[str, Any]:
  """{'commit', 'dirty'} of the git checkout the library runs from (None, None outside one)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,
                                  timeout=30)
  try:
    head = git("rev-parse", "HEAD")
    if head.returncode:
      return {"commit": None, "dirty": None}
    changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}
  return {"commit": head.stdout.strip(), "dirty": bool(changed)}


def write_summary(workdir: str, summary: Mapping[str, Any]) -> str:
  """<workdir>/summary.json (atomically); returns its path."""
  path = os.path.join(workdir, SUMMARY_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({k: _clean(v) for k, v in summary.items()}, f, indent=2)
  os.replace(path + ".tmp", path)
  return path
