"""The learned mixing (PA-DST): Sinkhorn's soft permutation against float64 numpy, the linear
assignment against brute force, the layer against mixing='none' on permuted inputs, and the
freeze that turns the logits into a fixed `perm` (params and optimizer state)."""

from __future__ import annotations

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dynadiag_jax as dd
from dynadiag_jax import mixing


def sinkhorn64(logits: np.ndarray, tau: float, iters: int = mixing.SINKHORN_ITERS) -> np.ndarray:
  """float64 numpy Sinkhorn in the probability domain: columns, then rows."""
  p = np.exp(logits.astype(np.float64) * mixing.GAIN / tau)
  for _ in range(iters):
    p = p / p.sum(axis=0, keepdims=True)
    p = p / p.sum(axis=1, keepdims=True)
  return p


def test_soft_matches_numpy_and_is_doubly_stochastic(rng):
  m = 12
  logits = (np.asarray(mixing.logits_init(None, (m, m)))
            + 0.03 * rng.normal(size=(m, m))).astype(np.float32)
  for tau in (1.0, 0.5):
    p = np.asarray(mixing.soft(jnp.asarray(logits), tau))
    np.testing.assert_allclose(p, sinkhorn64(logits, tau), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)  # rows exact: the last step
    assert (p >= 0).all()
  p = np.asarray(mixing.soft(jnp.asarray(logits), 1.0))
  np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-2)  # columns: converged at tau = 1
  init = np.asarray(mixing.soft(mixing.logits_init(None, (m, m)), 1.0))
  np.testing.assert_allclose(np.diag(init), np.e / (np.e + 1), rtol=1e-5)  # starts near 'none'


def test_soft_hardens_to_the_hard_permutation_at_small_tau(rng):
  m = 16
  perm = rng.permutation(m)
  logits = (np.eye(m)[perm] + 0.1 * rng.uniform(size=(m, m))).astype(np.float32)
  np.testing.assert_array_equal(mixing.hard(logits), perm)
  p = np.asarray(mixing.soft(jnp.asarray(logits), 0.01))
  np.testing.assert_allclose(p, np.eye(m)[perm], atol=1e-6)
  x = rng.normal(size=(3, m)).astype(np.float32)
  np.testing.assert_allclose(mixing.soft_permute(jnp.asarray(x), jnp.asarray(p)), x[:, perm],
                             rtol=1e-6, atol=1e-6)


def test_hard_is_the_best_assignment(rng):
  for _ in range(3):
    logits = rng.normal(size=(6, 6))
    best = max(itertools.permutations(range(6)),
               key=lambda q: sum(logits[i, q[i]] for i in range(6)))
    np.testing.assert_array_equal(mixing.hard(logits), np.asarray(best))
  with pytest.raises(ValueError, match="square"):
    mixing.hard(np.zeros((3, 4)))


def _learned(rng, m=32, n=64, b=8, backend="xla"):
  layer = dd.DiagDense(n, sparsity=0.75, block=b, backend=backend, mixing="learned")
  x = jnp.asarray(rng.normal(size=(5, m)).astype(np.float32))
  v = layer.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x)
  v["params"]["alpha"] = jnp.asarray(rng.normal(size=v["params"]["alpha"].shape), jnp.float32)
  v["params"]["perm_logits"] = v["params"]["perm_logits"] + jnp.asarray(
      0.05 * rng.normal(size=(m, m)), jnp.float32)
  return layer, v, x


