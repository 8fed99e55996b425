"""train.py as a subprocess: SIGKILL / SIGTERM and rerun ends bitwise equal to an uninterrupted run
(SIGTERM saves and exits 143; the run learns its input permutations, mixing='learned', so the
soft permutation's logits and the freeze's hard one go through the kills too); a corrupt checkpoint gives a clear error and is never overwritten."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynadiag_jax.train import checkpoint, guard, progress

ROOT = Path(__file__).resolve().parents[1]
STEPS, FREEZE = 600, 180  # freeze_fraction 0.3
FLAGS = [
    f"--config.total_steps={STEPS}", "--config.recipe.freeze_fraction=0.3",
    "--config.recipe.num_levels=3", "--config.model.hidden=(64,64)",
    "--config.checkpoint.every=10", "--config.checkpoint.keep=2", "--config.eval_every=0",
    "--config.log_every=10", "--config.progress_bar=False", "--config.num_devices=1",
    "--config.fast_compile=True", "--config.recipe.mixing=learned",
]


def _cmd(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, str(ROOT / "train.py"), "--config",
          str(ROOT / "configs" / "digits_mlp.py"), "--workdir", str(workdir), *FLAGS, *extra]


def _steps(workdir: Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(_cmd(workdir, *extra), cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def _interrupt(workdir: Path, min_step: int, sig: int) -> int:
  """Starts a run, sends `sig` once a checkpoint >= min_step has landed; the exit code."""
  p = subprocess.Popen(_cmd(workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
  try:
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:
      if any(s >= min_step for s in _steps(workdir)):
        os.kill(p.pid, sig)
        break
      time.sleep(0.005)
    _, err = p.communicate(timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode is not None
  if sig == signal.SIGTERM:  # saved, then a status that tells preemption from completion
    assert p.returncode == guard.EXIT_PREEMPTED == 143, err[-3000:]
  return p.returncode


def _same(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  diff = [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
  assert not diff, f"leaves differ: {diff[:10]}"


@pytest.mark.slow
def test_killed_and_rerun_equals_uninterrupted(tmp_path):
  ref, run = tmp_path / "ref", tmp_path / "run"
  r = _run(ref)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _interrupt(run, 10, signal.SIGKILL) == -signal.SIGKILL  # during exploration
  assert _interrupt(run, FREEZE + 10, signal.SIGKILL) == -signal.SIGKILL  # after the freeze
  _interrupt(run, 400, signal.SIGTERM)  # saves where it stands and exits 143
  r = _run(run)
  assert r.returncode == 0, r.stderr[-3000:]

  events = [e for e in progress.read_metrics(str(run)) if "event" in e]
  restores = [(e["step"], e["frozen"]) for e in events if e["event"] == "restore"]
  print("restores:", restores, "events:", events)
  assert len(restores) == 3
  assert any(s < FREEZE and not f for s, f in restores), restores  # resumed before the freeze
  assert any(s > FREEZE and f for s, f in restores), restores  # and after it
  assert any(e["event"] == "preempted" for e in events)

  a, meta_a = checkpoint.load(str(ref / "checkpoints"))
  b, meta_b = checkpoint.load(str(run / "checkpoints"))
  assert meta_a["step"] == meta_b["step"] == STEPS and meta_b["frozen"]
  assert any(k.endswith("/perm") for k in a) and not any("perm_logits" in k for k in a)
  _same(a, b)  # params, optimizer state, rng, the learned permutations: bitwise
  sa = progress.read_metrics(str(ref))
  sb = progress.read_metrics(str(run))
  la = {r["step"]: r["loss"] for r in sa if r.get("split") == "train"}
  lb = {r["step"]: r["loss"] for r in sb if r.get("split") == "train"}
  assert la == lb  # every logged step once, same losses


def _digest(d: Path) -> dict[str, str]:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob("*")) if p.is_file()}


SHORT = ["--config.total_steps=30", "--config.recipe.freeze_fraction=0.5"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
  """A finished 30-step run through train.py (checkpoints 20 and 30 kept)."""
  wd = tmp_path_factory.mktemp("short") / "wd"
  r = subprocess.run(_cmd(wd, *SHORT), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


@pytest.mark.parametrize("how", ["garble", "truncate"])
def test_corrupt_checkpoint_is_a_clear_error_and_kept(short_run, tmp_path, how):
  wd = tmp_path / "wd"
  shutil.copytree(short_run, wd)
  assert _steps(wd) == [20, 30]
  for data in (wd / "checkpoints" / "30" / "state").rglob("d/*"):  # the array data files
    size = data.stat().st_size
    with open(data, "r+b") as f:
      if how == "truncate":
        f.truncate(size // 2)
      else:
        f.seek(size // 2)
        f.write(bytes(255 - b for b in f.read(64)))
  before = _digest(wd / "checkpoints")
  r = subprocess.run(_cmd(wd, *SHORT), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == guard.EXIT_ERROR and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "CheckpointError" in r.stderr and str(wd / "checkpoints") in r.stderr, r.stderr[-3000:]
  assert "step 30" in r.stderr and "resume from step 20" in r.stderr
  assert _digest(wd / "checkpoints") == before  # nothing written, the good step 20 intact
  flat, meta = checkpoint.load(str(wd / "checkpoints"), step=20)
  assert meta["step"] == 20 and int(flat["step"]) == 20
  inspect = [sys.executable, "-m", "dynadiag_jax.train.verify", str(wd)]
  r = subprocess.run(inspect, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == guard.EXIT_ERROR and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith("checkpoint: error:") and "step 30" in r.stderr, r.stderr
  r = subprocess.run(inspect + ["--step", "20"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 20 (frozen)" in r.stdout and "every crc32 verified" in r.stdout, r.stdout
