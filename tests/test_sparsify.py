"""`dd.sparsify`: the nn.Dense layers of an unmodified Linen model made sparse by path."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import dynadiag_jax as dd
from dynadiag_jax.sparsify import sparsify


class Tower(nn.Module):
  """Two ReLU nn.Dense layers: a block as users write it."""
  width: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(self.width)(nn.relu(nn.Dense(self.width)(x))))


class DigitsCNN(nn.Module):
  """A small CNN written without dynadiag in mind: conv, a nested tower of nn.Dense, a head."""

  @nn.compact
  def __call__(self, x_BxHxWx1):
    h = nn.relu(nn.Conv(16, (3, 3), name="conv")(x_BxHxWx1))
    h = nn.avg_pool(h, (2, 2), (2, 2)).reshape(x_BxHxWx1.shape[0], -1)
    return nn.Dense(10, name="head")(Tower(128, name="tower")(h))


def digits(rng: np.random.Generator):
  """sklearn's 1797 8x8 digits, scaled to [0, 1], split 1400 / 397 by `rng`."""
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  perm = rng.permutation(len(x))
  return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def test_an_unmodified_linen_cnn_trains_through_exploration_and_freeze(diag_calls, monkeypatch, rng):
  """The README loop on a sparsified model: phase reaches the layers, the freeze keeps the
  function, the frozen step runs concrete offsets, the accuracy is that of a trained model."""
  x_tr, y_tr, x_te, y_te = digits(rng)
  sp = sparsify(DigitsCNN(), {"tower/*": 0.9})
  variables = sp.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x_tr[:1])
  assert sorted(dd.exploring_layers(variables)) == [("tower", "Dense_0"), ("tower", "Dense_1")]
  assert set(variables["params"]["tower"]["Dense_0"]) == {"alpha", "values", "bias"}
  assert set(variables["params"]["conv"]) == {"kernel", "bias"}

  total = 300
  recipe = dd.Recipe(freeze_fraction=0.3)
  sched = recipe.schedule(total)
  tx = dd.optim.wrap(optax.adamw(optax.cosine_decay_schedule(5e-3, total), weight_decay=1e-4,
                                 mask=dd.optim.decay_mask), recipe)
  opt_state = tx.init(variables["params"])

  @functools.partial(jax.jit, static_argnums=0)
  def step(level, variables, opt_state, x, y, i):
    net = dd.with_phase(sp, level, sched.temperature(i), sched.k_start_fraction)

    def loss_fn(params):
      logits = net.apply({**variables, "params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return {**variables, "params": optax.apply_updates(variables["params"], updates)}, opt_state, loss

  seen = diag_calls
  order = np.concatenate([rng.permutation(len(x_tr)) for _ in range(total * 64 // len(x_tr) + 1)])
  for i in range(total + 1):
    if i == sched.freeze_step:
      before = dd.with_phase(sp, 0.0, sched.temperature(i)).apply(variables, x_te)
      seen.clear()
    variables, opt_state = dd.advance(variables, opt_state, sched, i)
    if i == sched.freeze_step:
      assert not dd.exploring_layers(variables)
      chex.assert_trees_all_close(sp.apply(variables, x_te), before, atol=1e-4, rtol=1e-4)
    if i == total:
      break
    idx = order[i * 64:(i + 1) * 64]
    variables, opt_state, loss = step(sched.level(i), variables, opt_state, x_tr[idx], y_tr[idx], i)
  assert seen and all(concrete for concrete, _ in seen)  # the frozen step's exact layouts
  assert {k for _, k in seen} == {26, 13}  # K = ceil(0.1 P): P = 256, then 128
  acc = float((jax.jit(sp.apply)(variables, x_te).argmax(-1) == y_te).mean())
  print(f"sparsified DigitsCNN (tower 90% sparse), {total} steps: test accuracy {acc:.3f}")
  assert acc > 0.85


def test_a_sparsified_dense_is_the_diag_dense_it_stands_for(rng):
  """Same init (the Dense's kernel_init describes the effective kernel) and same function as
  a DiagDense written by hand at the same path, exploring and frozen."""

  class Mine(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="head")(nn.relu(nn.Dense(24, name="fc")(x)))

  class Theirs(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = dd.DiagDense(24, sparsity=0.75, fit_block=True,
                       kernel_init=nn.initializers.lecun_normal(), name="fc")(x)
      return nn.Dense(8, name="head")(nn.relu(h))

  x = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  sp = sparsify(Mine(), {"fc": 0.75})
  v = sp.init(key, x)
  chex.assert_trees_all_equal(v, dd.with_phase(Theirs(), 1.0, 5.0).init(key, x))
  v["params"] = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), v["params"])
  for level in (1.0, 0.5, 0.0):
    chex.assert_trees_all_equal(dd.with_phase(sp, level, 0.3).apply(v, x),
                                dd.with_phase(Theirs(), level, 0.3).apply(v, x))
  frozen, _ = dd.freeze(v)
  chex.assert_trees_all_equal(sp.apply(frozen, x), Theirs().apply(frozen, x))


def test_the_phase_reaches_layers_in_nested_shared_and_rematted_modules(diag_calls, monkeypatch, rng):
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(16)
      return d(nn.relu(d(x)))  # one layer called twice

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.remat(Shared)(name="body")(nn.Dense(16, name="stem")(x))
      return nn.Dense(3)(x)

  x = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
  sp = sparsify(Net(), {"body/*": 0.75})
  v = sp.init(jax.random.PRNGKey(0), x)
  assert dd.exploring_layers(v) == [("body", "Dense_0")]
  with pytest.raises(dd.PhaseError, match="'body/Dense_0' is exploring"):
    sp.apply(v, x)
  seen = diag_calls
  k, p = 4, 16
  for level, want in ((0.5, k + round(0.5 * (p - k))), (0.0, k)):
    seen.clear()
    dd.with_phase(sp, level, 1.0).apply(v, x)
    assert [kk for _, kk in seen] == [want, want]
  frozen, _ = dd.freeze(v)
  chex.assert_trees_all_close(sp.apply(frozen, x), dd.with_phase(sp, 0.0, 1.0).apply(v, x),
                              atol=1e-5, rtol=1e-5)


class Mixed(nn.Module):
  """nn.Dense beside layers that are not one: a conv, a DenseGeneral, an Einsum."""
  kind: str = "conv"

  @nn.compact
  def __call__(self, x):
    if self.kind == "conv":
      x = nn.Conv(4, (3,), name="conv")(x[..., None]).reshape(x.shape[0], -1)
    elif self.kind == "general":
      x = nn.DenseGeneral(8, name="proj")(x)
    elif self.kind == "einsum":
      x = nn.Einsum((x.shape[-1], 8), "bi,io->bo", name="proj")(x)
    elif self.kind == "subclass":
      x = MyDense(8, name="proj")(x)
    elif self.kind == "quantised":
      x = nn.Dense(8, dot_general=jax.lax.dot_general, name="proj")(x)
    return nn.Dense(4, name="head")(x)


class MyDense(nn.Dense):
  pass


@pytest.mark.parametrize("kind, layer, why", [
    ("conv", "conv", "Conv with a 'kernel', not an nn.Dense"),
    ("general", "proj", "DenseGeneral with a 'kernel', not an nn.Dense"),
    ("einsum", "proj", "Einsum with a 'kernel', not an nn.Dense"),
    ("subclass", "proj", "MyDense, a subclass of nn.Dense"),
    ("quantised", "proj", "dot_general"),
])
def test_a_matched_layer_that_cannot_be_sparse_is_named_with_the_reason(kind, layer, why, rng):
  x = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
  with pytest.raises(ValueError, match=f"layer '{layer}' matches pattern '\\*'.*{why}"):
    sparsify(Mixed(kind), {"*": 0.5}).init(jax.random.PRNGKey(0), x)
  v = sparsify(Mixed(kind), {"head": 0.5}).init(jax.random.PRNGKey(0), x)  # narrowed: fine
  assert dd.exploring_layers(v) == [("head",)]


class ScanLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(16)(x)), None


class Scanned(nn.Module):
  """Three layers stacked by nn.scan over 'params' only, as scanned models are written."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = scan(name="stack")(x, None)
    return nn.Dense(3, name="head")(x)


def test_mistakes_get_one_clear_error(rng):
  with pytest.raises(ValueError, match="'stack/Dense_0' cannot be made sparse: it runs inside "
                     "a lifted transform"):
    sparsify(Scanned(), {"stack/*": 0.75}).init(jax.random.PRNGKey(0), jnp.ones((2, 16)))
  x = jnp.asarray(rng.normal(size=(2, 64, 1)), jnp.float32).reshape(2, 8, 8, 1)
  with pytest.raises(ValueError, match=r"\['towr/\*'\] match no nn.Dense of DigitsCNN; its "
                     r"nn.Dense layers are \['head', 'tower/Dense_0', 'tower/Dense_1'\]"):
    sparsify(DigitsCNN(), {"towr/*": 0.9}).init(jax.random.PRNGKey(0), x)
  dense_vars = DigitsCNN().init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="'head' holds an nn.Dense 'kernel'"):
    sparsify(DigitsCNN(), {"head": 0.5}).apply(dense_vars, x)
  with pytest.raises(ValueError, match="sparsity"):
    sparsify(DigitsCNN(), {"head": 1.5})
  with pytest.raises(TypeError, match="dd.nnx.sparsify"):
    sparsify(object(), {"head": 0.5})
