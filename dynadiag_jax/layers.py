"""`LayerFactory`: builds each named linear layer as `nn.Dense` or `DiagDense` by config."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from dynadiag_jax import gates
from dynadiag_jax.diag_dense import DEFAULT_TEMPERATURE, DiagDense
from dynadiag_jax.ops import KernelConfig


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """factory(name, features) -> a linear module called `name`.

  `sparsity` maps module names to a sparsity; names absent from it are `nn.Dense`.
  Models name linear layers by role ('mlp_in', 'attn_out', 'head', ...) so that one
  name covers the same-shaped layer of every block. `block` is an upper bound: each
  DiagDense takes the largest block size up to it that divides its kernel. `level`,
  `k_start_fraction` and `temperature` are the exploration phase every DiagDense runs in
  (`DiagDense`; set them with `dynadiag_jax.with_phase`).
  """
  sparsity: tuple[tuple[str, float], ...] = ()
  backend: str = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  block: int = 1
  kernel_config: KernelConfig = KernelConfig()
  gate: str = gates.DEFAULT
  level: float = 1.0
  k_start_fraction: float = 1.0
  temperature: Any = DEFAULT_TEMPERATURE
  alpha_spread: float = 1e-3
  shadow_init: str = "random"

  @classmethod
  def from_dict(cls, sparsity: Mapping[str, float], **kw) -> "LayerFactory":
    """A factory from a {name: sparsity} dict."""
    return cls(tuple(sorted((str(k), float(v)) for k, v in sparsity.items())), **kw)

  def replace(self, **kw) -> "LayerFactory":
    return dataclasses.replace(self, **kw)

  def __call__(self, name: str, features: int, use_bias: bool = True,
               kernel_init: nn.initializers.Initializer | None = None) -> nn.Module:
    s = dict(self.sparsity).get(name)
    if s is None:
      kw = {} if kernel_init is None else {"kernel_init": kernel_init}
      return nn.Dense(features, use_bias=use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name, **kw)
    return DiagDense(features, sparsity=s, block=self.block, fit_block=True, use_bias=use_bias,
                     dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kernel_init,
                     backend=self.backend, kernel_config=self.kernel_config, gate=self.gate,
                     level=self.level, k_start_fraction=self.k_start_fraction,
                     temperature=self.temperature, alpha_spread=self.alpha_spread,
                     shadow_init=self.shadow_init, name=name)


def factory_for(linear: LayerFactory, dtype: Any) -> LayerFactory:
  """`linear` computing in `dtype` when the model sets one, else unchanged."""
  return linear if dtype is None else linear.replace(dtype=dtype)
