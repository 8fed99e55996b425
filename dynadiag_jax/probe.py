"""Records every linear layer a model calls: its path, kind and (m, n) shape."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax

from dynadiag_jax import mlp_block, pattern, schedules
from dynadiag_jax.diag_dense import COLLECTION, DiagDense


@dataclasses.dataclass
class LinearCall:
  """One linear module as seen in a forward pass."""
  path: tuple[str, ...]
  name: str
  sparse: bool
  m: int
  n: int
  rows: int  # rows of x per call (batch x tokens)
  use_bias: bool
  k: int  # kept diagonals (P for nn.Dense)
  k_active: int  # diagonals computed now (K after freezing; P for nn.Dense)
  frozen: bool
  block: int = 1  # block size b of a DiagDense (1 for nn.Dense)
  requested: float = 0.0  # the sparsity asked of a DiagDense (0 for nn.Dense)

  @property
  def p(self) -> int:
    return pattern.num_diagonals(self.m, self.n, self.block)

  @property
  def d(self) -> int:
    return pattern.diag_length(self.m, self.n, self.block)

  @property
  def nonzeros(self) -> int:
    """Weights the effective kernel can hold: K x D x b x b (m x n for nn.Dense)."""
    return self.k * self.d * self.block ** 2 if self.sparse else self.m * self.n


def linear_calls(model: nn.Module, variables: Any | None, *inputs, method=None,
                 **kwargs) -> list[LinearCall]:
  """Each nn.Dense / DiagDense `model` calls on `inputs`, once per module (shapes only).

  Exploring layers count the diagonals of `model`'s phase (a `with_phase` model), else of
  the phase in effect, else of a fresh one (every diagonal).
  """
  seen: dict[tuple[str, ...], LinearCall] = {}
  phase = getattr(model, "phase", None) or schedules.current_phase() or schedules.Phase()
  model = getattr(model, "module", model)

  def intercept(next_fun, args, kw, ctx):
    mod = ctx.module
    if ctx.method_name == "__call__" and isinstance(mod, (nn.Dense, DiagDense)):
      x = args[0]
      m, n = int(x.shape[-1]), int(mod.features)
      rows = math.prod(x.shape[:-1])
      if isinstance(mod, DiagDense):
        b = mod.block_for(m)
        frozen = mod.has_variable(COLLECTION, "offsets")
        if frozen:
          k = ka = int(mod.get_variable(COLLECTION, "offsets").shape[-1])
        else:
          k = pattern.num_kept(m, n, mod.sparsity, b)
          ka = schedules.k_active(pattern.num_diagonals(m, n, b), k, phase.level,
                                  phase.k_start_fraction)
        call = LinearCall(mod.path, mod.name, True, m, n, rows, mod.use_bias, k, ka, frozen, b,
                          float(mod.sparsity))
      else:
        p = pattern.num_diagonals(m, n)
        call = LinearCall(mod.path, mod.name, False, m, n, rows, mod.use_bias, p, p, False)
      if call.sparse or tuple(mod.path) not in seen:  # dd.sparsify's DiagDense replaces a Dense
        seen[tuple(mod.path)] = call
    return next_fun(*args, **kw)

  def run(fn):  # the phase entered inside the trace, where the layers read it
    def traced(*args):
      with phase.active():
        return fn(*args)
    return traced

  with mlp_block.unfused(), nn.intercept_methods(intercept):  # each layer's own call
    if variables is None:
      jax.eval_shape(run(lambda: model.init(jax.random.PRNGKey(0), *inputs, method=method,
                                            **kwargs)))
    else:
      jax.eval_shape(run(lambda v: model.apply(v, *inputs, method=method, **kwargs)), variables)
  return list(seen.values())
