"""The quick start trains a 90%-sparse DiagDense MLP to within 3 points of nn.Dense."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp

import dynadiag_jax as dd

_spec = importlib.util.spec_from_file_location(
    "quickstart", Path(__file__).resolve().parents[1] / "examples" / "quickstart.py")
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)


def test_quickstart_matches_dense_within_three_points():
  data = quickstart.load_mnist5k(0)
  x0 = data[0][:1]
  model = quickstart.sparse_mlp(0.9)
  assert model.linear.backend == "auto"  # the default backend, as a user gets it
  acc, variables = quickstart.train(model, data, 3000, recipe=dd.recipe.DEFAULT)
  dense_acc, _ = quickstart.train(quickstart.MLP(), data, 3000)
  t = dd.totals(model, variables, jnp.asarray(x0))
  print(f"dense {dense_acc:.4f}  diag {acc:.4f}  sparsity {t['sparsity']:.4f}")
  assert dd.exploring_layers(variables) == []  # frozen: K-diagonal layers only
  assert t["sparsity"] >= 0.9 - 0.01
  assert dense_acc > 0.9
  assert acc >= dense_acc - 0.03
