"""Flax NNX: `DiagLinear` (a drop-in for `nnx.Linear`), `sparsify`, the phase, the freeze.

`DiagLinear` computes exactly what `DiagDense` computes (it applies one, built once, to its
own NNX variables). The exploration phase is module state: `set_phase` / `advance` set it on
every layer (a context `Phase.active()` overrides it). Imported on first use of `dd.nnx`.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynadiag_jax import pattern, phases, schedules
from dynadiag_jax import recipe as recipe_lib
from dynadiag_jax.diag_dense import COLLECTION, DiagDense, check_settings
from dynadiag_jax.ops import KernelConfig
from dynadiag_jax.recipe import Recipe
from dynadiag_jax.static import StaticArray

Path = tuple[Any, ...]


class DiagPattern(nnx.Variable):
  """A DiagLinear's pattern bookkeeping, never trained: `k`, `gate`; frozen, `offsets`
  (a `static.StaticArray`: static under `nnx.jit`, see `dd.static.savable` for checkpoints)."""


class PhaseState(nnx.Variable):
  """An exploring DiagLinear's temperature (set by `set_phase`; may change without a retrace)."""


class DiagLinear(nnx.Module):
  """y = x @ W + b with W a sum of K selected wrapped (block-)diagonals: `nnx.Linear`'s
  drop-in, the `DiagDense` of docs/DESIGN.md section 3 as an NNX module.

  Exploring: `nnx.Param`s `alpha` (P,), `values` (P, D[, b, b]), `bias` (n,); `DiagPattern`s
  `k` and `gate`; the phase: `level` (a static attribute: a new level is a new trace) and
  `temperature` (`PhaseState`), set by `set_phase` / `advance` (a `Phase.active()` context
  overrides them). Called without a phase it raises `PhaseError`. Frozen (`freeze`): `values`
  (K, D[, b, b]), `bias`, and `offsets` (a `DiagPattern` holding a static `StaticArray`).
  `kernel_init` describes the effective kernel, as in `nnx.Linear` (None: `nn.Dense`'s variance).
  """

  def __init__(self, in_features: int, out_features: int, sparsity: float = 0.9, *,
               rngs: nnx.Rngs, block: int | None = None, fit_block: bool = False, use_bias: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Any = None, bias_init: Any = nnx.initializers.zeros_init(),
               alpha_init: Any = None, backend: str = "auto",
               kernel_config: KernelConfig = KernelConfig(),
               recipe: Recipe = recipe_lib.DEFAULT, name: str | None = None):
    check_settings(in_features, sparsity, block, backend, recipe, name)
    if recipe.cover or recipe.mixing != "none":
      raise ValueError("dd.nnx.DiagLinear does not support recipe.cover or recipe.mixing (the "
                       "Linen DiagDense does): use a recipe with cover=False, mixing='none'")
    self.in_features, self.out_features = int(in_features), int(out_features)
    self.layer = DiagDense(out_features, sparsity=sparsity, block=block, fit_block=fit_block,
                           use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                           precision=precision, kernel_init=kernel_init, bias_init=bias_init,
                           alpha_init=alpha_init, backend=backend, kernel_config=kernel_config,
                           recipe=recipe, name=name)
    x_1xM = jnp.zeros((1, self.in_features), param_dtype)
    with schedules.Phase().active():  # init computes every diagonal
      v = self.layer.init(rngs.params(), x_1xM)
    params, col = v["params"], v[COLLECTION]
    self.alpha = nnx.Param(params["alpha"])
    self.values = nnx.Param(params["values"])
    self.bias = nnx.Param(params["bias"]) if use_bias else nnx.data(None)
    self.k, self.gate = DiagPattern(col["k"]), DiagPattern(col["gate"])
    self.level: float | None = None
    self.k_start_fraction = 1.0
    self.temperature = PhaseState(jnp.asarray(recipe.t_start, jnp.float32))

  @classmethod
  def from_linear(cls, linear: nnx.Linear, sparsity: float, *, rngs: nnx.Rngs,
                  **kw) -> "DiagLinear":
    """A DiagLinear whose values are `linear`'s kernel on the diagonals (scaled by the gate's
    init gain, so the kept diagonals compute what they did) and whose bias is its bias."""
    why = refusal(linear)
    if why is not None:
      raise ValueError(f"DiagLinear.from_linear: {why}")
    kernel_MxN = linear.kernel[...]
    bias = None if linear.bias is None else linear.bias[...]
    kw = {"use_bias": bias is not None, "dtype": linear.dtype,
          "param_dtype": linear.param_dtype, "precision": linear.precision, **kw}
    layer = cls(linear.in_features, linear.out_features, sparsity, rngs=rngs,
                kernel_init=lambda key, shape, dtype=jnp.float32: kernel_MxN.astype(dtype),
                bias_init=lambda key, shape, dtype=jnp.float32: bias.astype(dtype), **kw)
    # the initialisers held the old kernel: drop them (used at init only) so that it can go
    layer.layer = layer.layer.clone(kernel_init=None, bias_init=nnx.initializers.zeros_init())
    return layer

  @property
  def exploring(self) -> bool:
    """Whether the layer still learns its diagonals (not frozen)."""
    return "offsets" not in vars(self)

  def variables(self) -> dict[str, dict[str, Any]]:
    """The layer's DiagDense variables ({'params', 'dynadiag'}) as a Linen model holds them."""
    params = {"values": self.values[...]}
    if self.bias is not None:
      params["bias"] = self.bias[...]
    m = np.asarray(self.in_features, np.int32)
    if not self.exploring:
      return {"params": params,
              COLLECTION: {"offsets": self.offsets.get_value(), "in_features": StaticArray(m)}}
    params["alpha"] = self.alpha[...]
    return {"params": params,
            COLLECTION: {"k": self.k[...], "in_features": m, "gate": self.gate[...]}}

  def phase(self) -> schedules.Phase | None:
    """The phase the layer runs in: the context's, else its own (None when never set)."""
    phase = schedules.current_phase()
    if phase is None and self.level is not None:
      phase = schedules.Phase(self.level, self.temperature[...], self.k_start_fraction)
    return phase

  def __call__(self, x: jax.Array) -> jax.Array:
    phase = self.phase()
    if self.exploring and phase is None:
      raise schedules.PhaseError(
          f"DiagLinear {self.layer.name or ''!r} is exploring and was called without a phase: "
          "call dd.nnx.advance(model, optimizer, sched, step) (or dd.nnx.set_phase(model, "
          "level, temperature)) before each step, or freeze it first (dd.nnx.freeze)")
    with phase.active() if phase is not None else contextlib.nullcontext():
      return self.layer.apply(self.variables(), x)


