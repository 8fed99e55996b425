"""`sparsify`: the `nn.Dense` layers of an unmodified Linen model, chosen by path, as DiagDense."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from typing import Any, Iterator, Mapping

import flax
import flax.linen as nn

from dynadiag_jax import recipe as recipe_lib
from dynadiag_jax.diag_dense import COLLECTION, DiagDense, check_settings
from dynadiag_jax.ops import KernelConfig
from dynadiag_jax.recipe import Recipe


def path_of(mod: nn.Module) -> str:
  """A bound module's path in its model, 'Block_0/Dense_1' (its param path)."""
  return "/".join(str(p) for p in mod.scope.path)


def _refusal(mod: nn.Module) -> str | None:
  """Why the nn.Dense-like `mod` cannot become a DiagDense (None: it can)."""
  if type(mod) is not nn.Dense:  # pylint: disable=unidiomatic-typecheck
    if isinstance(mod, nn.Dense):
      return (f"it is a {type(mod).__name__}, a subclass of nn.Dense whose __call__ may "
              "compute something else")
    return (f"it is a {type(mod).__module__}.{type(mod).__name__} with a 'kernel', not an "
            "nn.Dense: only nn.Dense layers (one (in, out) kernel) can be made sparse")
  if mod.dot_general is not None or mod.dot_general_cls is not None:
    return "it sets dot_general / dot_general_cls (e.g. quantised): DiagDense computes its own product"
  if mod.promote_dtype is not nn.dtypes.promote_dtype:
    return "it sets a custom promote_dtype"
  return None


@dataclasses.dataclass(frozen=True)
class Sparsified:
  """`model` whose nn.Dense layers matched by `rules` run as DiagDense (see `sparsify`).

  `init` / `apply` are the model's, run under `intercepting()`; hashable (a jit static arg).
  """
  model: nn.Module
  rules: tuple[tuple[str, float], ...]
  block: int | None = None
  backend: str = "auto"
  kernel_config: KernelConfig = KernelConfig()
  recipe: Recipe = recipe_lib.DEFAULT

  def sparsity_of(self, path: str) -> float | None:
    """The sparsity of the first rule whose pattern matches `path` (None: none does)."""
    return next((s for pat, s in self.rules if fnmatch.fnmatchcase(path, pat)), None)

  def layer(self, dense: nn.Dense, sparsity: float) -> DiagDense:
    """The DiagDense that replaces the bound `dense`, in its scope (same param paths)."""
    return DiagDense(dense.features, sparsity=sparsity, block=self.block, fit_block=True,
                     use_bias=dense.use_bias, dtype=dense.dtype, param_dtype=dense.param_dtype,
                     precision=dense.precision, kernel_init=dense.kernel_init,
                     bias_init=dense.bias_init, backend=self.backend,
                     kernel_config=self.kernel_config, recipe=self.recipe, parent=dense.scope,
                     name=dense.name)

  @contextlib.contextmanager
  def intercepting(self) -> Iterator[dict[str, list[str]]]:
    """Makes every matched nn.Dense called inside the block a DiagDense; yields
    {pattern: [matched layer paths]}, filled as the model runs."""
    seen: dict[str, list[str]] = {pat: [] for pat, _ in self.rules}

    def intercept(next_fun, args, kwargs, ctx):
      mod = ctx.module
      if ctx.method_name != "__call__" or mod.scope is None:
        return next_fun(*args, **kwargs)
      path = path_of(mod)
      s = self.sparsity_of(path)
      if s is None:
        return next_fun(*args, **kwargs)
      if isinstance(mod, nn.Dense) or mod.has_variable("params", "kernel"):
        why = _refusal(mod)
        if why is not None:
          raise ValueError(f"sparsify: layer {path!r} matches pattern "
                           f"{self._pattern_of(path)!r} but cannot be made sparse: {why}; "
                           "narrow the pattern so that it leaves this layer out")
        if mod.has_variable("params", "kernel"):
          raise ValueError(f"sparsify: layer {path!r} holds an nn.Dense 'kernel': these "
                           "variables were made by the model before sparsify; init the "
                           "sparsified model (its params are alpha / values / bias)")
        seen[self._pattern_of(path)].append(path)
        try:
          return self.layer(mod, s)(*args, **kwargs)
        except flax.errors.ScopeCollectionNotFound as e:
          if f'"{COLLECTION}"' not in str(e):
            raise
          raise ValueError(
              f"sparsify: layer {path!r} cannot be made sparse: it runs inside a lifted "
              f"transform (nn.scan, nn.vmap, ...) that does not carry the '{COLLECTION}' "
              "collection, and stacked DiagDense layers are not supported (the freeze takes "
              "one layer per path); leave it out of the patterns") from None
      out = next_fun(*args, **kwargs)  # a container (its params live in its children)
      if mod.has_variable("params", "kernel"):
        raise ValueError(f"sparsify: layer {path!r} matches pattern {self._pattern_of(path)!r} "
                         f"but cannot be made sparse: {_refusal(mod)}; narrow the pattern "
                         "so that it leaves this layer out")
      return out

    with nn.intercept_methods(intercept):
      yield seen

  def _pattern_of(self, path: str) -> str:
    return next(pat for pat, _ in self.rules if fnmatch.fnmatchcase(path, pat))

  def init(self, *args, **kwargs):
    """`model.init(...)` with the matched layers sparse; every pattern must match a layer."""
    with self.intercepting() as seen:
      variables = self.model.init(*args, **kwargs)
    empty = [pat for pat, paths in seen.items() if not paths]
    if empty:
      dense = sorted(p for p in _dense_paths(self.model, *args, **kwargs))
      raise ValueError(f"sparsify: pattern(s) {empty} match no nn.Dense of "
                       f"{type(self.model).__name__}; its nn.Dense layers are {dense} "
                       "(fnmatch patterns over these paths)")
    return variables

  def apply(self, variables: Mapping[str, Any], *args, **kwargs):
    """`model.apply(variables, ...)` with the matched layers sparse."""
    with self.intercepting():
      return self.model.apply(variables, *args, **kwargs)

  def __getattr__(self, name: str):
    if name.startswith("__") or name == "model":
      raise AttributeError(name)
    return getattr(self.model, name)


