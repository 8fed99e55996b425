"""The `auto` rule: the backend it picks per platform, block, rows and K / P, and its wiring."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynadiag_jax import ops, pattern
from dynadiag_jax.backends import auto

G = pattern.Geometry


@pytest.mark.parametrize("geo,rows,k,platform,want", [
    (G(768, 3072, 1), 1, 308, "cpu", "xla"),       # b = 1, few rows: read only K x D values
    (G(768, 3072, 1), 1576, 308, "cpu", "xla"),    # b = 1, many rows, 90%: windows for y, dx
    (G(768, 3072, 1), 1576, 615, "cpu", "dense"),  # b = 1, many rows, 80%: one GEMM
    (G(768, 3072, 64), 1576, 5, "cpu", "xla"),     # big blocks, 90%: batched block products
    (G(768, 3072, 64), 1576, 40, "cpu", "dense"),  # big blocks, dense enough for the GEMM
    (G(3072, 768, 16), 1576, 20, "cpu", "dense"),  # small blocks at 90%: GEMM still wins
    (G(3072, 768, 16), 1576, 2, "cpu", "xla"),     # small blocks at 99%
    (G(768, 768, 32), 8, 10, "cpu", "xla"),        # few rows, any block
    (G(768, 768, 16), 1576, 5, "gpu", "pallas"),   # GPU, full BCSR blocks
    (G(768, 768, 1), 1576, 77, "gpu", "dense"),    # GPU, scattered single diagonals
    (None, None, None, "cpu", "dense"),            # nothing known: the reference
])
def test_choose(geo, rows, k, platform, want):
  assert auto.choose(geo, rows, k, platform) == want


def test_never_picks_a_backend_it_cannot_name():
  for b in (1, 16, 32, 64, 128):
    geo = G(768, 3072, b)
    for rows in (1, 8, 63, 64, 1576):
      for k in (1, geo.P // 10, geo.P):
        assert auto.choose(geo, rows, k, "cpu") in ("dense", "xla")


def test_diag_matmul_auto_resolves_through_the_rule(rng):
  m, n, b = 64, 128, 32
  geo = G(m, n, b)
  assert ops.resolve_backend("auto", geo, 4, 1).name == auto.choose(geo, 4, 1, jax.default_backend())
  o = np.array([1], np.int32)
  v = jnp.asarray(rng.normal(size=(1, geo.D, b, b)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(4, m)), jnp.float32)
  y = jax.jit(lambda x, v: ops.diag_matmul(x, v, o, m, n, backend="auto"))(x, v)
  chex.assert_trees_all_close(y, x @ pattern.densify(v, o, m, n, b), rtol=1e-4, atol=1e-4)
