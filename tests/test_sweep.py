"""dynadiag_jax.sweep: grid, McNemar, the table and plots from run directories (small-n and p rules,
only plots that exist linked), real sweeps: resumable, keyed by their full config (other
overrides refused), run from outside the checkout, stopped by Ctrl-C or by the death of the
parent without leaving a writer behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from dynadiag_jax import sweep
from dynadiag_jax.methods import records

ROOT = Path(__file__).resolve().parents[1]


def test_grid_runs_dense_once_per_seed():
  g = sweep.grid(["dense", "rigl"], [0.9, 0.99], [0, 1])
  assert g.count(("dense", 0.0, 0)) == 1 and len(g) == 2 + 4


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
  a = np.array([1] * 30 + [0] * 5 + [1] * 50 + [0] * 15, bool)
  b = np.array([0] * 30 + [1] * 5 + [1] * 50 + [0] * 15, bool)
  assert sweep.mcnemar(a, b) == pytest.approx(stats.binomtest(30, 35, 0.5).pvalue)
  assert sweep.mcnemar(a, a) == 1.0


def _fake_run(wd: str, method: str, sp: float, seed: int, correct: np.ndarray):
  d = Path(sweep.run_dir(wd, method, sp, seed))
  d.mkdir(parents=True)
  (d / "summary.json").write_text(json.dumps({"test_accuracy": float(correct.mean()),
                                              "sparsity": sp, "steps": 10, "data": "x"}))
  np.save(d / records.PREDICTIONS, correct)


def test_report_table_pvalues_and_plots(tmp_path, rng):
  wd = str(tmp_path)
  truth = rng.random((3, 400))
  for seed in range(3):
    _fake_run(wd, "dense", 0.0, seed, truth[seed] < 0.97)
    for sp, base in ((0.9, 0.9), (0.99, 0.8)):
      _fake_run(wd, "rigl", sp, seed, truth[seed] < base)
      _fake_run(wd, "static_diag", sp, seed, truth[seed] < base - 0.1)
  md = sweep.report(wd, [0.9, 0.99], ["dense", "static_diag", "rigl"], "toy")
  rows = [json.loads(l) for l in open(os.path.join(wd, "results.jsonl"))]
  assert len(rows) == 3 + 12
  line = next(l for l in md.splitlines() if l.startswith("| rigl"))
  assert line.count("**") == 4 and "(3)" in line  # best at both sparsities, n = 3
  static = next(l for l in md.splitlines() if l.startswith("| static_diag"))
  p = float(static.split("p=")[1].split(" ")[0].rstrip("|").strip())
  assert p < 1e-6  # 10 points worse on every one of 1200 paired examples
  acc = np.mean([(truth[s] < 0.8).mean() for s in range(3)]) * 100
  assert f"{acc:.2f}" in line
  png = Path(wd, "accuracy.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_one_seed_has_no_spread_and_bold_needs_p_below_005(tmp_path, rng):
  """n = 1 shows the value and (1), never '+- 0.00 (1)'; a winner by p = 0.5 is not bold."""
  wd = str(tmp_path)
  k = rng.permutation(400)  # example i is the k[i]-th: exactly 2 vs 1 discordant, any seed
  _fake_run(wd, "rigl", 0.9, 0, k < 320)
  _fake_run(wd, "static_diag", 0.9, 0, (k < 318) | (k == 399))
  md = sweep.report(wd, [0.9], ["static_diag", "rigl"], "toy")
  rigl = next(l for l in md.splitlines() if l.startswith("| rigl"))
  static = next(l for l in md.splitlines() if l.startswith("| static_diag"))
  assert "+-" not in rigl + static and "(1)" in rigl and "**" not in rigl + static, md
  p = float(static.split("p=")[1].split(" ")[0].rstrip("|").strip())
  assert p > 0.05
  assert "accuracy.png" in md and os.path.exists(os.path.join(wd, "accuracy.png"))


def test_report_links_only_plots_it_wrote(tmp_path):
  wd = tmp_path
  for stale in ("accuracy.png", "gates.png", "offsets.png"):
    (wd / stale).write_bytes(b"old")
  md = sweep.report(str(wd), [0.9], ["dynadiag", "rigl"], "toy")  # no finished runs
  assert "(no finished runs)" in md and ".png" not in md, md
  assert not any((wd / p).exists() for p in ("accuracy.png", "gates.png", "offsets.png"))


def test_cli_rejects_unknown_arguments():
  with pytest.raises(SystemExit):
    sweep.parse(["--config", "c.py", "--workdir", "w", "--total_steps=3"])


@pytest.mark.slow
def test_real_sweep_runs_once_and_skips_finished(tmp_path):
  cmd = [sys.executable, "-m", "dynadiag_jax.sweep", "--config", "configs/digits_mlp.py",
         "--methods", "static_diag,rigl", "--sparsity", "0.9", "--seeds", "0", "--jobs", "2",
         "--workdir", str(tmp_path), "--config.total_steps=12", "--config.masks.every=4",
         "--config.model.hidden=(32,32)", "--config.log_every=4", "--config.eval_every=0",
         "--config.fast_compile=True", "--config.checkpoint.async_save=False"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  sums = sorted(tmp_path.glob("*/s*/seed*/summary.json"))
  assert len(sums) == 2
  stamp = [p.stat().st_mtime_ns for p in sums]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0 and "2 done, 0 to go" in r.stdout
  assert [p.stat().st_mtime_ns for p in sums] == stamp
  assert "| rigl |" in (tmp_path / "results.md").read_text()
  # every run records the code it ran (the commit of this checkout; None outside git)
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True)
  want = head.stdout.strip() if head.returncode == 0 else None
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [r["commit"] for r in rows] == [want, want]
  # every run records its overrides and full effective config
  assert all(r["overrides"] == cmd[cmd.index("--workdir") + 2:] for r in rows)
  assert {(r["config"]["method"], r["config"]["total_steps"]) for r in rows} == {
      ("static_diag", 12), ("rigl", 12)}
  # other overrides are other runs: refused in this directory, nothing reused or changed
  before = (tmp_path / "results.md").read_text()
  for other in ("--config.recipe.gate=soft_topk", "--config.total_steps=6"):
    r = subprocess.run(cmd + [other], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep: error: ") and "another config" in lines[0]
    assert other.split("=")[0].removeprefix("--config.") in lines[0]
    assert [p.stat().st_mtime_ns for p in sums] == stamp
    assert (tmp_path / "results.md").read_text() == before


def _child(parent: int) -> int | None:
  """The pid of a process whose parent is `parent` (Linux /proc), or None."""
  for d in Path("/proc").iterdir():
    if d.name.isdigit():
      try:
        if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
          return int(d.name)
      except (OSError, IndexError, ValueError):
        pass
  return None


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


def _outside_checkout(tmp_path: Path) -> tuple[list[str], Path, Path]:
  """A sweep command run from a folder outside the checkout, its config copied there."""
  where = tmp_path / "elsewhere"
  shutil.copytree(ROOT / "configs", where / "configs")
  wd = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "dynadiag_jax.sweep", "--config", "configs/digits_mlp.py",
         "--methods", "static_diag", "--sparsity", "0.9", "--seeds", "0", "--jobs", "1",
         "--workdir", str(wd), "--config.total_steps=1000", "--config.model.hidden=(32,32)",
         "--config.log_every=10", "--config.eval_every=0", "--config.fast_compile=True",
         "--config.checkpoint.every=10"]
  return cmd, where, wd


def _installed(tmp_path: Path) -> dict:
  """An environment whose only path to this checkout is a folder holding its packages (as an
  installed one would): neither train.py nor configs/ can be found through it."""
  site = tmp_path / "site"
  site.mkdir()
  for pkg in ("dynadiag_jax", "pallas_kernels"):
    (site / pkg).symlink_to(ROOT / pkg)
  return {**os.environ, "PYTHONPATH": str(site)}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill_parent", "ctrl_c"])
def test_sweep_outside_checkout_stops_its_child_and_resumes(tmp_path, how):
  """Run from another folder (the installed package, a config given as a path). SIGKILL of the
  sweep: its child saves and ends instead of training on unwatched. Ctrl-C: the sweep exits 130
  with one line once its child saved. A rerun resumes the run from where it stopped."""
  cmd, where, wd = _outside_checkout(tmp_path)
  run = wd / "static_diag" / "s0.9" / "seed0"
  env = _installed(tmp_path)
  p = subprocess.Popen(cmd, cwd=where, env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    deadline, child = time.monotonic() + 240, None
    while time.monotonic() < deadline and p.poll() is None:
      child = child or _child(p.pid)
      ck = run / "checkpoints"
      if child and ck.is_dir() and any(c.name.isdigit() for c in ck.iterdir()):
        break
      time.sleep(0.01)
    assert child and p.poll() is None, p.communicate()[1][-1000:] if p.poll() is not None else ""
    if how == "sigkill_parent":
      p.kill()
      p.wait()
    else:
      p.send_signal(signal.SIGINT)
      out, err = p.communicate(timeout=120)
      assert p.returncode == 130, err[-1000:]
      lines = [l for l in err.strip().splitlines() if l.startswith("sweep:")]
      assert lines == ["sweep: SIGINT: stopped; 1 run(s) saved their current step; rerun the "
                       "same command to resume"], err[-1000:]
    deadline = time.monotonic() + 120
    while _alive(child) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not _alive(child), "the child trains on without its sweep"
  finally:
    if p.poll() is None:
      p.kill()
  last = (run / "log.txt").read_text().strip().splitlines()[-1]
  sig = "SIGTERM" if how == "sigkill_parent" else "SIGINT"
  assert last.startswith(f"train.py: {sig}: saved step "), last
  step = int(last.split("saved step ")[1].split(" ")[0])
  r = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True,
                     timeout=600)
  assert f"Resumed from {run / 'checkpoints'} at step {step}" in (run / "log.txt").read_text()
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  rows = [json.loads(l) for l in (wd / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 1 and rows[0]["steps"] == 1000
