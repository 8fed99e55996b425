"""`LayerFactory`: builds each named linear layer as `nn.Dense` or `DiagDense` by config."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from dynadiag_jax import recipe as recipe_lib
from dynadiag_jax.diag_dense import DiagDense, check_settings
from dynadiag_jax.ops import KernelConfig
from dynadiag_jax.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """factory(name, features) -> a linear module called `name`.

  `sparsity` maps module names to a sparsity; names absent from it are `nn.Dense`.
  Models name linear layers by role ('mlp_in', 'attn_out', 'head', ...) so that one
  name covers the same-shaped layer of every block. `block` is an upper bound: each
  DiagDense takes the largest block size up to it that divides its kernel. `recipe` is
  every DiagDense's (`dynadiag_jax.recipe`), `mixing` every DiagDense's input permutation
  ('none' | 'stride' | 'random' | 'learned', `dynadiag_jax.mixing`). `fuse_mlp`: models run an MLP whose
  two layers are frozen block-diagonal `xla` layers as one fused op (`dynadiag_jax.mlp_block`);
  False keeps the two plain calls. Settings are checked when the factory is built.
  """
  sparsity: tuple[tuple[str, float], ...] = ()
  backend: str = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  block: int | None = None
  kernel_config: KernelConfig = KernelConfig()
  recipe: Recipe = recipe_lib.DEFAULT
  mixing: str | None = None
  fuse_mlp: bool = True

  def __post_init__(self):
    if not isinstance(self.sparsity, tuple):
      raise TypeError(f"LayerFactory.sparsity must be a tuple of (name, sparsity) pairs (use "
                      f"LayerFactory.from_dict), got {self.sparsity!r}")
    check_settings(1, 0.0, self.block, self.backend, self.recipe, mix=self.mixing)
    for name, s in self.sparsity:
      check_settings(1, s, self.block, self.backend, self.recipe, name, self.mixing)

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
                     backend=self.backend, kernel_config=self.kernel_config,
                     recipe=self.recipe, mixing=self.mixing, name=name)


def factory_for(linear: LayerFactory, dtype: Any) -> LayerFactory:
  """`linear` computing in `dtype` when the model sets one, else unchanged."""
  return linear if dtype is None else linear.replace(dtype=dtype)
