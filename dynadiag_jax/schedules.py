"""Temperature, active-diagonal and freeze schedules of the exploration phase."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator

import optax

DEFAULT_TEMPERATURE = 5.0  # the temperature of a phase left unset (t_start's default)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The DynaDiag schedules (docs/DESIGN.md section 3) for a run of `total_steps` steps.

  Exploration is steps [0, freeze_step): T follows a cosine t_start -> t_end and the
  number of computed diagonals a cosine from K_start (k_start_fraction * P, at least K)
  to K, quantised to `num_levels` levels; at freeze_step the pattern is frozen.
  """
  total_steps: int
  freeze_fraction: float = 0.3
  t_start: float = 5.0
  t_end: float = 0.05
  k_start_fraction: float = 1.0
  num_levels: int = 5

  def __post_init__(self):
    if self.total_steps < 1:
      raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
    if not 0.0 <= self.freeze_fraction <= 1.0:
      raise ValueError(f"freeze_fraction must lie in [0, 1], got {self.freeze_fraction}")
    if not (self.t_start > 0 and self.t_end > 0):
      raise ValueError(f"temperatures must be > 0, got {self.t_start}, {self.t_end}")
    if not 0.0 <= self.k_start_fraction <= 1.0:
      raise ValueError(f"k_start_fraction must lie in [0, 1], got {self.k_start_fraction}")
    if self.num_levels < 2:
      raise ValueError(f"num_levels must be >= 2, got {self.num_levels}")

  @property
  def freeze_step(self) -> int:
    """First step of sparse fine-tuning (the freeze transition happens before it)."""
    return int(round(self.freeze_fraction * self.total_steps))

  @property
  def temperature(self) -> optax.Schedule:
    """step -> T: cosine t_start -> t_end over exploration, t_end after (jittable)."""
    return optax.cosine_decay_schedule(self.t_start, max(self.freeze_step, 1),
                                       alpha=self.t_end / self.t_start)

  def level(self, step: int) -> float:
    """Quantised share in [0, 1] of (K_start - K) still active at `step` (host side)."""
    if step >= self.freeze_step:
      return 0.0
    frac = float(optax.cosine_decay_schedule(1.0, self.freeze_step)(step))
    q = self.num_levels - 1
    return round(frac * q) / q

  def is_frozen(self, step: int) -> bool:
    """Whether `step` falls after the freeze transition."""
    return step >= self.freeze_step

  def phase(self, step: int) -> tuple[float, bool]:
    """(K_active level, frozen) that `step` runs in: what `dynadiag_jax.advance` brings."""
    return self.level(step), self.is_frozen(step)


def k_active(p: int, k: int, level: float, k_start_fraction: float = 1.0) -> int:
  """Diagonals computed at `level`: K + round(level * (K_start - K))."""
  if not 0.0 <= level <= 1.0:
    raise ValueError(f"level must lie in [0, 1], got {level}")
  k_start = max(k, min(p, math.ceil(k_start_fraction * p - 1e-9)))
  return k + int(round(level * (k_start - k)))


@dataclasses.dataclass(frozen=True)
class Phase:
  """Where exploration stands: the K_active `level` (static) and the `temperature` (may be traced).

  Every exploring DiagDense applied inside `with phase:` computes the top-K_active
  diagonals of its alpha, K_active = K + round(level * (K_start - K)), K_start =
  k_start_fraction * P, gated at `temperature`. Frozen layers ignore it.
  """
  level: float = 1.0
  temperature: Any = DEFAULT_TEMPERATURE
  k_start_fraction: float = 1.0

  def __post_init__(self):
    for name in ("level", "k_start_fraction"):
      v = float(getattr(self, name))
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {v}")
      object.__setattr__(self, name, v)

  @contextlib.contextmanager
  def active(self) -> Iterator["Phase"]:
    """Makes this the phase of every DiagDense applied inside the block.

    Enter it where the model is traced (inside the jitted function, as `with_phase` does):
    jax's compile cache does not see it, so a phase entered around a call of a jitted
    function would be ignored by every later call; a layer traced under jit inside a phase
    entered outside any trace raises `PhaseError` instead.
    """
    token = _CURRENT.set((self, caching_traces()))
    try:
      yield self
    finally:
      _CURRENT.reset(token)


class PhaseError(RuntimeError):
  """An exploring DiagDense applied without a phase (see `dynadiag_jax.with_phase`)."""


# (phase, the caching traces around its Phase.active()) of the innermost one.
_CURRENT: contextvars.ContextVar[tuple[Phase, tuple[int, ...]] | None] = contextvars.ContextVar(
    "dynadiag_phase", default=None)
# Traces whose compiled result jax caches by their inputs alone (jit, pmap; not remat, scan).
_CACHING = ("jit", "pmap", "xla_pmap", "shard_map")


def caching_traces() -> tuple[int, ...]:
  """ids of the jit / pmap traces around this point, innermost first (() when run eagerly).

  Reads jax's trace context (`jax._src.core`, no public API for it); where that is not
  available (another jax version), () and the stale-phase check is off.
  """
  try:
    from jax._src import core  # pylint: disable=g-import-not-at-top
    trace = core.trace_ctx.trace
  except (ImportError, AttributeError):
    return ()
  out = []
  while trace is not None:
    info = getattr(getattr(trace, "frame", None), "debug_info", None)
    if str(getattr(info, "traced_for", "") or "").startswith(_CACHING):
      out.append(id(trace))
    trace = getattr(trace, "parent_trace", None)
  return tuple(out)


def current_phase() -> Phase | None:
  """The phase set by the innermost `Phase.active()` (None outside one)."""
  got = _CURRENT.get()
  return None if got is None else got[0]


def phase_for_trace() -> Phase | None:
  """`current_phase()`, or PhaseError when it was entered outside the jax trace running now
  (its value would be baked into a compiled function that later calls reuse)."""
  got = _CURRENT.get()
  if got is None:
    return None
  phase, around = got
  if set(caching_traces()) - set(around):  # a jit / pmap entered after the phase
    raise PhaseError(
        "a phase entered outside jax.jit / pmap reached a layer traced inside it: the compiled "
        "step would keep this phase for every later call. Enter it inside the traced function: "
        "dd.with_phase(model, level, temperature).apply(...) there, with the level a static "
        "argument")
  return phase
