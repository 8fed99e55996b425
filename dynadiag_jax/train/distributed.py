"""Multi-host runs: starting jax.distributed, agreeing on the resume step, a shared workdir, peer loss.

Launch one process per host (or several on one machine) with the same command and workdir:

    python train.py --config ... --workdir /shared/run --config.distributed=True \\
      --config.cluster.coordinator_address=host0:12345 --config.cluster.num_processes=2 \\
      --config.cluster.process_id=0        # 1 on the other host

or leave the cluster fields unset and export DYNADIAG_COORDINATOR_ADDRESS,
DYNADIAG_NUM_PROCESSES and DYNADIAG_PROCESS_ID; with neither, jax's cluster detection (SLURM,
Open MPI, Kubernetes, Cloud TPU) decides. The workdir must be one shared filesystem seen by
every process (checkpoints are written jointly): `check_shared_workdir` proves it at start.
Process 0 decides the resume step (`agree`) and the others follow it. When a peer dies, the
survivors print one line saying so and how to resume, then exit (code 75), instead of being
aborted by the coordination service without a word of ours: a watchdog thread trades heartbeats
through the service's key-value store and gives up after half of
config.cluster.heartbeat_timeout_s (jax's own limit, after which it aborts).
"""

from __future__ import annotations

import faulthandler
import os
import secrets
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dynadiag_jax.train import guard

ENV = {"coordinator_address": "DYNADIAG_COORDINATOR_ADDRESS",
       "num_processes": "DYNADIAG_NUM_PROCESSES", "process_id": "DYNADIAG_PROCESS_ID"}
PEER_LOST_EXIT = 75  # EX_TEMPFAIL: rerun the same command on every host to resume
TOKEN = ".dynadiag_shared_fs_check"
_context: dict[str, Any] = {"workdir": None, "watchdog": None, "process": 0}


class DistributedError(RuntimeError):
  """A multi-host run cannot start or go on; the message says what to change."""


class ClusterConfigError(DistributedError, guard.ConfigError):
  """config.cluster / DYNADIAG_* incomplete or wrong, or jax.distributed cannot start."""


class SharedWorkdirError(DistributedError, guard.WorkdirError):
  """The processes do not see one workdir (checkpoints, resume step)."""


def cluster_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """coordinator_address, num_processes, process_id from config.cluster, else the environment."""
  c = config.get("cluster") or ml_collections.ConfigDict()
  out: dict[str, Any] = {}
  addr = c.get("coordinator_address") or os.environ.get(ENV["coordinator_address"]) or None
  n = c.get("num_processes") or int(os.environ.get(ENV["num_processes"], 0) or 0)
  pid = c.get("process_id", -1)
  if pid is None or pid < 0:
    pid = int(os.environ.get(ENV["process_id"], -1) or -1)
  if addr is not None:
    out["coordinator_address"] = addr
  if n:
    out["num_processes"] = int(n)
  if pid >= 0:
    out["process_id"] = int(pid)
  given = set(out)
  if given and given != {"coordinator_address", "num_processes", "process_id"}:
    missing = sorted({"coordinator_address", "num_processes", "process_id"} - given)
    raise ClusterConfigError(
        f"config.cluster / environment set {sorted(given)} but not {missing}: give all three "
        f"(--config.cluster.<field> or {', '.join(ENV[m] for m in missing)}), or none for "
        "jax's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU)")
  if given and not 0 <= out["process_id"] < out["num_processes"]:
    raise ClusterConfigError(f"process_id {out['process_id']} is not in [0, num_processes = "
                           f"{out['num_processes']})")
  return out


def _on_peer_lost(status: Any = None):
  """Our message, then exit (never a bare abort). Touches no jax state: it also runs while the
  main thread is inside jax's atexit clean-up, where jax calls can raise or hang."""
  try:
    wd = _context["workdir"]
    where = f" Checkpoints are in {os.path.join(wd, 'checkpoints')};" if wd else ""
    os.write(guard.terminal_fd(), (
        f"\ndynadiag: process {_context['process']} lost the multi-host run: a peer process died "
        f"or stopped answering ({status}).{where} restart every process with the same command "
        f"to resume from the newest checkpoint.\n").encode())
  finally:
    os._exit(PEER_LOST_EXIT)  # pylint: disable=protected-access


