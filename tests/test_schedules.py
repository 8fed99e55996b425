"""Temperature and K_active schedules."""

import pytest

import dynadiag_jax as dd
from dynadiag_jax import schedules


def test_defaults_follow_design():
  s = dd.Schedule(total_steps=1000)
  assert (s.t_start, s.t_end, s.freeze_fraction, s.k_start_fraction) == (5.0, 0.05, 0.3, 1.0)
  assert s.freeze_step == 300
  t = [float(s.temperature(i)) for i in range(0, 1000, 10)]
  assert t[0] == pytest.approx(5.0) and t[30] == pytest.approx(0.05) and t[-1] == pytest.approx(0.05)
  assert all(a >= b - 1e-6 for a, b in zip(t, t[1:]))
  assert float(s.temperature(150)) == pytest.approx((5.0 + 0.05) / 2, rel=1e-3)


def test_levels_are_quantised_and_reach_k_before_freeze():
  s = dd.Schedule(total_steps=1000, num_levels=5)
  lv = [s.level(i) for i in range(1000)]
  assert lv[0] == 1.0 and set(lv) == {0.0, 0.25, 0.5, 0.75, 1.0}
  assert all(a >= b for a, b in zip(lv, lv[1:]))
  assert lv[s.freeze_step - 1] == 0.0 and not s.is_frozen(299) and s.is_frozen(300)


def test_k_active():
  assert schedules.k_active(100, 10, 1.0) == 100
  assert schedules.k_active(100, 10, 0.0) == 10
  assert schedules.k_active(100, 10, 0.5) == 55
  assert schedules.k_active(100, 10, 1.0, k_start_fraction=0.5) == 50
  assert schedules.k_active(100, 10, 1.0, k_start_fraction=0.01) == 10


@pytest.mark.parametrize("kw", [dict(total_steps=0), dict(total_steps=10, freeze_fraction=1.5),
                                dict(total_steps=10, t_end=0.0), dict(total_steps=10, num_levels=1)])
def test_bad_config(kw):
  with pytest.raises(ValueError):
    dd.Schedule(**kw)


def test_phase_checks_level_and_k_start_fraction_when_built():
  ph = dd.Phase(0.5, 0.3, 0.8)
  assert (ph.level, ph.temperature, ph.k_start_fraction) == (0.5, 0.3, 0.8)
  assert dd.Phase() == dd.Phase(1.0, schedules.DEFAULT_TEMPERATURE, 1.0)
  for kw, msg in [(dict(level=1.5), "level must lie in"), (dict(level=-0.1), "level must lie in"),
                  (dict(k_start_fraction=1.2), "k_start_fraction must lie in"),
                  (dict(k_start_fraction=-1), "k_start_fraction must lie in")]:
    with pytest.raises(ValueError, match=msg):
      dd.Phase(**kw)


def test_phase_active_sets_the_current_phase_innermost_first():
  assert schedules.current_phase() is None
  outer, inner = dd.Phase(1.0, 2.0), dd.Phase(0.0, 0.1)
  with outer.active() as got:
    assert got is outer and schedules.current_phase() is outer
    with inner.active():
      assert schedules.current_phase() is inner
    assert schedules.current_phase() is outer
  assert schedules.current_phase() is None
  with pytest.raises(KeyError):
    with inner.active():
      raise KeyError("left on an error")
  assert schedules.current_phase() is None  # reset on the way out
  assert issubclass(dd.PhaseError, RuntimeError)
