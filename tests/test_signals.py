"""Ctrl-C (SIGINT) and SIGTERM sent to real train.py processes at real moments: during the imports,
at the first compile, mid-training, during a save, twice and three times. Every one ends with
exit 130 / 143, one line on stderr, no traceback, and a checkpoint of the step it names that
verifies; a rerun resumes from it.

All processes start at once (each is mostly start-up and compile), then are checked one by one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynadiag_jax.train import checkpoint, guard, progress

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_mlp.py")
FAST = ["--config.progress_bar=False", "--config.fast_compile=True", "--config.num_devices=1",
        "--config.eval_every=0", "--config.log_every=10", "--config.total_steps=5000",
        "--config.checkpoint.every=10", "--config.model.hidden=(32,32)"]
BIG = ["--config.model.hidden=(1024,1024)", "--config.checkpoint.every=3"]  # saves take a while


def _steps(wd: Path) -> list[int]:
  d = wd / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _held(pid: int) -> bool:
  """Whether train.py's first line ran: SIGINT and SIGTERM blocked (Linux /proc), imports ahead."""
  try:
    status = Path(f"/proc/{pid}/status").read_text()
  except OSError:
    return False
  blocked = int(next(l for l in status.splitlines() if l.startswith("SigBlk:")).split()[1], 16)
  want = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
  return blocked & want == want


def _saving(wd: Path) -> bool:
  d = wd / "checkpoints"
  return d.is_dir() and any(p.name.endswith("orbax-checkpoint-tmp") for p in d.iterdir())


class Proc:
  """A train.py process whose stdout and stderr go to files (read while it runs)."""

  def __init__(self, tmp: Path, name: str, *extra: str):
    self.wd, self.out, self.err = tmp / name, tmp / f"{name}.out", tmp / f"{name}.err"
    self.cmd = [sys.executable, str(ROOT / "train.py"), "--config", DIGITS, "--workdir",
                str(self.wd), *FAST, *extra]
    self.p = subprocess.Popen(self.cmd, cwd=ROOT, stdout=open(self.out, "w"),
                              stderr=open(self.err, "w"))
    self.t0, self.sent = time.monotonic(), []

  def send(self, sig: int, times: int = 1, gap: float = 0.01):
    for _ in range(times):
      if self.p.poll() is None:
        os.kill(self.p.pid, sig)
        self.sent.append(sig)
      time.sleep(gap)

  def stdout(self) -> str:
    return self.out.read_text()

  def result(self) -> tuple[int, str, str]:
    self.p.wait(timeout=300)
    return self.p.returncode, self.stdout(), self.err.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  """{name: (returncode, stdout, stderr, Proc)} of each scenario, all run concurrently."""
  tmp = tmp_path_factory.mktemp("signals")
  procs = {
      "import": Proc(tmp, "import"),
      "term_import": Proc(tmp, "term_import"),
      "compile": Proc(tmp, "compile"),
      "mid": Proc(tmp, "mid"),
      "triple": Proc(tmp, "triple"),
      "term_mid": Proc(tmp, "term_mid"),
      "save": Proc(tmp, "save", *BIG),
  }
  plans = {  # name: (ready, what to send)
      "import": (lambda p: _held(p.p.pid), (signal.SIGINT, 1)),  # during `import jax`
      "term_import": (lambda p: _held(p.p.pid), (signal.SIGTERM, 1)),
      "compile": (lambda p: "MLP on digits" in p.stdout(), (signal.SIGINT, 1)),
      "mid": (lambda p: any(s >= 20 for s in _steps(p.wd)), (signal.SIGINT, 1)),
      "triple": (lambda p: any(s >= 20 for s in _steps(p.wd)), (signal.SIGINT, 3)),
      "term_mid": (lambda p: any(s >= 20 for s in _steps(p.wd)), (signal.SIGTERM, 1)),
      "save": (lambda p: _steps(p.wd) and _saving(p.wd), (signal.SIGINT, 2)),
  }
  todo, deadline = dict(plans), time.monotonic() + 400
  while todo and time.monotonic() < deadline:
    for name in list(todo):
      p = procs[name]
      ready, (sig, times) = todo[name]
      if p.p.poll() is not None:
        del todo[name]
      elif ready(p):
        p.send(sig, times)
        del todo[name]
    time.sleep(0.002)
  out = {}
  for name, p in procs.items():
    if p.p.poll() is None and not p.sent:
      p.p.kill()
    out[name] = (*p.result(), p)
  return out


def _one_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err and "Fatal" not in err, err[-3000:]
  return lines[0]


@pytest.mark.parametrize("name,sig", [("import", signal.SIGINT), ("term_import", signal.SIGTERM)])
def test_signal_during_import_stops_cleanly_and_creates_nothing(runs, name, sig):
  rc, out, err, p = runs[name]
  assert p.sent == [sig]
  assert rc == 128 + sig, err[-3000:]
  line = _one_line(err)
  assert line == (f"train.py: {'SIGINT' if sig == signal.SIGINT else 'SIGTERM'} before the first "
                  "step: nothing trained, nothing saved"), line
  assert not p.wd.exists()  # nothing claimed saved, nothing created


def test_sigint_at_the_first_compile_saves_the_step_it_finished(runs):
  rc, out, err, p = runs["compile"]
  assert p.sent == [signal.SIGINT] and rc == guard.EXIT_INTERRUPTED == 130, err[-3000:]
  line = _one_line(err)
  if "nothing trained" in line:  # the signal came before the loop's first check
    assert _steps(p.wd) == []
    return
  step = int(line.split("saved step ")[1].split(" ")[0])
  assert _steps(p.wd) == [step] and step >= 1
  flat, meta = checkpoint.load(str(p.wd / "checkpoints"), step)
  assert meta["step"] == step == int(flat["step"])


@pytest.mark.parametrize("name", ["mid", "triple", "term_mid", "save"])
def test_signal_mid_run_saves_the_current_step_once(runs, name):
  rc, out, err, p = runs[name]
  sig = p.sent[0]
  assert p.sent and rc == 128 + sig, err[-3000:]
  line = _one_line(err)
  what = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
  assert line.startswith(f"train.py: {what}: saved step ") and "rerun the same command" in line
  step = int(line.split("saved step ")[1].split(" ")[0])
  assert max(_steps(p.wd)) == step and step >= 3
  flat, meta = checkpoint.load(str(p.wd / "checkpoints"), step)  # every crc32 verified
  assert meta["step"] == step == int(flat["step"])
  assert not _saving(p.wd)  # no save left half-written
  events = [(r["step"], r["event"]) for r in progress.read_metrics(str(p.wd)) if "event" in r]
  assert events[-1] == (step, "interrupted" if sig == signal.SIGINT else "preempted")


def test_rerun_after_ctrl_c_resumes_from_the_saved_step(runs):
  rc, out, err, p = runs["mid"]
  step = int(err.split("saved step ")[1].split(" ")[0])
  cmd = [a if not a.startswith("--config.total_steps") else f"--config.total_steps={step + 5}"
         for a in p.cmd]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resumed from {p.wd / 'checkpoints'} at step {step}" in r.stdout
