"""Faults of the machine and the data, met by real train.py processes: each ends with one line
naming its cause and a documented exit status. A full disk (a small tmpfs) and a file size
limit stop the run at the save that fails; a read-only workdir or data dir is named as such;
damaged data (a truncated array_record, a broken dataset_info.json, a missing test split, an
empty wiki.valid.raw) is found before the first step and named.

The tmpfs cases run in a user and mount namespace (`unshare -rm`), skipped where the kernel
does not allow one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynadiag_jax.data import default_data_dir
from dynadiag_jax.train import guard, progress

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_mlp.py")
FAST = ["--config.progress_bar=False", "--config.fast_compile=True", "--config.num_devices=1",
        "--config.eval_every=0", "--config.log_every=5", "--config.model.hidden=(32,32)"]


def _train(*args: str) -> list[str]:
  return [sys.executable, str(ROOT / "train.py"), *args]


def _one_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


def _namespaces() -> bool:
  try:
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                          capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def _in_tmpfs(tmp: Path, options: str, setup: str, cmd: list[str]) -> subprocess.CompletedProcess:
  """Runs cmd with a fresh tmpfs mounted (`options`) on tmp/mnt in its own namespace, after the
  shell `setup`; the tmpfs's files are copied to tmp/after for the checks."""
  mnt, after = tmp / "mnt", tmp / "after"
  mnt.mkdir()
  after.mkdir()
  script = (f'mount -t tmpfs -o {options} tmpfs {mnt} || exit 99; {setup}; "$@"; rc=$?; '
            f'cp -a {mnt}/. {after}/ 2>/dev/null; exit $rc')
  return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script,
                         "sh", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)


needs_namespaces = pytest.mark.skipif(not _namespaces(), reason="no user + mount namespaces here")


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> Path:
  """The prepared digits data set (prepared here if needed), to copy and damage."""
  src = Path(default_data_dir()) / "digits"
  if not src.is_dir():
    wd = tmp_path_factory.mktemp("prep") / "wd"
    r = subprocess.run(_train("--config", DIGITS, "--workdir", str(wd), *FAST,
                              "--config.total_steps=1"), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
  return src


DAMAGE = {  # name: (what to do to <data>/digits/1.0.0, what the line must say)
    "truncated": (lambda d: os.truncate(d / "digits-test.array_record-00000-of-00001", 3000),
                  "digits-test.array_record-00000-of-00001"),
    "info": (lambda d: (d / "dataset_info.json").write_text('{"name": "digits", "splits": ['),
             "dataset_info.json cannot be read as JSON"),
    "no_test_split": (lambda d: (d / "digits-test.array_record-00000-of-00001").unlink(),
                      "cannot read split 'test' of digits"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_data_is_named_before_anything_runs(digits_data, tmp_path, damage):
  data = tmp_path / "data"
  shutil.copytree(digits_data, data / "digits")
  hurt, want = DAMAGE[damage]
  hurt(data / "digits" / "1.0.0")
  wd = tmp_path / "wd"
  r = subprocess.run(_train("--config", DIGITS, "--workdir", str(wd), *FAST,
                            "--config.total_steps=10"), cwd=ROOT, capture_output=True, text=True,
                     timeout=300, env={**os.environ, "DYNADIAG_DATA_DIR": str(data)})
  assert r.returncode == guard.EXIT_ERROR, r.stderr[-3000:]
  line = _one_line(r.stderr)
  assert line.startswith("train.py: error: DataNotFoundError: ") and want in line, line
  assert str(data / "digits") in line
  assert not wd.exists()  # found before the first step: nothing created


def test_empty_wikitext_file_is_named(tmp_path):
  text = tmp_path / "wikitext-103-raw"
  text.mkdir()
  for f in ("wiki.train.raw", "wiki.test.raw"):
    (text / f).write_text("the quick brown fox jumps over the lazy dog\n" * 2000)
  (text / "wiki.valid.raw").write_text("")
  r = subprocess.run(_train("--config", str(ROOT / "configs" / "wikitext103_gpt2_s.py"),
                            "--workdir", str(tmp_path / "wd"), f"--config.data.text_dir={text}",
                            "--config.data.tokenizer=bytes"), cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == guard.EXIT_ERROR, r.stderr[-3000:]
  line = _one_line(r.stderr)
  assert f"{text / 'wiki.valid.raw'} is empty" in line, line


@needs_namespaces
def test_full_disk_stops_at_the_save_with_one_line(tmp_path):
  """1 MB of disk: the first save (step 10) cannot fit; the run stops there."""
  wd = tmp_path / "mnt" / "wd"
  r = _in_tmpfs(tmp_path, "size=1024k", "true", _train(
      "--config", DIGITS, "--workdir", str(wd), *FAST, "--config.total_steps=400",
      "--config.checkpoint.every=10"))
  assert r.returncode == guard.EXIT_ERROR, r.stderr[-3000:]
  line = _one_line(r.stderr)
  assert "Cannot save the checkpoint at step 10" in line and "disk full" in line, line
  assert "no checkpoint was saved" in line
  after = tmp_path / "after" / "wd"
  steps = [rec["step"] for rec in progress.read_metrics(str(after)) if rec.get("split") == "train"]
  assert steps == [5, 10]  # no training past the failed save
  assert not any(p.name.isdigit() for p in (after / "checkpoints").iterdir())


def test_failed_async_save_stops_the_run_with_its_cause(tmp_path):
  """A 2 MB file size limit: the async write of a ~13 MB checkpoint fails in orbax's threads;
  the run stops within a few steps of it with one line, their tracebacks held back."""
  wd = tmp_path / "wd"
  limited = [sys.executable, "-c", "import os, resource, sys; "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20)); "
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"]
  r = subprocess.run(limited + _train("--config", DIGITS, "--workdir", str(wd), *FAST,
                                      "--config.model.hidden=(1024,1024)",
                                      "--config.total_steps=400", "--config.checkpoint.every=20")[1:],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == guard.EXIT_ERROR, r.stderr[-3000:]
  line = _one_line(r.stderr)
  assert "Cannot save the checkpoint at step 20" in line and "file too large" in line, line
  steps = [rec["step"] for rec in progress.read_metrics(str(wd)) if rec.get("split") == "train"]
  assert steps[-1] <= 25, steps  # stopped within a log interval of the failed save


@needs_namespaces
@pytest.mark.parametrize("where", ["workdir", "data_dir"])
def test_read_only_filesystem_is_named(tmp_path, where):
  ro = tmp_path / "mnt"
  if where == "workdir":
    args, env = ["--workdir", str(ro / "wd")], "true"
  else:
    args, env = ["--workdir", str(tmp_path / "wd")], f"export DYNADIAG_DATA_DIR={ro / 'data'}"
  r = _in_tmpfs(tmp_path, "size=4m,ro", env, _train("--config", DIGITS, *args, *FAST,
                                                     "--config.total_steps=10"))
  line = _one_line(r.stderr)
  assert "read-only file system" in line.lower(), line
  if where == "workdir":
    assert r.returncode == guard.EXIT_USAGE and str(ro / "wd") in line, line
  else:
    assert r.returncode == guard.EXIT_ERROR and str(ro / "data") in line, line
    assert not (tmp_path / "wd").exists()
