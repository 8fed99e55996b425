"""Test session set-up: four forced CPU devices for pmap tests, fresh random seeds, the `slow` mark."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: a long end-to-end run (train.py subprocesses, real models over tens of "
      "steps). .ci/run runs them; `-m 'not slow'` skips them while developing.")


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A generator on a fresh seed, printed so that a failure can be replayed."""
  seed = int.from_bytes(os.urandom(4), "little")
  print(f"{request.node.name}: seed {seed}")
  return np.random.default_rng(seed)


@pytest.fixture
def diag_calls(monkeypatch) -> list[tuple[bool, int]]:
  """(offsets concrete, i.e. an exact layout, not a traced bounded one; K computed) of each
  later dd.ops.diag_matmul call, in call order."""
  import dynadiag_jax as dd  # pylint: disable=import-outside-toplevel
  seen: list[tuple[bool, int]] = []
  real = dd.ops.diag_matmul

  def spy(x, v, o_K, *args, **kw):
    seen.append((dd.pattern.is_concrete(o_K), int(v.shape[0])))
    return real(x, v, o_K, *args, **kw)

  monkeypatch.setattr(dd.ops, "diag_matmul", spy)
  return seen