@pytest.mark.parametrize("backend", ["dense", "xla"])
def test_exploring_layer_is_the_plain_layer_on_softly_permuted_inputs(rng, backend):
  """y and every gradient (x, values, alpha, bias) equal mixing='none' applied to x @ P^T, P
  from float64 numpy Sinkhorn; the logits' gradient against float64 finite differences."""
  layer, v, x = _learned(rng, backend=backend)
  plain = dd.DiagDense(64, sparsity=0.75, block=8, backend=backend)
  pv = {"params": {k: a for k, a in v["params"].items() if k != "perm_logits"},
        "dynadiag": v["dynadiag"]}
  temp = 3.0  # tau = 3 / t_start
  tau = temp / dd.recipe.DEFAULT.t_start
  p64 = sinkhorn64(np.asarray(v["params"]["perm_logits"]), tau)
  dy = jnp.asarray(rng.normal(size=(5, 64)).astype(np.float32))

  y = dd.with_phase(layer, 0.5, temp).apply(v, x)
  want = dd.with_phase(plain, 0.5, temp).apply(pv, jnp.asarray(np.asarray(x) @ p64.T, jnp.float32))
  chex.assert_trees_all_close(y, want, rtol=2e-4, atol=2e-5)

  loss = lambda params, xx: jnp.sum(dd.with_phase(layer, 0.5, temp).apply(
      {**v, "params": params}, xx) * dy)
  g, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)
  xp = jnp.asarray(np.asarray(x) @ p64.T, jnp.float32)
  gp, gxp = jax.grad(lambda params, xx: jnp.sum(dd.with_phase(plain, 0.5, temp).apply(
      {**pv, "params": params}, xx) * dy), argnums=(0, 1))(pv["params"], xp)
  chex.assert_trees_all_close({k: g[k] for k in gp}, gp, rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(gx, np.asarray(gxp) @ p64, rtol=2e-4, atol=2e-5)
  # d loss / d logits along a random direction: the loss is linear in P (dL/dP = gxp^T x),
  # and P's change is a float64 central difference of numpy's Sinkhorn
  d = rng.normal(size=g["perm_logits"].shape)
  l64 = np.asarray(v["params"]["perm_logits"], np.float64)
  eps = 1e-6
  dp = (sinkhorn64(l64 + eps * d, tau) - sinkhorn64(l64 - eps * d, tau)) / (2 * eps)
  want_dir = float(np.sum((np.asarray(gxp, np.float64).T @ np.asarray(x, np.float64)) * dp))
  np.testing.assert_allclose(float(np.vdot(np.asarray(g["perm_logits"], np.float64), d)), want_dir,
                             rtol=2e-3, atol=1e-3)
  assert float(jnp.linalg.norm(g["perm_logits"])) > 0


def test_freeze_stores_the_hard_permutation_and_drops_the_logits(rng, tmp_path):
  layer, v, x = _learned(rng)
  perm = rng.permutation(32)
  v["params"]["perm_logits"] = jnp.asarray(np.eye(32)[perm] + 0.1 * rng.uniform(size=(32, 32)),
                                           jnp.float32)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(1e-3, mask=dd.optim.decay_mask))
  state = tx.init(v["params"])
  assert not dd.optim.decay_mask(v["params"])["perm_logits"]
  frozen, new_state = dd.freeze(v, state, 0.05)
  assert "perm_logits" not in frozen["params"]
  assert isinstance(frozen["dynadiag"]["perm"], dd.static.StaticArray)
  np.testing.assert_array_equal(np.asarray(frozen["dynadiag"]["perm"]), perm)
  leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(new_state)[0]]
  assert leaves and not any("perm_logits" in p for p in leaves)
  chex.assert_trees_all_equal_shapes(new_state[1][0].mu, frozen["params"])
  # at the schedule's end the soft permutation is this one: the freeze changes nothing
  y_soft = dd.with_phase(layer, 0.0, dd.recipe.DEFAULT.t_end).apply(v, x)
  chex.assert_trees_all_close(jax.jit(layer.apply)(frozen, x), y_soft, rtol=1e-5, atol=1e-5)
  # and the frozen layer densifies like any permuted one
  dense = dd.export.densify(layer, frozen)
  chex.assert_trees_all_close(dd.export.dense_model(layer).apply(dense, x), y_soft,
                              rtol=1e-5, atol=1e-5)


