"""train.py as a user runs it: one-line errors, distinct exit statuses, nothing created on a
mistake, a quiet first run (fresh data dir) and a diverging run that stops with status 3.

All commands start at once (each is mostly Python start-up), then are checked one by one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynadiag_jax.train import checkpoint, guard, progress

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_mlp.py")
QUICK = ["--config.fast_compile=True", "--config.num_devices=1", "--config.eval_every=0"]


def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  """{name: (returncode, stdout, stderr, workdir)} of every command below, run concurrently."""
  tmp = tmp_path_factory.mktemp("cli")
  (tmp / "a_file").write_text("")
  wd = {k: tmp / k for k in ("typo", "nested", "noconfig", "backend", "warmup", "badvalue",
                             "quiet", "diverge", "gate", "shadow", "moved", "flag", "ckevery")}
  cmds = {
      "typo": ["--config", DIGITS, "--workdir", str(wd["typo"]), "--config.sparsty=0.5"],
      "nested": ["--config", str(ROOT / "configs" / "cifar10_vit_s.py"), "--workdir",
                 str(wd["nested"]), "--config.model.widht=64"],
      "noconfig": ["--config", "configs/no_such.py", "--workdir", str(wd["noconfig"])],
      "workdir": ["--config", DIGITS, "--workdir", str(tmp / "a_file" / "run")],
      "backend": ["--config", DIGITS, "--workdir", str(wd["backend"]), "--config.backend=nope"],
      "warmup": ["--config", DIGITS, "--workdir", str(wd["warmup"]), "--config.total_steps=5",
                 "--config.optimizer.warmup_steps=10"],
      "badvalue": ["--config", DIGITS, "--workdir", str(wd["badvalue"]), "--config.sparsity=abc"],
      "noworkdir": ["--config", DIGITS],
      "gate": ["--config", DIGITS, "--workdir", str(wd["gate"]), "--config.recipe.gate=hard"],
      "shadow": ["--config", DIGITS, "--workdir", str(wd["shadow"]), "--config.shadow_init=zeros"],
      "moved": ["--config", DIGITS, "--workdir", str(wd["moved"]), "--config.gate=soft_topk"],
      "flag": ["--config", DIGITS, "--workdir", str(wd["flag"]), "--total_steps=200"],
      "ckevery": ["--config", DIGITS, "--workdir", str(wd["ckevery"]),
                  "--config.checkpoint.every=0"],
      "help": ["--config", DIGITS, "--help"],
      "help_bare": ["--help"],
      "quiet": ["--config", DIGITS, "--workdir", str(wd["quiet"]), "--config.total_steps=10",
                "--config.log_every=5", "--config.checkpoint.every=5", *QUICK],
      "diverge": ["--config", DIGITS, "--workdir", str(wd["diverge"]), "--config.optimizer.lr=1e6",
                  "--config.optimizer.warmup_steps=100", "--config.log_every=0",
                  "--config.checkpoint.every=5", "--config.checkpoint.keep=10",
                  "--config.progress_bar=False", *QUICK],
  }
  env = {"quiet": {"DYNADIAG_DATA_DIR": str(tmp / "fresh_data")}}
  procs = {k: _start(*v, env=env.get(k)) for k, v in cmds.items()}
  out = {}
  for k, p in procs.items():
    o, e = p.communicate(timeout=600)
    out[k] = (p.returncode, o, e, wd.get(k))
  out["a_file"] = tmp / "a_file"
  return out


MISTAKES = {
    "typo": "no field 'sparsty' in the config; did you mean 'sparsity'?",
    "nested": "no field 'model.widht' in config.model; did you mean 'model.width'?",
    "noconfig": "config file 'configs/no_such.py' not found",
    "workdir": "as workdir: Not a directory",
    "backend": "unknown diag_matmul backend 'nope'",
    "warmup": "10 warmup steps",
    "badvalue": "--config.sparsity=abc",
    "noworkdir": "--workdir is required",
    "gate": "unknown gate 'hard'",
    "shadow": "config.shadow_init was removed: measured and not adopted",
    "moved": "config.gate is now config.recipe.gate",
    "flag": "unknown flag --total_steps; config fields are set as --config.total_steps=VALUE",
    "ckevery": "config.checkpoint.every must be >= 1, got 0",
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_mistake_is_one_line_status_2_and_creates_nothing(runs, name):
  rc, out, err, wd = runs[name]
  lines = err.strip().splitlines()
  assert rc == guard.EXIT_USAGE, err[-2000:]
  assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err[-2000:]
  assert MISTAKES[name] in lines[0]
  assert "Traceback" not in err and out == ""
  if wd is not None:
    assert not wd.exists()
  if name == "workdir":  # the workdir's parent is a file: left as it was
    assert runs["a_file"].is_file() and runs["a_file"].read_text() == ""


def test_help_lists_fields_and_methods_and_exits_0(runs):
  rc, out, err, _ = runs["help"]
  assert rc == 0 and err == "", err[-2000:]
  assert out.startswith("usage: train.py --config CONFIG.py --workdir DIR")
  assert "Methods (--config.method): dense, dynadiag, static_diag" in out and "rigl" in out
  for field in ("total_steps = 600", "sparsity = 0.9", "checkpoint.every = 100", "recipe.name = "):
    assert f"\n  {field}" in out, field
  rc, out, err, _ = runs["help_bare"]
  assert rc == 0 and "configs/mnist_mlp.py" in out and "--config configs/mnist_mlp.py --help" in out


def test_first_run_is_quiet(runs):
  """Fresh data dir: one line for the preparation, no empty bars, one rate, no tfds noise."""
  rc, out, err, wd = runs["quiet"]
  assert rc == 0, err[-3000:]
  text = out + err
  for noise in ("Downloading and preparing", "Unknown size", "OpenCV", "Variant folder",
                "Generating splits", "Shuffling", "Traceback"):
    assert noise not in text, noise
  assert "Preparing digits" in out and "no download" in out
  frames = err.replace("\r", "\n")
  assert not re.search(r"(?<!\d)0/10 \[", frames)  # the bar appears once the first step has run
  assert re.search(r"(?<!\d)1/10 \[", frames)
  assert "it/s=" not in frames  # tqdm's rate only
  assert (wd / "summary.json").exists()
  assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]


def test_divergence_exits_3_and_keeps_the_last_good_checkpoint(runs):
  rc, out, err, wd = runs["diverge"]
  lines = err.strip().splitlines()
  assert rc == guard.EXIT_DIVERGED, err[-3000:]
  assert len(lines) == 1 and "training diverged" in lines[0], err[-3000:]
  event = [r for r in progress.read_metrics(str(wd)) if r.get("event") == "diverged"]
  assert len(event) == 1
  bad = event[0]["step"]
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and max(steps) < bad and f"last good checkpoint is step {max(steps)}" in lines[0]
  flat, meta = checkpoint.load(str(wd / "checkpoints"))
  assert meta["step"] == max(steps) and guard.finite_state(flat)
  assert not (wd / "summary.json").exists()