def _dense_paths(model: nn.Module, *args, **kwargs) -> list[str]:
  """Paths of the nn.Dense layers `model.init(*args, **kwargs)` calls (shapes only)."""
  import jax  # pylint: disable=g-import-not-at-top
  found = set()

  def record(next_fun, a, kw, ctx):
    if ctx.method_name == "__call__" and isinstance(ctx.module, nn.Dense):
      found.add(path_of(ctx.module))
    return next_fun(*a, **kw)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(*args, **kwargs))
  return sorted(found)


def sparsify(model: nn.Module, sparsity: Mapping[str, float], *, block: int | None = None,
             backend: str = "auto", kernel_config: KernelConfig = KernelConfig(),
             recipe: Recipe = recipe_lib.DEFAULT) -> Sparsified:
  """`model` (any Linen module, unmodified) with the nn.Dense layers whose path matches a
  pattern of `sparsity` ({fnmatch pattern over 'Block_0/Dense_1': sparsity}, first match
  wins) computed as DiagDense with `recipe`.

  Each sparse layer keeps its nn.Dense settings (features, use_bias, dtype, param_dtype,
  precision, kernel_init describing the effective kernel, bias_init) and its param path:
  `.../Dense_1/{alpha, values, bias}`, the `dynadiag` collection at the same path, so
  `dd.with_phase`, `dd.advance` and `dd.freeze` work on it unchanged. `block` is an upper
  bound (each layer takes the largest valid block size up to it; None: the recipe's).
  `init` raises for a pattern that matches no nn.Dense; a matched layer that is not a plain
  nn.Dense (a DenseGeneral, Einsum, Conv, a subclass, a custom dot_general) raises naming it
  and why.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"sparsify takes a flax.linen Module, got {type(model).__name__} "
                    "(for flax.nnx models use dd.nnx.sparsify)")
  if not isinstance(sparsity, Mapping) or not sparsity:
    raise ValueError(f"sparsify takes a non-empty {{pattern: sparsity}} mapping, got {sparsity!r}")
  rules = []
  for pat, s in sparsity.items():
    if not isinstance(pat, str) or not pat:
      raise ValueError(f"sparsify: patterns are non-empty strings, got {pat!r}")
    check_settings(1, s, block, backend, recipe, pat)
    rules.append((pat, float(s)))
  return Sparsified(model, tuple(rules), block, backend, kernel_config, recipe)