class Watchdog:
  """A thread that trades heartbeats with the peers through the coordination service's key-value
  store and calls `_on_peer_lost` when a peer has been silent for `timeout_s` (before jax's own
  heartbeat timeout would abort the process) or the service is gone (process 0 died)."""

  PREFIX = "dynadiag/heartbeat/"

  def __init__(self, client, timeout_s: float, interval_s: float = 0.5):
    self.client, self.timeout_s, self.interval_s = client, timeout_s, interval_s
    self.me, self.n = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._fresh: dict[int, float] = {}  # peer -> monotonic time of its newest heartbeat seen
    self._thread = threading.Thread(target=self._run, daemon=True, name="dynadiag-watchdog")

  def start(self) -> "Watchdog":
    self._thread.start()
    return self

  def _run(self):
    seen: dict[int, tuple[str | None, float]] = {p: (None, time.monotonic())
                                                 for p in range(self.n) if p != self.me}
    beat = 0
    while not self._stop.wait(self.interval_s):
      beat += 1
      try:
        self.client.key_value_set(f"{self.PREFIX}{self.me}", str(beat), allow_overwrite=True)
        now = time.monotonic()
        for p, (last, since) in list(seen.items()):
          try:
            v = self.client.key_value_try_get(f"{self.PREFIX}{p}")
          except Exception:  # pylint: disable=broad-except
            v = None  # not there yet
          if v == "done":
            del seen[p]
            self._fresh[p] = float("inf")
          elif v != last:
            seen[p] = (v, now)
            self._fresh[p] = now
          elif now - since > self.timeout_s:
            _on_peer_lost(f"process {p} sent no heartbeat for {self.timeout_s:.0f} s")
      except Exception as e:  # pylint: disable=broad-except
        if not self._stop.is_set():
          _on_peer_lost(f"the coordination service on process 0 is unreachable: "
                        f"{str(e).splitlines()[0][:200]}")

  def settle(self) -> None:
    """Returns once every peer has been heard from after this call (or has ended normally); a
    silent peer makes the thread report the loss and exit with PEER_LOST_EXIT meanwhile."""
    t = time.monotonic()
    deadline = t + self.timeout_s + 4 * self.interval_s
    while self._thread.is_alive() and time.monotonic() < deadline:
      if all(self._fresh.get(p, -1.0) > t for p in range(self.n) if p != self.me):
        return
      time.sleep(self.interval_s / 5)

  def stop(self):
    """Tells the peers this process ended normally, then stops."""
    self._stop.set()
    self._thread.join(timeout=5)
    try:
      self.client.key_value_set(f"{self.PREFIX}{self.me}", "done", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass


def initialize(config: ml_collections.ConfigDict) -> bool:
  """jax.distributed.initialize from config.cluster / DYNADIAG_* when config.distributed (once).

  Call before any other jax call. Starts the peer watchdog. Returns whether this is a
  multi-process run.
  """
  if not config.get("distributed"):
    return False
  if jax.distributed.is_initialized():
    return True
  c = config.get("cluster") or ml_collections.ConfigDict()
  heartbeat = int(c.get("heartbeat_timeout_s", 100))
  kw = dict(cluster_args(config), initialization_timeout=int(c.get("initialization_timeout_s", 300)),
            heartbeat_timeout_seconds=heartbeat)
  faulthandler.enable()  # a fatal signal still prints where each thread was
  try:
    jax.distributed.initialize(**kw)
  except ValueError as e:  # no coordinator given and no cluster detected
    raise ClusterConfigError(
        f"config.distributed=True but jax.distributed cannot start: {e}. On a plain machine "
        "set --config.cluster.coordinator_address=HOST:PORT (process 0's host), "
        "--config.cluster.num_processes and --config.cluster.process_id on every process "
        f"(or export {', '.join(ENV.values())}).") from e
  _context["process"] = jax.process_index()
  from jax._src import distributed as jd  # pylint: disable=g-import-not-at-top
  client = getattr(getattr(jd, "global_state", None), "client", None)
  if client is not None and jax.process_count() > 1 and _context["watchdog"] is None:
    _context["watchdog"] = Watchdog(client, max(heartbeat / 2, 1.0)).start()
  return True


def finish():
  """A normal end of this process: peers stop watching it."""
  w, _context["watchdog"] = _context["watchdog"], None
  if w is not None:
    w.stop()


def settle():
  """On an error in a multi-host run: wait until the peers are known alive, or exit with
  PEER_LOST_EXIT and our message when one is gone (a collective failing because a peer died would
  otherwise end in jax's shutdown barrier, which aborts the process without a word of ours)."""
  w = _context["watchdog"]
  if w is not None:
    w.settle()


def _broadcast(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x))


def check_shared_workdir(workdir: str, timeout_s: float = 10.0):
  """Process 0 writes a random token into workdir; every process must read it back, else stop.

  Checkpoints (orbax) and the resume step need one filesystem seen by all processes.
  """
  _context["workdir"] = workdir
  if jax.process_count() == 1:
    return
  path = os.path.join(workdir, TOKEN)
  token = np.frombuffer(secrets.token_bytes(16), np.int32).copy()
  if jax.process_index() == 0:
    with open(path + ".tmp", "wb") as f:
      f.write(token.tobytes())
    os.replace(path + ".tmp", path)
  token = _broadcast(token)
  deadline, seen = time.monotonic() + timeout_s, False
  while not seen and time.monotonic() < deadline:  # NFS may show the file after a moment
    try:
      with open(path, "rb") as f:
        seen = np.frombuffer(f.read(), np.int32).tobytes() == token.tobytes()
    except OSError:
      pass
    if not seen:
      time.sleep(0.2)
  ok = _allgather(np.asarray([seen], np.int32)).reshape(-1)
  if jax.process_index() == 0:
    try:
      os.remove(path)
    except OSError:
      pass
  if not ok.all():
    blind = [int(i) for i in np.flatnonzero(ok == 0)]
    raise SharedWorkdirError(
        f"workdir {workdir} is not one shared filesystem: process(es) {blind} do not see the "
        f"file process 0 wrote there. Multi-host runs need the same workdir on every host "
        "(NFS, GCS FUSE, Lustre, ...): checkpoints are written jointly and the resume step is "
        "read from them.")


def agree(step: int | None, what: str = "resume step") -> int | None:
  """Process 0's value of `step` (None: no checkpoint) on every process; a clear error on mismatch."""
  if jax.process_count() == 1:
    return step
  mine = np.asarray([-1 if step is None else int(step)], np.int64)
  lead = int(_broadcast(mine)[0])
  every = _allgather(mine).reshape(-1)
  if (every != lead).any():
    views = {i: (None if int(v) < 0 else int(v)) for i, v in enumerate(every)}
    raise SharedWorkdirError(
        f"processes disagree on the {what}: {views} (process 0 decides). Their workdirs hold "
        "different checkpoints, so they are not one shared filesystem, or a save was torn: "
        "rerun once every process sees the same <workdir>/checkpoints.")
  return None if lead < 0 else lead
