"""`DiagDense`: a drop-in for `nn.Dense` whose kernel is a sum of learned wrapped diagonals."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import cover, gates, mixing, ops, pattern, schedules
from dynadiag_jax import recipe as recipe_lib
from dynadiag_jax.ops import KernelConfig
from dynadiag_jax.pattern import Geometry
from dynadiag_jax.recipe import Recipe
from dynadiag_jax.static import StaticArray

COLLECTION = "dynadiag"
DEFAULT_TEMPERATURE = schedules.DEFAULT_TEMPERATURE
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def values_init(m: int, n: int, k: int, block: int = 1,
                gain: float | None = None) -> nn.initializers.Initializer:
  """Truncated normal whose gated kernel (all gates k / P) has nn.Dense's variance 1/m.

  `gain` (default P / k) is 1 / the gates' value at init: 1 for a hard gate (`gates.HARD`),
  whose K kept entries per row then have nn.Dense's std 1/sqrt(m), as a static layer's.
  """
  if gain is None:
    gain = pattern.num_diagonals(m, n, block) / k
  std = gain / np.sqrt(m) / _TRUNC_STD

  def init(key, shape, dtype=jnp.float32):
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)

  return init


def effective_init(kernel_init: nn.initializers.Initializer, geo: Geometry,
                   k: int, gain: float | None = None) -> nn.initializers.Initializer:
  """Values whose gated kernel (all gates k / P) is `kernel_init`'s (m, n) kernel on the diagonals.

  An initializer describes the effective kernel, as in `nn.Dense`: lecun_normal gives the
  kernel entries the same variance here as there.
  """

  def init(key, shape, dtype=jnp.float32):
    w_MxN = kernel_init(key, (geo.m, geo.n), jnp.float32)
    rows = np.arange(shape[0])  # (P,) while exploring, every diagonal
    v = pattern.gather_diagonals(w_MxN, rows, geo.m, geo.n, geo.block)
    return (v * (geo.P / k if gain is None else gain)).astype(dtype)

  return init


def tie_break_init(p: int, spread: float = 1e-3) -> nn.initializers.Initializer:
  """alpha = (1 + spread * u) / P, u ~ U[0, 1): distinct, so a hard top-k starts on a random set."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    return ((1.0 + spread * u) / p).astype(dtype)

  return init