def test_learned_mixing_must_match_the_variables(rng):
  layer, v, x = _learned(rng)
  with pytest.raises(ValueError, match="made with mixing='learned'"):
    dd.with_phase(dd.DiagDense(64, sparsity=0.75, block=8), 0.0).apply(v, x)
  with pytest.raises(ValueError, match="made with mixing='learned'"):
    dd.with_phase(dd.DiagDense(64, sparsity=0.75, block=8, mixing="random"), 0.0).apply(v, x)
  fixed = dd.DiagDense(64, sparsity=0.75, block=8, mixing="random").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="no 'perm_logits'"):
    dd.with_phase(layer, 0.0).apply(fixed, x)


class Net(nn.Module):
  linear: dd.LayerFactory

  @nn.compact
  def __call__(self, x):
    return self.linear("b", 4)(nn.relu(self.linear("a", 32)(x)))


def test_learned_mixing_trains_and_freezes_in_a_loop(rng):
  """A user's loop: the logits move while exploring, `advance` freezes them into a perm, the
  loop goes on with the gathered optimizer state; the loss falls."""
  seed = int(rng.integers(1 << 30))
  print("seed", seed)
  f = dd.LayerFactory.from_dict({"a": 0.75, "b": 0.5}, block=4, mixing="learned", backend="xla")
  model = Net(f)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (64, 32))
  y = jnp.tanh(x[:, ::-1][:, :4] * 2.0 + jax.random.normal(k2, (64, 4)) * 0.01)
  variables = model.init(jax.random.PRNGKey(0), x)
  init_logits = variables["params"]["a"]["perm_logits"]
  sched = dd.recipe.DEFAULT.schedule(60)
  tx = optax.adam(3e-3)
  state = tx.init(variables["params"])
  losses = []

  @jax.jit(static_argnums=0)
  def loss_grad(level, temperature, variables):
    phased = dd.with_phase(model, level, temperature)
    extra = {k: a for k, a in variables.items() if k != "params"}
    return jax.value_and_grad(lambda p: jnp.mean(
        (phased.apply({**extra, "params": p}, x) - y) ** 2))(variables["params"])

  for s in range(60):
    variables, state = dd.advance(variables, state, sched, s)
    loss, g = loss_grad(float(sched.level(s)), sched.temperature(s), variables)
    if s == 0:
      assert float(jnp.abs(g["a"]["perm_logits"]).max()) > 0
    upd, state = tx.update(g, state, variables["params"])
    variables = {**variables, "params": optax.apply_updates(variables["params"], upd)}
    if s == sched.freeze_step - 1:
      assert float(jnp.abs(variables["params"]["a"]["perm_logits"] - init_logits).max()) > 1e-3
    losses.append(float(loss))
  assert "perm_logits" not in variables["params"]["a"]
  perm = np.asarray(variables["dynadiag"]["a"]["perm"])
  assert sorted(perm) == list(range(32))
  assert losses[-1] < losses[0]


def test_summary_reports_the_share_of_permuted_inputs(rng):
  layer, v, x = _learned(rng)
  perm = np.arange(32)
  perm[:8] = perm[:8][::-1]  # 8 slots read another feature
  v["params"]["perm_logits"] = jnp.asarray(np.eye(32)[perm], jnp.float32)
  calls = dd.linear_calls(layer, v, x)
  assert dd.summary.permuted(v, calls[0]) == 0.25  # exploring: the perm the freeze would keep
  frozen, _ = dd.freeze(v)
  assert dd.summary.permuted(frozen, dd.linear_calls(layer, frozen, x)[0]) == 0.25
  table = dd.summarize(layer, frozen, x)
  assert "permuted" in table.splitlines()[0] and table.splitlines()[2].rstrip().endswith("25%")
  plain = dd.DiagDense(64, sparsity=0.75, block=8)
  pv = plain.init(jax.random.PRNGKey(0), x)
  assert dd.summary.permuted(pv, dd.linear_calls(plain, pv, x)[0]) is None