def refusal(mod: Any) -> str | None:
  """Why `mod` (matched by a sparsify pattern) cannot become a DiagLinear (None: it can)."""
  if type(mod) is not nnx.Linear:  # pylint: disable=unidiomatic-typecheck
    if isinstance(mod, nnx.Linear):
      return f"it is a {type(mod).__name__}, a subclass of nnx.Linear whose __call__ may differ"
    return (f"it is a {type(mod).__module__}.{type(mod).__name__} with a 'kernel', not an "
            "nnx.Linear: only nnx.Linear layers (one (in, out) kernel) can be made sparse")
  if mod.dot_general is not jax.lax.dot_general:
    return "it sets dot_general (e.g. quantised): DiagLinear computes its own product"
  if getattr(mod, "preferred_element_type", None) is not None:
    return "it sets preferred_element_type"
  from flax.nnx.nn import dtypes  # pylint: disable=g-import-not-at-top
  if mod.promote_dtype is not dtypes.promote_dtype:
    return "it sets a custom promote_dtype"
  return None


def _path_str(path: Path) -> str:
  return "/".join(str(p) for p in path)


def diag_layers(model: nnx.Module) -> list[tuple[Path, DiagLinear]]:
  """(path, layer) of every DiagLinear in `model`, shared layers once."""
  return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, DiagLinear)]


def exploring_layers(model: nnx.Module) -> list[Path]:
  """Paths of the DiagLinear layers of `model` that still learn their diagonals."""
  return [p for p, m in diag_layers(model) if m.exploring]


