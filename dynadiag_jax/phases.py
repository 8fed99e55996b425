"""The exploration phase of any model (`with_phase`) and the freeze of its variables (`advance`)."""

from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynadiag_jax import cover, gates, mixing, schedules, static
from dynadiag_jax.diag_dense import COLLECTION

T_END = schedules.Schedule.t_end  # the temperature the default schedule freezes at

Path = tuple[str, ...]


def _to_dict(tree):
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def holds(node: Any, name: str) -> bool:
  """Whether collection node `node` holds the DiagDense variable `name` (not a submodule so
  named: a layer may be called 'k', as SelfAttention's split projections are)."""
  return isinstance(node, Mapping) and name in node and not isinstance(node[name], Mapping)


def exploring_layers(variables: Mapping[str, Any]) -> list[Path]:
  """Paths (in `params`) of the DiagDense layers that still learn their diagonals."""
  found = []

  def walk(node, path):
    if isinstance(node, Mapping):
      if holds(node, "k") and not holds(node, "offsets"):
        found.append(path)
        return
      for key, child in node.items():
        walk(child, path + (key,))

  walk(variables.get(COLLECTION, {}), ())
  return found


def _get(tree, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def _replace_at(tree, path: Path, fn):
  """A copy of nested dict `tree` with the node at `path` replaced by fn(node)."""
  if not path:
    return fn(tree)
  out = dict(tree)
  out[path[0]] = _replace_at(tree[path[0]], path[1:], fn)
  return out


class Phased:
  """`module` whose `apply` runs every exploring DiagDense in `phase` (see `with_phase`)."""

  def __init__(self, module: nn.Module, phase: schedules.Phase):
    self.module, self.phase = module, phase

  def apply(self, variables: Mapping[str, Any], *args, **kwargs):
    """`module.apply(variables, ...)` inside the phase."""
    with self.phase.active():
      return self.module.apply(variables, *args, **kwargs)

  def init(self, *args, **kwargs):
    """`module.init(...)` inside the phase."""
    with self.phase.active():
      return self.module.init(*args, **kwargs)

  def __getattr__(self, name: str):
    """The module's attribute; its methods (e.g. init_with_output) run inside the phase."""
    attr = getattr(self.module, name)
    if not callable(attr) or isinstance(attr, type) or name == "clone":
      return attr

    def in_phase(*args, **kwargs):
      with self.phase.active():
        return attr(*args, **kwargs)
    return in_phase


def with_phase(module: nn.Module, level: float = 1.0,
               temperature: Any = schedules.DEFAULT_TEMPERATURE,
               k_start_fraction: float = 1.0) -> Phased:
  """`module` whose exploring DiagDense layers, wherever they sit, compute the diagonals of
  `level` at `temperature` (`schedules.Phase`).

  Works for any Flax module: the phase reaches the layers through `Phase.active()`, not
  through the module's fields. `level` (from `Schedule.level(step)`) is static: a jitted
  step takes it as a static argument and compiles once per level; `temperature` (from
  `Schedule.temperature(step)`) may be traced. An exploring layer applied without a phase
  raises `PhaseError`; frozen layers ignore it.
  """
  if isinstance(module, Phased):
    module = module.module
  return Phased(module, schedules.Phase(level, temperature, k_start_fraction))


def _check_variables(variables: Any, what: str) -> None:
  """One clear error for a tree that is not a model's variables with a `dynadiag` collection."""
  if not isinstance(variables, Mapping) or COLLECTION not in variables or "params" not in variables:
    keys = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
    raise ValueError(
        f"{what} takes the model's variables ({{'params': ..., '{COLLECTION}': ...}}, what "
        f"model.init returns), got a tree with keys {keys}: pass "
        f"{{'params': state.params, **extra}} with the '{COLLECTION}' collection, not the "
        "params alone (without it the run would never freeze)")


def advance(variables: Mapping[str, Any], opt_state: Any, sched: schedules.Schedule,
            step: int) -> tuple[dict, Any]:
  """(variables, opt_state) in the phase `sched` gives `step`: the freeze, once, at freeze_step.

  Call it before every step s (and once with s = total_steps after the last, which
  freezes a run whose freeze_step is its length). Before freeze_step, and once frozen,
  it returns its inputs: the level and temperature of a step are configuration
  (`with_phase(model, sched.level(s), sched.temperature(s))`), not variables. The freeze
  folds each layer's own gate (recorded at init) at the schedule's temperature.
  Un-replicated variables.
  """
  _check_variables(variables, "advance")
  if not exploring_layers(variables) or not sched.is_frozen(step):
    return _to_dict(variables), opt_state
  return freeze(variables, opt_state, float(sched.temperature(step)))


def _layer_choice(params: Mapping, col: Mapping,
                  temperature: float) -> tuple[np.ndarray, jax.Array]:
  """(kept offsets_K, gates g_P) of one exploring layer, by the gate it recorded at init (and
  `cover.select` when it recorded `cover`)."""
  alpha = jnp.asarray(params["alpha"])
  if alpha.ndim != 1:
    raise ValueError("freeze takes un-replicated variables (alpha of shape (P,)), got "
                     f"alpha of shape {alpha.shape}; unreplicate pmapped state first")
  k = int(np.asarray(col["k"]))
  if "gate" not in col:
    raise ValueError("an exploring DiagDense without a recorded gate (variables made by a "
                     "version before the recipe): re-initialise, or freeze with that version")
  gate = gates.name_of(int(np.asarray(col["gate"])))
  if "cover" in col:
    kept = cover.select(alpha, k, int(np.shape(params["values"])[1]))
  else:
    kept = gates.topk_indices(alpha, k)
  g = gates.by_name(gate)(alpha.astype(jnp.float32), k, temperature, kept=kept)
  return np.asarray(kept), g


_GONE = ("alpha", mixing.LOGITS)  # exploring params the freeze drops (and their optimizer state)


def _params_like(node: Any, params: Any) -> bool:
  """Whether `node` has the exact structure of `params`: same keys, leaves of the same shapes
  (or optax.MaskedNode where a masked transform holds no state)."""
  if isinstance(params, Mapping):
    return isinstance(node, Mapping) and set(node) == set(params) and all(
        _params_like(node[k], params[k]) for k in params)
  if isinstance(node, optax.MaskedNode):
    return True
  return hasattr(node, "shape") and tuple(node.shape) == tuple(np.shape(params))


def _gather_state(node: Any, params: Mapping, remap) -> Any:
  """An optimizer state with every subtree shaped like `params` passed through remap."""
  if _params_like(node, params):
    return remap(node)
  if isinstance(node, Mapping):
    return {k: _gather_state(v, params, remap) for k, v in node.items()}
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    return type(node)(*(_gather_state(c, params, remap) for c in node))
  if isinstance(node, (tuple, list)):
    return type(node)(_gather_state(c, params, remap) for c in node)
  return node


def _leaf_paths(tree: Any) -> set[str]:
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def freeze(variables: Mapping[str, Any], opt_state: Any = None,
           temperature: float = T_END) -> tuple[dict, Any]:
  """(variables, opt_state) after the freeze transition (docs/DESIGN.md section 3).

  Always a pair: the second item is the gathered `opt_state`, or None when none is given.

  Every exploring DiagDense keeps the top-K diagonals of alpha (`cover.select`'s K when it
  recorded `cover`), folds their gates into `values`, and drops `alpha` and the other rows;
  a learned mixing's `perm_logits` become the hard permutation `perm` (`mixing.hard`);
  `dynadiag` then holds only `offsets`, `in_features` and the mixing's `perm` (if any), as
  `static.StaticArray`s: passed into `jax.jit` with the variables they
  stay concrete, so the kernels run the exact layout of the pattern.
  Each layer's gate is the one it recorded at init (its recipe's), folded at `temperature`
  (the schedule's at the freeze, its t_end; hard gates do not depend on it).
  Every subtree of `opt_state` shaped exactly like the params (Adam / SGD moments, also
  inside optax.masked, chain or inject_hyperparams) is remapped by exact param path the
  same way; any other state that holds `alpha` raises. Takes un-replicated variables; runs on the host, outside jit.
  """
  _check_variables(variables, "freeze")
  out = _to_dict(variables)
  choice: dict[Path, np.ndarray] = {}
  for path in exploring_layers(out):
    layer = _get(out["params"], path)
    idx, g_P = _layer_choice(layer, _get(out[COLLECTION], path), temperature)
    choice[path] = idx
    v = layer["values"]
    g_K = g_P[idx].reshape((len(idx),) + (1,) * (v.ndim - 1))
    folded = (g_K * jnp.asarray(v, jnp.float32)[idx]).astype(v.dtype)
    learned = {"perm": mixing.hard(layer[mixing.LOGITS])} if mixing.LOGITS in layer else {}
    out = _replace_at(out, ("params",) + path, lambda d: {
        **{k: x for k, x in d.items() if k not in _GONE + ("values",)}, "values": folded})
    out = _replace_at(out, (COLLECTION,) + path, lambda d, learned=learned: {
        "offsets": np.asarray(idx, np.int32),
        **{key: d[key] for key in ("in_features", "perm") if key in d}, **learned})
  out[COLLECTION] = static.static(out[COLLECTION])

  if opt_state is None:
    return out, None

  def remap(node: Mapping) -> dict:
    """A params-shaped state subtree, remapped by exact param path like the params."""
    node = _to_dict(node)
    for path, idx in choice.items():
      def layer(d, idx=idx):
        d = {k: v for k, v in d.items() if k not in _GONE}
        if not isinstance(d["values"], optax.MaskedNode):
          d["values"] = jnp.asarray(d["values"])[idx]
        return d
      node = _replace_at(node, path, layer)
    return node

  old_params = _to_dict(variables)["params"]
  new_state = _gather_state(opt_state, old_params, remap)
  alphas = tuple("".join(f"['{k}']" for k in path) + f"['{name}']" for path in choice
                 for name in _GONE)
  stale = {p for p in _leaf_paths(new_state) if p.endswith(alphas)}
  if stale:
    raise ValueError(f"freeze cannot gather the optimizer state at {sorted(stale)[:3]}: only "
                     "states that hold trees shaped exactly like the params (Adam / AdamW / "
                     "SGD momentum / EMA moments, optax.masked / chain / inject_hyperparams "
                     "wrappers) are supported")
  return out, new_state
