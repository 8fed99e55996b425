"""MLP classifier: flatten, hidden linears 'fc1', 'fc2', ... with ReLU, linear 'head'."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax.layers import LayerFactory, factory_for


def unit_permutation(i: int, n: int) -> np.ndarray:
  """The fixed permutation of the n input units of the i-th linear (the same in every run)."""
  return np.random.default_rng(1000 + i).permutation(n)


def hidden_roles(hidden: Sequence[int]) -> tuple[str, ...]:
  """('fc1', ..., 'fcN') for N hidden layers."""
  return tuple(f"fc{i + 1}" for i in range(len(hidden)))


class MLP(nn.Module):
  """Images (B, ...) -> logits (B, num_classes) through ReLU hidden layers."""
  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  dropout: float = 0.0
  dtype: Any = None
  permute: bool = False  # every linear reads its inputs in a fixed random order (unit_permutation)
  linear: LayerFactory = LayerFactory()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    lin = factory_for(self.linear, self.dtype)
    x_BxF = x.reshape(x.shape[0], -1)
    if self.dtype is not None:
      x_BxF = x_BxF.astype(self.dtype)
    shuffle = lambda i, x: x[:, unit_permutation(i, x.shape[1])] if self.permute else x
    for i, (role, h) in enumerate(zip(hidden_roles(self.hidden), self.hidden)):
      x_BxF = nn.relu(lin(role, int(h))(shuffle(i, x_BxF)))
      x_BxF = nn.Dropout(self.dropout)(x_BxF, deterministic=not train)
    return lin("head", self.num_classes)(shuffle(len(self.hidden), x_BxF)).astype(jnp.float32)