def _set_at(model: nnx.Module, path: Path, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = getattr(parent, key) if isinstance(key, str) and not isinstance(parent, Mapping) \
        else parent[key]
  key = path[-1]
  if isinstance(key, str) and not isinstance(parent, Mapping):
    setattr(parent, key, new)
  else:
    parent[key] = new


def sparsify(model: nnx.Module, sparsity: Mapping[str, float], *, rngs: nnx.Rngs,
             **kw) -> nnx.Module:
  """`model` with, in place, every `nnx.Linear` whose path ('blocks/0/mlp', attribute names
  and indices) matches a pattern of `sparsity` ({fnmatch pattern: sparsity}, first match
  wins) replaced by a `DiagLinear.from_linear` (its kernel on the diagonals, its bias);
  `kw` go to DiagLinear (recipe, block, backend, ...). Returns `model`.

  Raises for a pattern that matches no nnx.Linear, and for a matched layer that cannot be
  replaced (another linear module with a 'kernel', a subclass, a custom dot_general).
  """
  if not isinstance(sparsity, Mapping) or not sparsity:
    raise ValueError(f"sparsify takes a non-empty {{pattern: sparsity}} mapping, got {sparsity!r}")
  rules = tuple((str(p), s) for p, s in sparsity.items())
  for pat, s in rules:
    check_settings(1, s, kw.get("block"), kw.get("backend", "auto"),
                   kw.get("recipe", recipe_lib.DEFAULT), pat)
  targets: dict[int, DiagLinear] = {}
  matched: dict[str, list[str]] = {pat: [] for pat, _ in rules}
  linears = []
  for path, mod in nnx.iter_modules(model):
    where = _path_str(path)
    if isinstance(mod, nnx.Linear):
      linears.append(where)
    pat = next((p for p, _ in rules if fnmatch.fnmatchcase(where, p)), None)
    if pat is None or not (isinstance(mod, nnx.Linear) or hasattr(mod, "kernel")):
      continue
    why = refusal(mod)
    if why is not None:
      raise ValueError(f"sparsify: layer {where!r} matches pattern {pat!r} but cannot be made "
                       f"sparse: {why}; narrow the pattern so that it leaves this layer out")
    if not path:
      raise ValueError("sparsify: the model itself is an nnx.Linear; build "
                       "DiagLinear.from_linear(model, sparsity, rngs=...) instead")
    matched[pat].append(where)
    targets[id(mod)] = DiagLinear.from_linear(mod, dict(rules)[pat], rngs=rngs, name=where, **kw)
  empty = [pat for pat, paths in matched.items() if not paths]
  if empty:
    raise ValueError(f"sparsify: pattern(s) {empty} match no nnx.Linear of "
                     f"{type(model).__name__}; its nnx.Linear layers are {sorted(linears)}")
  while True:  # a shared layer is reachable by several paths: replace each of them
    todo = [(p, m) for p, m in nnx.iter_modules(model) if id(m) in targets]
    if not todo:
      return model
    for path, mod in todo:
      _set_at(model, path, targets[id(mod)])


def set_phase(model: nnx.Module, level: float, temperature: Any = schedules.DEFAULT_TEMPERATURE,
              k_start_fraction: float = 1.0) -> None:
  """Sets the phase (`schedules.Phase`) of every exploring DiagLinear of `model`, in place.

  `level` (`Schedule.level(step)`) is a static attribute: `nnx.jit` retraces once per level;
  the temperature (`Schedule.temperature(step)`) is a `PhaseState` and does not retrace.
  """
  phase = schedules.Phase(level, temperature, k_start_fraction)
  for _, layer in diag_layers(model):
    if layer.exploring:
      layer.level, layer.k_start_fraction = phase.level, phase.k_start_fraction
      layer.temperature[...] = jnp.asarray(temperature, jnp.float32)


def advance(model: nnx.Module, optimizer: nnx.Optimizer | None, sched: schedules.Schedule,
            step: int) -> None:
  """Brings `model` (and `optimizer`) to the phase `sched` gives `step`, in place: while
  exploring, the level and temperature of `step`; at freeze_step, once, the freeze.

  Call it before every step s, and once with s = total_steps after the last (which freezes
  a run whose freeze_step is its length), as `dd.advance` in the Linen loop.
  """
  if not exploring_layers(model):
    return
  if sched.is_frozen(step):
    freeze(model, optimizer, float(sched.temperature(step)))
  else:
    set_phase(model, sched.level(step), sched.temperature(step), sched.k_start_fraction)


def _pure(tree: Any) -> Any:
  """`tree` with every nnx.State a nested dict (the Linen layout `phases.freeze` reads)."""
  if isinstance(tree, nnx.State):
    return {k: _pure(v) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_pure(c) for c in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_pure(c) for c in tree)
  if isinstance(tree, Mapping):
    return {k: _pure(v) for k, v in tree.items()}
  return tree


def _nest(tree: dict, path: Path, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Any, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def freeze(model: nnx.Module, optimizer: nnx.Optimizer | None = None,
           temperature: float = phases.T_END) -> None:
  """The freeze transition (docs/DESIGN.md section 3) of every exploring DiagLinear, in place.

  Each keeps the top-K diagonals of alpha, folds the gate it recorded at `temperature`
  (the schedule's at the freeze), drops alpha; `offsets` becomes a static `DiagPattern`.
  The optimizer's state (Adam moments, ...) is gathered the same way (`dd.freeze`'s rules)
  into a fresh state of the frozen params; its step count is kept. A model made by
  `nnx.eval_shape` is frozen abstractly (shapes only: a restore target).
  """
  layers = [(p, m) for p, m in diag_layers(model) if m.exploring]
  if not layers:
    return
  if isinstance(layers[0][1].alpha.get_value(), jax.ShapeDtypeStruct):
    for _, layer in layers:
      _freeze_abstract(layer)
    return
  params = _pure(nnx.as_pure(nnx.state(model, nnx.Param)))
  extra: dict = {}
  for path, layer in layers:
    _nest(extra, path, layer.variables()[COLLECTION])
  old_state = None if optimizer is None else _pure(nnx.as_pure(optimizer.opt_state))
  out, new_state = phases.freeze({"params": params, COLLECTION: extra}, old_state, temperature)
  for path, layer in layers:
    p = _get(out["params"], path)
    _finish(layer, p["values"], _get(out[COLLECTION], path)["offsets"])
  if optimizer is not None:
    _load_state(model, optimizer, new_state)


def _finish(layer: DiagLinear, values_K: Any, offsets_K: Any) -> None:
  """Makes `layer` frozen: values_K on offsets_K, no alpha / k / gate / phase."""
  layer.values.set_value(values_K)
  for name in ("alpha", "k", "gate", "temperature"):
    delattr(layer, name)
  layer.level = None
  layer.offsets = DiagPattern(offsets_K)


def _freeze_abstract(layer: DiagLinear) -> None:
  """The frozen structure of an abstract layer (`nnx.eval_shape`): shapes and dtypes only."""
  m, n = layer.in_features, layer.out_features
  geo = pattern.Geometry(m, n, layer.layer.block_for(m))
  k = pattern.num_kept(m, n, layer.layer.sparsity, geo.block)
  v = layer.values.get_value()
  _finish(layer, jax.ShapeDtypeStruct(geo.values_shape(k), v.dtype),
          jax.ShapeDtypeStruct((k,), jnp.int32))


def _load_state(model: nnx.Module, optimizer: nnx.Optimizer, gathered: Any) -> None:
  """`optimizer.opt_state` := `gathered` (dict layout) in the layout of a fresh optimizer."""
  fresh = type(optimizer)(model, optimizer.tx, wrt=optimizer.wrt)
  want = dict((jax.tree_util.keystr(p), x) for p, x in
              jax.tree_util.tree_flatten_with_path(gathered)[0])
  slots = jax.tree_util.tree_flatten_with_path(
      fresh.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  if set(want) != {jax.tree_util.keystr(p) for p, _ in slots}:
    raise ValueError("freeze could not lay the gathered optimizer state out as the frozen "
                     f"model's: {sorted(set(want) ^ {jax.tree_util.keystr(p) for p, _ in slots})[:4]}")
  for p, var in slots:
    var.set_value(jnp.asarray(want[jax.tree_util.keystr(p)]))
  optimizer.opt_state = fresh.opt_state


def restored(state: Any) -> Any:
  """A restored `nnx.State` with every frozen `offsets` a static `StaticArray` again (what
  `nnx.merge` then needs: the layer's offsets stay concrete under `nnx.jit`)."""

  def fix(path, x):
    if isinstance(x, DiagPattern) and str(getattr(path[-1], "key", path[-1])) == "offsets" \
        and not isinstance(x.get_value(), StaticArray):
      return x.replace(StaticArray(np.asarray(x.get_value())))
    return x

  return jax.tree_util.tree_map_with_path(fix, state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))
