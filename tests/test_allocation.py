"""Per-layer allocation meets the global budget within one diagonal per layer."""

import flax.linen as nn
import jax.numpy as jnp
import pytest

import dynadiag_jax as dd
from dynadiag_jax import allocation, pattern


class Tower(nn.Module):
  """Layers of very different shapes, two sharing a name, one applied to fewer rows."""
  linear: dd.LayerFactory = dd.LayerFactory()

  @nn.compact
  def __call__(self, x_BxTxD):
    h = nn.relu(self.linear("up", 300)(x_BxTxD))
    h = nn.relu(self.linear("mid", 300)(h))
    h = nn.relu(Sub(self.linear, name="sub")(h))
    pooled = h.mean(axis=1)  # fewer rows from here on
    return self.linear("head", 17)(nn.relu(self.linear("pool", 64)(pooled)))


class Sub(nn.Module):
  linear: dd.LayerFactory

  @nn.compact
  def __call__(self, h):
    return self.linear("mid", 300)(h)


NAMES = ["up", "mid", "pool", "head"]


@pytest.fixture(scope="module")
def calls():
  return dd.linear_calls(Tower(), None, jnp.ones((2, 8, 40)))


def test_linear_calls_groups(calls):
  got = {(c.path, c.m, c.n, c.rows) for c in calls}
  assert got == {(("up",), 40, 300, 16), (("mid",), 300, 300, 16), (("sub", "mid"), 300, 300, 16),
                 (("pool",), 300, 64, 2), (("head",), 64, 17, 2)}


def _budget_report(calls, sparsities, sparsity):
  """Stored weights of the layers in `sparsities` against the (1 - sparsity) budget."""
  groups = allocation._group(calls, sparsities)  # pylint: disable=protected-access
  stored = sum(g["count"] * pattern.num_kept(g["m"], g["n"], sparsities[k])
               * pattern.diag_length(g["m"], g["n"]) for k, g in groups.items())
  dense = sum(g["count"] * g["m"] * g["n"] for g in groups.values())
  slack = sum(g["count"] * pattern.diag_length(g["m"], g["n"]) for g in groups.values())
  return dict(stored=stored, budget=(1.0 - sparsity) * dense, dense=dense, slack=slack)


@pytest.mark.parametrize("method", allocation.METHODS)
@pytest.mark.parametrize("s", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_budget_met_within_one_diagonal_per_layer(calls, method, s):
  sp = allocation.allocate(calls, s, NAMES, method)
  assert set(sp) == set(NAMES) and all(0 <= v < 1 for v in sp.values())
  r = _budget_report(calls, sp, s)
  assert r["budget"] <= r["stored"] + 1e-6 or all(v == 0 for v in sp.values())
  assert abs(r["stored"] - r["budget"]) <= r["slack"]


def test_methods_differ_as_designed(calls):
  uni = allocation.allocate(calls, 0.9, NAMES, "uniform")
  assert set(uni.values()) == {0.9}
  erk = allocation.allocate(calls, 0.9, NAMES, "erk")
  assert erk["head"] < erk["mid"]  # small layers kept denser
  cf = allocation.allocate(calls, 0.9, NAMES, "compute_fraction")
  assert cf["pool"] > cf["mid"]  # layers on fewer rows are sparser
  assert cf["up"] == pytest.approx(cf["mid"])


def test_bad_input(calls):
  with pytest.raises(ValueError, match="sparsity"):
    allocation.allocate(calls, 1.0, NAMES)
  with pytest.raises(ValueError, match="unknown allocation"):
    allocation.allocate(calls, 0.9, NAMES, "magic")
  with pytest.raises(ValueError, match="no linear layer"):
    allocation.allocate(calls, 0.9, ["nope"])


def test_one_sparsity_per_name_needs_one_shape():
  class Bad(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, name="a")(Inner(name="i")(x))

  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(7, name="a")(x)

  with pytest.raises(ValueError, match="shapes"):
    allocation.allocate(dd.linear_calls(Bad(), None, jnp.ones((1, 3))), 0.9, ["a"])