class DiagDense(nn.Module):
  """y = x @ W + b with W a sum of K selected wrapped (block-)diagonals (docs/DESIGN.md 2, 3, 8).

  Exploring: params `alpha` (P,), `values` (P, D) or (P, D, b, b), `bias` (n,); collection
  `dynadiag` holds `k` (), `in_features` () and `gate` () (the recipe's gate, as
  `gates.code`, a `StaticArray`: the freeze folds it, and a layer refuses another). The phase comes from the caller
  (`dynadiag_jax.with_phase`, any model): the layer computes the top-K_active diagonals of
  alpha at the phase's level (static: a new level is a new trace) and temperature (may be
  traced); with all P active, W is dense and the layer runs one GEMM whatever the backend.
  Applied without a phase while exploring, it raises `PhaseError` (init runs every diagonal).
  Frozen (after `dynadiag_jax.freeze`): params `values` (K, D[, b, b]), `bias`; `dynadiag`
  holds `offsets` (K,) and `in_features` (), static (`static.StaticArray`).
  `block` b selects b x b block-diagonals (b must divide both sides; 1 is the paper's
  method; with `fit_block` the layer takes the largest valid b up to `block`; None: the
  recipe's `block`, fitted the same way); `kernel_init` describes the effective kernel
  (None: truncated normal of `nn.Dense`'s variance); `recipe` (`dynadiag_jax.recipe.Recipe`)
  holds the layout defaults, the gate and the rest of how the diagonals are learned. Hard
  gates start alpha at (1 + 1e-3 u) / P, u ~ U[0, 1) (random ties broken).
  With `recipe.cover` the kept K are `cover.select`'s (no input or output left unconnected)
  and the layer records `cover` in `dynadiag`. `mixing` ('none' | 'stride' | 'random' |
  'learned', `dynadiag_jax.mixing`; None: the recipe's) permutes the input features,
  y = x[..., perm] @ W + b; `dynadiag` then holds `perm` (m,) (static once frozen). A
  learned mixing explores with params `perm_logits` (m, m) and y = x @ P^T @ W + b, P their
  soft permutation; the freeze stores its hard permutation as `perm`.
  """
  features: int
  sparsity: float = 0.9
  block: int | None = None
  fit_block: bool = False
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  alpha_init: nn.initializers.Initializer | None = None
  backend: str = "auto"
  kernel_config: KernelConfig = KernelConfig()
  recipe: Recipe = recipe_lib.DEFAULT
  mixing: str | None = None

  def __post_init__(self):
    check_settings(self.features, self.sparsity, self.block, self.backend, self.recipe,
                   self.name, self.mixing)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if jnp.ndim(x) < 1:
      raise ValueError(f"DiagDense {self._path()} takes inputs with a feature axis, got a "
                       f"{jnp.ndim(x)}-D input of shape {jnp.shape(x)}")
    m, n = int(x.shape[-1]), int(self.features)
    if self.has_variable(COLLECTION, "in_features"):
      self._check_width(m)
    geo = Geometry(m, n, self.block_for(m))
    k = pattern.num_kept(m, n, self.sparsity, geo.block)
    gate_name = self.recipe.gate
    cfg = self.layer_kernel_config

    if self.has_variable(COLLECTION, "offsets"):  # frozen: a static K-diagonal layer
      o_K = self.get_variable(COLLECTION, "offsets")
      if isinstance(o_K, StaticArray):
        o_K = np.asarray(o_K)
      v = self.param("values", self._values_init(geo, k), geo.values_shape(o_K.shape[0]),
                     self.param_dtype)
      bias = self._bias(n)
      x = self._mix(x, geo)
    else:
      p = geo.P
      if self.alpha_init is not None:
        alpha_init = self.alpha_init
      elif gate_name in gates.HARD:  # equal alphas would keep the lowest K offsets
        alpha_init = tie_break_init(p)
      else:
        alpha_init = nn.initializers.constant(1.0 / p)
      alpha_P = self.param("alpha", alpha_init, (p,), self.param_dtype)
      values = self.param("values", self._values_init(geo, k), geo.values_shape(p),
                          self.param_dtype)
      bias = self._bias(n)
      self.variable(COLLECTION, "k", lambda: jnp.asarray(k, jnp.int32))
      self.variable(COLLECTION, "in_features", lambda: jnp.asarray(m, jnp.int32))
      # static (no pytree leaf): checked under jit too, never a checkpoint leaf (the config's)
      code = self.variable(COLLECTION, "gate",
                           lambda: StaticArray(np.int32(gates.code(gate_name)))).value
      self._check_gate(code)
      covered = self._check_cover()
      phase = self._phase()
      x = self._mix(x, geo, phase)
      k_active = schedules.k_active(p, k, phase.level, phase.k_start_fraction)
      if pattern.is_concrete(phase.temperature) and not float(np.min(phase.temperature)) > 0:
        raise ValueError(f"temperature must be > 0, got {phase.temperature!r}")
      kept = None  # the K that cover.select keeps (for every gate; hard ones gate exactly these)
      if covered and (gate_name in gates.HARD or k_active < p):
        kept = cover.select(jax.lax.stop_gradient(alpha_P), k, geo.D)
      g_P = gates.by_name(gate_name)(alpha_P, k, phase.temperature, kept=kept)
      g_P = g_P.reshape((p,) + (1,) * (values.ndim - 1))
      gated = lambda g, v: g * v
      if gate_name in gates.SHADOW:  # forward g * v; d/dv = dL/dW on every active diagonal
        gated = lambda g, v: g * v + (1 - jax.lax.stop_gradient(g)) * (v - jax.lax.stop_gradient(v))
      if k_active == p:  # every diagonal: W is dense, one GEMM whatever the backend
        x, v_all, bias = nn.dtypes.promote_dtype(x, gated(g_P, values), bias, dtype=self.dtype)
        y = jnp.matmul(x, pattern.densify_all(v_all, m, n, geo.block), precision=self.precision)
        return y if bias is None else y + bias
      if kept is None:
        o_K = gates.topk_indices(jax.lax.stop_gradient(alpha_P), k_active)
      else:  # the kept K and the best of the rest
        o_K = cover.active(jax.lax.stop_gradient(alpha_P), k_active, kept)
      v = gated(g_P[o_K], values[o_K])

    x, v, bias = nn.dtypes.promote_dtype(x, v, bias, dtype=self.dtype)
    y = ops.diag_matmul(x, v, o_K, m, n, backend=self.backend, kernel=cfg)
    return y if bias is None else y + bias

  @property
  def layer_kernel_config(self) -> KernelConfig:
    """The products' kernel settings: `kernel_config`, its precision `precision` when set."""
    if self.precision is None:
      return self.kernel_config
    return dataclasses.replace(self.kernel_config, precision=self.precision)

  @property
  def layer_mixing(self) -> str:
    """This layer's mixing: its own `mixing`, else its recipe's."""
    return self.recipe.mixing if self.mixing is None else self.mixing

  def block_for(self, m: int) -> int:
    """The block size this layer uses for `m` input features (the recipe's, fitted, if unset)."""
    n = int(self.features)
    if self.block is None:  # the recipe's; with cover, capped where K diagonals can cover
      if self.recipe.cover:
        return pattern.largest_covering_block(m, n, self.sparsity, self.recipe.block)
      return pattern.largest_block(m, n, self.recipe.block)
    if self.fit_block:
      return pattern.largest_block(m, n, self.block)
    return pattern.check_block(m, n, self.block, self._path())

  def _path(self) -> str:
    """The layer's path in its model ('encoder/block_0/mlp_in'), for error messages."""
    path = "/".join(str(p) for p in (self.scope.path if self.scope is not None else ()))
    return repr(path or self.name or type(self).__name__)

  def _phase(self) -> schedules.Phase:
    phase = schedules.phase_for_trace()
    if phase is not None:
      return phase
    if self.is_initializing():
      return schedules.Phase()
    raise schedules.PhaseError(
        f"DiagDense {self._path()} is exploring and was applied without a phase: apply the "
        "model as dd.with_phase(model, sched.level(step), sched.temperature(step)).apply(...) "
        "(any model), or freeze it first (dd.advance / dd.freeze)")

  def _check_gate(self, code: Any) -> None:
    if not pattern.is_concrete(code):
      return
    got = gates.name_of(int(np.asarray(code).reshape(-1)[0]))
    if got != self.recipe.gate:
      raise ValueError(f"DiagDense {self._path()} has recipe gate {self.recipe.gate!r} but its "
                       f"variables were made with gate {got!r}: apply the model built with the "
                       "recipe that initialised them")

  def _check_cover(self) -> bool:
    """True when the recipe covers (recording it at init); refuses variables made otherwise."""
    has = self.has_variable(COLLECTION, "cover")
    if self.recipe.cover and not has and not self.is_initializing():
      raise ValueError(f"DiagDense {self._path()} has recipe.cover=True but its variables were "
                       "made without it: apply the model built with the recipe that "
                       "initialised them")
    if has and not self.recipe.cover:
      raise ValueError(f"DiagDense {self._path()} has recipe.cover=False but its variables "
                       "were made with cover=True: apply the model built with that recipe")
    if self.recipe.cover:
      self.variable(COLLECTION, "cover", lambda: StaticArray(np.int32(1)))
    return self.recipe.cover

  def _mix(self, x: jax.Array, geo: Geometry,
           phase: schedules.Phase | None = None) -> jax.Array:
    """x with its features permuted by the layer's mixing (`dynadiag_jax.mixing`); `phase`:
    the exploring phase (a learned mixing is then the soft permutation at its temperature)."""
    has = self.has_variable(COLLECTION, "perm")
    soft = self.has_variable("params", mixing.LOGITS)
    mix = self.layer_mixing
    made = ("mixing='learned'" if soft else "a fixed permutation ('perm', mixing 'stride' or "
            "'random')" if has else "mixing='none'")
    if (mix == "none" and (has or soft)) or (mix != "learned" and soft):
      raise ValueError(f"DiagDense {self._path()} has mixing={mix!r} but its variables were "
                       f"made with {made}: build it with the mixing that made them")
    if mix == "none":
      return x
    m = geo.m
    if mix == "learned" and phase is not None:  # exploring: Sinkhorn's soft permutation
      if not soft and not self.is_initializing():
        raise ValueError(f"DiagDense {self._path()} has mixing='learned' but its variables "
                         f"hold no {mixing.LOGITS!r}: they were made with {made}")
      logits = self.param(mixing.LOGITS, mixing.logits_init, (m, m), self.param_dtype)
      tau = jnp.asarray(phase.temperature, jnp.float32) / self.recipe.t_start
      return mixing.soft_permute(x, mixing.soft(logits, tau))
    if not has and not self.is_initializing():
      raise ValueError(f"DiagDense {self._path()} has mixing={mix!r} but its variables "
                       f"hold no permutation ('perm'): they were made with {made}")
    if mix == "stride":
      perm = self.variable(COLLECTION, "perm", lambda: jnp.asarray(
          mixing.stride_perm(m, geo.block))).value
      if (not isinstance(perm, StaticArray) and pattern.is_concrete(perm)
          and not np.array_equal(np.asarray(perm), mixing.stride_perm(m, geo.block))):
        raise ValueError(f"DiagDense {self._path()} has mixing='stride' but its variables hold "
                         "another permutation: build it with the mixing that made them")
      return mixing.stride(x, geo.block)  # a reshape and transpose, the stored perm's
    perm = self.variable(COLLECTION, "perm",
                         lambda: mixing.random_perm(self.make_rng("params"), m)).value
    return mixing.permute(x, np.asarray(perm) if isinstance(perm, StaticArray) else perm)

  def _values_init(self, geo: Geometry, k: int) -> nn.initializers.Initializer:
    gain = gates.init_gain(self.recipe.gate, k, geo.P)
    if self.kernel_init is None:
      return values_init(geo.m, geo.n, k, geo.block, gain)
    return effective_init(self.kernel_init, geo, k, gain)

  def _check_width(self, m: int) -> None:
    want = self.get_variable(COLLECTION, "in_features")
    if not pattern.is_concrete(want):
      return
    want = int(np.asarray(want).reshape(-1)[0])
    if want != m:
      state = "was frozen" if self.has_variable(COLLECTION, "offsets") else "was initialised"
      raise ValueError(f"DiagDense {self._path()} {state} for {want} input features, got x "
                       f"with {m} on its last axis")

  def _bias(self, n: int) -> jax.Array | None:
    return self.param("bias", self.bias_init, (n,), self.param_dtype) if self.use_bias else None


def check_settings(features: int, sparsity: Any, block: int | None, backend: str, recipe: Any,
                   name: str | None = None, mix: str | None = None) -> None:
  """Clear errors for layer settings that cannot work, raised when the layer is built."""
  where = f"DiagDense {name!r}: " if name else ""
  if isinstance(features, bool) or not isinstance(features, (int, np.integer)) or features < 1:
    raise ValueError(f"{where}features must be an integer >= 1, got {features!r}")
  try:
    pattern.check_sparsity(sparsity)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}{e}") from None
  if block is not None and not pattern.is_block_size(block):
    raise ValueError(f"{where}block must be an integer >= 1 (or None: the recipe's), got "
                     f"{block!r}")
  try:
    ops.check_backend_name(backend)
  except ValueError as e:
    raise ValueError(f"{where}{e}") from None
  try:
    if mix is not None:
      mixing.check(mix)
  except ValueError as e:
    raise ValueError(f"{where}{e}") from None
  if not isinstance(recipe, Recipe):
    raise TypeError(f"{where}recipe must be a dynadiag_jax.recipe.Recipe (e.g. "
                    f"dd.recipe.get('paper')), got {recipe!r}")
