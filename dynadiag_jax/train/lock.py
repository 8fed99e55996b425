"""One writer per workdir: an exclusive `flock` on <workdir>/.lock, held while the process lives.

The kernel drops the lock when its holder exits, however it ends (SIGKILL included), so a
lock is never stale and never needs a PID check. The file stays (empty); deleting it while a
run holds it would let a second writer in, so it is a hidden file. In a multi-host run each
process locks its own file (`.lock` for process 0, `.lock.<i>` for the others).
"""

from __future__ import annotations

import errno
import fcntl
import os

from dynadiag_jax.train import guard


class WorkdirBusyError(guard.WorkdirError):
  """Another live process holds the workdir's lock."""


def path(workdir: str, process: int = 0) -> str:
  return os.path.join(workdir, ".lock" if process == 0 else f".lock.{process}")


def holder(lock_path: str) -> int | None:
  """The pid that holds a flock on lock_path, from /proc/locks (Linux), or None."""
  try:
    ino = os.stat(lock_path).st_ino
    with open("/proc/locks") as f:
      for line in f:
        parts = line.split()
        if "FLOCK" in parts and len(parts) > 5 and parts[5].endswith(f":{ino}"):
          return int(parts[4])
  except (OSError, ValueError):
    pass
  return None


class WorkdirLock:
  """An exclusive, non-blocking flock on a workdir's lock file; `release` or process exit frees it."""

  def __init__(self, workdir: str, process: int = 0):
    self.workdir, self.path, self._fd = workdir, path(workdir, process), None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock, or raises WorkdirBusyError naming the holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise guard.WorkdirError(f"cannot lock workdir {self.workdir!r}: {e.strerror}") from e
      pid = holder(self.path)
      who = f"process {pid}" if pid else "another process"
      raise WorkdirBusyError(
          f"workdir {self.workdir!r} is in use: {who} is training in it (it holds "
          f"{self.path}); wait for it to end or stop it, or use another --workdir") from None
    self._fd = fd
    return self

  def release(self):
    """Frees the lock (the file stays)."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
