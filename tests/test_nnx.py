"""Flax NNX: DiagLinear, `dd.nnx.sparsify`, the phase as module state, the freeze, orbax."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import dynadiag_jax as dd
from dynadiag_jax import nnx as ddn


class MLP(nnx.Module):
  """An NNX MLP written without dynadiag in mind: nnx.Linear layers in a list and a head."""

  def __init__(self, din: int, width: int, dout: int, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([nnx.Linear(din, width, rngs=rngs),
                            nnx.Linear(width, width, rngs=rngs)])
    self.head = nnx.Linear(width, dout, rngs=rngs)

  def __call__(self, x_BxD):
    for layer in self.blocks:
      x_BxD = nnx.relu(layer(x_BxD))
    return self.head(x_BxD)


def digits(rng: np.random.Generator):
  """sklearn's 1797 8x8 digits as 64 features in [0, 1], split 1400 / 397 by `rng`."""
  d = load_digits()
  x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
  perm = rng.permutation(len(x))
  return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def sparse_mlp(seed: int, recipe: dd.Recipe = dd.recipe.DEFAULT) -> MLP:
  return ddn.sparsify(MLP(64, 128, 10, rngs=nnx.Rngs(seed)), {"blocks/*": 0.9},
                      rngs=nnx.Rngs(seed + 1), recipe=recipe)


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def test_an_nnx_mlp_trains_through_exploration_and_freeze(diag_calls, monkeypatch, rng):
  x_tr, y_tr, x_te, y_te = digits(rng)
  seed = int(rng.integers(1 << 20))
  model = sparse_mlp(seed)
  assert sorted(ddn.exploring_layers(model)) == [("blocks", 0), ("blocks", 1)]
  assert isinstance(model.head, nnx.Linear)
  total = 300
  recipe = dd.Recipe(freeze_fraction=0.3)
  sched = recipe.schedule(total)
  tx = dd.optim.wrap(optax.adamw(optax.cosine_decay_schedule(5e-3, total), weight_decay=1e-4,
                                 mask=dd.optim.decay_mask), recipe)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  seen = diag_calls
  order = np.concatenate([rng.permutation(len(x_tr)) for _ in range(total * 64 // len(x_tr) + 1)])
  for i in range(total + 1):
    if i == sched.freeze_step:
      ddn.set_phase(model, 0.0, sched.temperature(i))
      before = model(x_te)
      mu = optimizer.opt_state[0].mu["blocks"][1]["values"][...]
      seen.clear()
    ddn.advance(model, optimizer, sched, i)
    if i == sched.freeze_step:
      assert not ddn.exploring_layers(model)
      chex.assert_trees_all_close(model(x_te), before, atol=1e-4, rtol=1e-4)
      o_K = np.asarray(model.blocks[1].offsets.get_value())
      chex.assert_trees_all_close(optimizer.opt_state[0].mu["blocks"][1]["values"][...],
                                  mu[o_K])  # Adam's moments gathered with the rows
      assert int(optimizer.step[...]) == i
    if i == total:
      break
    idx = order[i * 64:(i + 1) * 64]
    train_step(model, optimizer, x_tr[idx], y_tr[idx])
  assert seen and all(concrete for concrete, _ in seen)  # the frozen nnx.jit step runs the pattern's exact layout
  assert set(nnx.state(model, nnx.Param)["blocks"][0]) == {"values", "bias"}
  acc = float((nnx.jit(lambda m, x: m(x))(model, x_te).argmax(-1) == y_te).mean())
  print(f"sparsified NNX MLP (blocks 90% sparse), {total} steps: test accuracy {acc:.3f}")
  assert acc > 0.85


def test_from_linear_keeps_the_kernel_on_the_diagonals(rng):
  """Soft gates start at K/P and the values at P/K x the kernel: at level 1 the layer is the
  nnx.Linear it replaced; hard gates keep the kernel on the top-K diagonals of alpha."""
  x = jnp.asarray(rng.normal(size=(4, 12)), jnp.float32)
  lin = nnx.Linear(12, 20, rngs=nnx.Rngs(int(rng.integers(1 << 20))))
  lin.bias[...] = jnp.asarray(rng.normal(size=20), jnp.float32)
  soft = ddn.DiagLinear.from_linear(lin, 0.75, rngs=nnx.Rngs(0), recipe=dd.recipe.PAPER)
  ddn.set_phase(soft, 1.0, 5.0)
  chex.assert_trees_all_close(soft(x), lin(x), atol=1e-5, rtol=1e-5)
  hard = ddn.DiagLinear.from_linear(lin, 0.75, rngs=nnx.Rngs(0))
  ddn.set_phase(hard, 1.0, 5.0)
  o_K = np.asarray(dd.gates.topk_indices(hard.alpha[...], 5))  # K = ceil(0.25 * 20)
  mask = dd.pattern.densify(jnp.ones((5, 12)), o_K, 12, 20)
  chex.assert_trees_all_close(hard(x), x @ (lin.kernel[...] * mask) + lin.bias[...],
                              atol=1e-5, rtol=1e-5)


def test_diag_linear_is_diag_dense(rng):
  """DiagLinear's variables through the Linen DiagDense give its output, at any phase."""
  layer = ddn.DiagLinear(16, 24, 0.8, rngs=nnx.Rngs(int(rng.integers(1 << 20))), block=4)
  x = jnp.asarray(rng.normal(size=(3, 16)), jnp.float32)
  layer.alpha[...] = jnp.asarray(rng.normal(size=layer.alpha.shape), jnp.float32)
  for level in (1.0, 0.5, 0.0):
    ddn.set_phase(layer, level, 0.7)
    want = dd.with_phase(layer.layer, level, 0.7).apply(layer.variables(), x)
    chex.assert_trees_all_equal(layer(x), want)
  with dd.Phase(0.0, 0.7).active():  # a context phase overrides the module's
    ddn.set_phase(layer, 1.0, 5.0)
    chex.assert_trees_all_equal(layer(x), want)


def test_the_phase_is_module_state_and_a_forgotten_one_is_an_error(rng):
  model = sparse_mlp(int(rng.integers(1 << 20)))
  x = jnp.asarray(rng.normal(size=(2, 64)), jnp.float32)
  with pytest.raises(dd.PhaseError, match="'blocks/0' is exploring"):
    model(x)
  ddn.set_phase(model, 0.5, 2.0)
  assert model.blocks[1].level == 0.5 and float(model.blocks[1].temperature[...]) == 2.0
  traces = []
  f = nnx.jit(lambda m, x: (traces.append(1), m(x))[1])
  f(model, x)
  ddn.set_phase(model, 0.5, 1.0)  # a new temperature: no new trace
  f(model, x)
  ddn.set_phase(model, 0.0, 1.0)  # a new level: one new trace
  f(model, x)
  assert len(traces) == 2


def test_orbax_round_trip_of_exploring_and_frozen_models(diag_calls, tmp_path, monkeypatch, rng):
  seed = int(rng.integers(1 << 20))
  model = sparse_mlp(seed)
  x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
  for layer in (model.blocks[0], model.blocks[1]):
    layer.alpha[...] = jnp.asarray(rng.normal(size=layer.alpha.shape), jnp.float32)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "exploring", dd.static.savable(nnx.state(model)))
  ddn.freeze(model, temperature=0.2)
  ckpt.save(tmp_path / "frozen", dd.static.savable(nnx.state(model)))
  ckpt.wait_until_finished()

  graphdef, target = nnx.split(nnx.eval_shape(lambda: sparse_mlp(0)))
  exploring = nnx.merge(graphdef, ckpt.restore(tmp_path / "exploring", target))
  assert ddn.exploring_layers(exploring)
  abstract = nnx.eval_shape(lambda: sparse_mlp(0))
  ddn.freeze(abstract)  # the frozen structure, shapes only
  graphdef, target = nnx.split(abstract)
  frozen = nnx.merge(graphdef, ddn.restored(ckpt.restore(tmp_path / "frozen", target)))
  chex.assert_trees_all_equal(dd.static.savable(nnx.state(frozen)),
                              dd.static.savable(nnx.state(model)))
  seen = diag_calls
  apply = nnx.jit(lambda m, x: m(x))
  chex.assert_trees_all_equal(apply(frozen, x), apply(model, x))
  assert seen and all(concrete for concrete, _ in seen)
  ddn.freeze(exploring, temperature=0.2)  # the exploring checkpoint freezes to the same model
  chex.assert_trees_all_equal(exploring(x), model(x))


def test_sparsify_errors_and_shared_layers(rng):
  model = MLP(8, 16, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\['block/\*'\] match no nnx.Linear of MLP; its "
                     r"nnx.Linear layers are \['blocks/0', 'blocks/1', 'head'\]"):
    ddn.sparsify(model, {"block/*": 0.5}, rngs=nnx.Rngs(0))

  class Odd(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
      self.head = nnx.Linear(8, 4, rngs=rngs)

  with pytest.raises(ValueError, match="layer 'proj' matches pattern '\\*'.*LinearGeneral"):
    ddn.sparsify(Odd(nnx.Rngs(0)), {"*": 0.5}, rngs=nnx.Rngs(0))

  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(8, 8, rngs=rngs)
      self.b = self.a  # one layer at two paths

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  tied = ddn.sparsify(Tied(nnx.Rngs(0)), {"a": 0.5}, rngs=nnx.Rngs(0))
  assert isinstance(tied.a, ddn.DiagLinear) and tied.b is tied.a
  ddn.set_phase(tied, 0.0, 1.0)
  tied(jnp.ones((1, 8)))


def test_flax_nnx_is_imported_only_with_dd_nnx():
  code = ("import sys, dynadiag_jax as dd, dynadiag_jax.sparsify\n"
          "assert 'flax.nnx' not in sys.modules, 'dynadiag_jax imported flax.nnx'\n"
          "import dynadiag_jax.nnx\n"
          "assert dd.nnx.DiagLinear and 'flax.nnx' in sys.modules\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
