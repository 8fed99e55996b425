"""Two train.py processes joined by jax.distributed on 127.0.0.1 (two CPU devices each): a peer
killed mid-run is reported by the survivor, both restart, and the run ends bitwise equal to an
uninterrupted two-process run (pmap, and a mesh splitting the parameters over both processes);
a workdir that is not shared is a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from dynadiag_jax.train import checkpoint, distributed, guard, progress

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
FLAGS = [
    f"--config.total_steps={STEPS}", "--config.recipe.num_levels=2",
    "--config.model.hidden=(32,32)", "--config.checkpoint.every=10", "--config.checkpoint.keep=3",
    "--config.eval_every=0", "--config.log_every=10", "--config.progress_bar=False",
    "--config.distributed=True",
    "--config.cluster.num_processes=2", "--config.cluster.heartbeat_timeout_s=10",
    "--config.cluster.initialization_timeout_s=60",
]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNADIAG_", "JAX_COORD"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1")
  return env


def _start(workdirs: list[Path], port: int, *extra: str) -> list[subprocess.Popen]:
  """Process i of 2 with workdir workdirs[i] (and `extra` flags)."""
  procs = []
  for i, wd in enumerate(workdirs):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "digits_mlp.py"),
           "--workdir", str(wd), *FLAGS, *extra, f"--config.cluster.coordinator_address=127.0.0.1:{port}",
           f"--config.cluster.process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
  out = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
    out.append((p.returncode, err))
  return out


def _steps(wd: Path) -> list[int]:
  d = wd / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _kill_peer_when(procs: list[subprocess.Popen], ready: Callable[[], bool]) -> tuple[int, str]:
  """SIGKILLs process 1 as soon as `ready()`; (returncode, stderr) of process 0."""
  try:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not ready():
      assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
      time.sleep(0.001)
    os.kill(procs[1].pid, signal.SIGKILL)
    return _finish(procs[:1], timeout=60)[0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


# config.parallel='mesh' with every parameter matrix split over the 4 devices of both processes.
MESH = ("--config.parallel=mesh", "--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=0")


def test_two_processes_peer_killed_restart_resumes_bitwise(tmp_path):
  _killed_restart_bitwise(tmp_path)


@pytest.mark.slow
def test_two_processes_mesh_peer_killed_restart_resumes_bitwise(tmp_path):
  """The same with a (1, 4) data x fsdp mesh over both processes (FSDP across the hosts)."""
  _killed_restart_bitwise(tmp_path, *MESH)


def _killed_restart_bitwise(tmp_path: Path, *extra: str):
  """Uninterrupted vs peer killed after a checkpoint >= 10 and both restarted: bitwise equal."""
  ref, run = tmp_path / "ref", tmp_path / "run"
  for rc, err in _finish(_start([ref, ref], _port(), *extra)):  # uninterrupted
    assert rc == 0, err[-3000:]

  procs = _start([run, run], _port(), *extra)
  rc0, err0 = _kill_peer_when(procs, lambda: any(s >= 10 for s in _steps(run)))
  assert procs[1].wait() == -signal.SIGKILL
  done = any(s == STEPS for s in _steps(run))
  if not done:  # the survivor says what happened and how to go on, then exits
    assert rc0 == distributed.PEER_LOST_EXIT, err0[-3000:]
    assert "a peer process died" in err0 and "restart every process" in err0, err0[-3000:]

  for rc, err in _finish(_start([run, run], _port(), *extra)):  # both restart, same command
    assert rc == 0, err[-3000:]
  events = [e for e in progress.read_metrics(str(run)) if e.get("event") == "restore"]
  assert events and all(10 <= e["step"] < STEPS for e in events), events
  a, meta_a = checkpoint.load(str(ref / "checkpoints"))
  b, meta_b = checkpoint.load(str(run / "checkpoints"))
  assert meta_a["step"] == meta_b["step"] == STEPS
  assert sorted(a) == sorted(b)
  diff = [k for k in a if np.asarray(a[k]).tobytes() != np.asarray(b[k]).tobytes()]
  assert not diff, f"leaves differ after resume: {diff[:10]}"


def test_peer_killed_during_first_save_is_reported_not_aborted(tmp_path):
  """The survivor's collective fails at once; it must still exit 75 with our message, not abort
  in jax's shutdown barrier (CI caught exit -6 here: the watchdog died calling into jax).
  fast_compile is asked for and said to be ignored (jax's AOT pmap is single-process)."""
  run = tmp_path / "run"
  procs = _start([run, run], _port(), "--config.fast_compile=True")
  d = run / "checkpoints"
  rc0, err0 = _kill_peer_when(procs, lambda: d.is_dir() and any(d.iterdir()))
  assert rc0 == distributed.PEER_LOST_EXIT, err0[-3000:]
  assert "a peer process died" in err0 and "restart every process" in err0, err0[-3000:]
  assert "fast_compile=True is ignored in a multi-process run" in err0, err0[-3000:]


def test_workdir_not_shared_is_a_clear_error(tmp_path):
  res = _finish(_start([tmp_path / "a", tmp_path / "b"], _port()), timeout=120)
  for rc, err in res:  # every process stops with the same one-line error (usage status)
    assert rc == guard.EXIT_USAGE, err[-3000:]
    assert "is not one shared filesystem" in err and "process(es) [1]" in err, err[-3000:]


def test_cluster_fields_must_come_together(monkeypatch):
  import ml_collections
  for k in distributed.ENV.values():
    monkeypatch.delenv(k, raising=False)
  c = ml_collections.ConfigDict({"distributed": True, "cluster": {
      "coordinator_address": "127.0.0.1:1234", "num_processes": 0, "process_id": -1}})
  with pytest.raises(distributed.ClusterConfigError, match="DYNADIAG_NUM_PROCESSES"):
    distributed.cluster_args(c)
  monkeypatch.setenv("DYNADIAG_NUM_PROCESSES", "2")
  monkeypatch.setenv("DYNADIAG_PROCESS_ID", "1")
  assert distributed.cluster_args(c) == {"coordinator_address": "127.0.0.1:1234",
                                         "num_processes": 2, "process_id": 1}
  monkeypatch.setenv("DYNADIAG_PROCESS_ID", "2")
  with pytest.raises(distributed.DistributedError, match="not in"):
    distributed.cluster_args(c)
