"""dynadiag_jax.sweep: grid, McNemar, the table and plots from run directories, a real resumable run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
