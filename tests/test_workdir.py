"""One workdir, one run: real train.py processes on a shared workdir (one wins, the other exits 4),
verify beside a live run (reads only), a checkpoint past total_steps and damaged workdirs
(refused with one line, never restarted from step 0 over their records), a deleted
metrics.jsonl (written again)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynadiag_jax.train import checkpoint, guard, progress, verify

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--config.progress_bar=False", "--config.fast_compile=True", "--config.num_devices=1",
         "--config.eval_every=0", "--config.log_every=5", "--config.model.hidden=(32,32)",
         "--config.checkpoint.every=10"]


def _cmd(wd: Path, *extra: str) -> list[str]:
  return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "digits_mlp.py"),
          "--workdir", str(wd), *FLAGS, *extra]


def _run(wd: Path, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(_cmd(wd, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _digest(d: Path) -> dict[str, str]:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob("*")) if p.is_file()}


def _one_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
  """A finished 30-step run (checkpoints 10, 20, 30)."""
  wd = tmp_path_factory.mktemp("finished") / "wd"
  r = _run(wd, "--config.total_steps=30")
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


def _copy(finished: Path, tmp_path: Path) -> Path:
  wd = tmp_path / "wd"
  shutil.copytree(finished, wd)
  return wd


def test_two_writers_on_one_workdir_one_runs_the_other_exits_4(tmp_path):
  wd = tmp_path / "wd"
  procs = [subprocess.Popen(_cmd(wd, "--config.total_steps=60"), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  outs = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
  codes = sorted(o[3] for o in outs)
  assert codes == [0, guard.EXIT_BUSY], [o[2][-2000:] for o in outs]
  winner = next(o for o in outs if o[3] == 0)
  loser = next(o for o in outs if o[3] == guard.EXIT_BUSY)
  line = _one_line(loser[2])
  assert line.startswith(f"train.py: error: workdir '{wd}' is in use: process {winner[0]} "), line
  recs = progress.read_metrics(str(wd))
  assert [r["step"] for r in recs if r.get("split") == "train"] == list(range(5, 61, 5))
  assert [r["step"] for r in recs if r.get("split") == "eval"] == [60]


def test_verify_reads_only(finished, tmp_path):
  """A half-written save (a tmp directory) and everything else are left exactly as they were."""
  wd = _copy(finished, tmp_path)
  tmp = wd / "checkpoints" / "40.orbax-checkpoint-tmp"
  tmp.mkdir()
  (tmp / "partial").write_bytes(b"x" * 100)
  before = _digest(wd)
  names = sorted(p.name for p in wd.rglob("*"))
  assert verify.main([str(wd)]) == 0
  assert verify.main([str(wd), "--step", "10"]) == 0
  assert _digest(wd) == before and sorted(p.name for p in wd.rglob("*")) == names
  r = subprocess.run([sys.executable, "-m", "dynadiag_jax.train.verify", str(wd)], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "step 30" in r.stdout, r.stderr[-2000:]
  assert _digest(wd) == before


def test_verify_beside_a_live_run_never_disturbs_it(tmp_path):
  """verify over and over while a run saves every step: the run finishes, every read is clean."""
  wd = tmp_path / "wd"
  p = subprocess.Popen(_cmd(wd, "--config.total_steps=150", "--config.checkpoint.every=1",
                            "--config.checkpoint.keep=2"), cwd=ROOT, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  reads, errors = 0, []
  try:
    while p.poll() is None:
      if any(c.name.isdigit() for c in (wd / "checkpoints").glob("*")):
        try:
          verify.describe(str(wd))
          reads += 1
        except checkpoint.CheckpointError as e:  # a step deleted (keep=2) while read: said so
          errors.append(str(e))
      time.sleep(0.01)
    out, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err[-3000:]
  assert reads >= 3, (reads, errors)
  assert all("\n" not in e for e in errors)
  flat, meta = checkpoint.load(str(wd / "checkpoints"))
  assert meta["step"] == 150


def test_checkpoint_past_total_steps_is_refused(finished, tmp_path):
  wd = _copy(finished, tmp_path)
  before = _digest(wd)
  r = _run(wd, "--config.total_steps=20")
  assert r.returncode == guard.EXIT_USAGE, r.stderr[-3000:]
  line = _one_line(r.stderr)
  assert "checkpoint at step 30" in line and "past this run's 20 steps" in line, line
  assert "--config.total_steps=30" in line
  assert _digest(wd) == before and r.stdout == ""


@pytest.mark.parametrize("damage", ["file", "gone"])
def test_damaged_workdir_is_refused_and_its_records_kept(finished, tmp_path, damage):
  """checkpoints/ replaced by a file, or deleted: refused twice over, metrics.jsonl untouched."""
  wd = _copy(finished, tmp_path)
  shutil.rmtree(wd / "checkpoints")
  if damage == "file":
    (wd / "checkpoints").write_text("not a directory")
  before = _digest(wd)
  for _ in range(2):
    r = _run(wd, "--config.total_steps=30")
    assert r.returncode == guard.EXIT_ERROR, r.stderr[-3000:]
    line = _one_line(r.stderr)
    assert "CheckpointError" in line and str(wd / "checkpoints") in line, line
    assert ("not a directory" in line) if damage == "file" else ("up to step 30" in line)
    assert _digest(wd) == before


def test_deleted_metrics_file_is_written_again(tmp_path):
  wd = tmp_path / "wd"
  p = subprocess.Popen(_cmd(wd, "--config.total_steps=400", "--config.checkpoint.every=50"),
                       cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and p.poll() is None:
      if any(r.get("split") == "train" for r in progress.read_metrics(str(wd))):
        (wd / progress.METRICS_FILE).unlink()
        break
      time.sleep(0.005)
    out, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err[-3000:]
  steps = [r["step"] for r in progress.read_metrics(str(wd)) if r.get("split") == "train"]
  assert steps and steps[-1] == 400 and steps == sorted(steps)
