"""SIGINT and SIGTERM as stop requests: noted by a flag, acted on by the loop at a step boundary.

train.py blocks both signals on its first line (`hold`), before jax is imported, and
`install` replaces them by a handler that only records the signal, then unblocks them (a
signal that came meanwhile is delivered then). No signal ever raises inside jax, XLA
compilation or an orbax save; the loop saves the current step and exits 130 (SIGINT) or
143 (SIGTERM). Later signals are noted and ignored: a second Ctrl-C cannot tear a save.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
_received: list[int] = []


def hold() -> None:
  """Blocks SIGINT and SIGTERM in this thread (and threads and children started from it)."""
  signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _note(signum: int, frame) -> None:
  """The handler: remembers the signal, nothing else."""
  del frame
  _received.append(signum)


def install() -> bool:
  """Flag-only handlers for SIGINT and SIGTERM, then unblocks them; False off the main thread."""
  if threading.current_thread() is not threading.main_thread():
    return False
  for s in SIGNALS:
    signal.signal(s, _note)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
  return True


def installed() -> bool:
  """Whether SIGINT is handled here (train.py's run), not by Python's KeyboardInterrupt."""
  return signal.getsignal(signal.SIGINT) is _note


def requested() -> int | None:
  """The first stop signal received, or None."""
  return _received[0] if _received else None


def exit_status(signum: int) -> int:
  """128 + signal number, as a shell reports a process that the signal ended (130, 143)."""
  return 128 + int(signum)


def name(signum: int) -> str:
  return NAMES.get(signum, f"signal {signum}")


def forget() -> None:
  """Clears the received signals (tests that run several loops in one process)."""
  _received.clear()
