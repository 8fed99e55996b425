"""Channel mixing: a fixed permutation of a DiagDense's input features, y = x[..., perm] @ W.

A b x b block-diagonal layer maps each input block (b contiguous features) to output blocks
only, so two stacked block layers never mix channel groups ("a grouped layer without a
shuffle"). A permutation of the inputs lets every block read from several groups:
- 'stride' (Monarch's): perm = arange(m).reshape(b, M).T.ravel(), M = m / b. Block u of the
  permuted input holds the features {u + v M : v < b}, one from each of the b contiguous
  groups of M features, i.e. features M apart: they come from min(b, M) different b-blocks
  of the layer before (all of its M blocks when M <= b). It is a reshape and a transpose
  (the identity at b = 1, where single diagonals already mix).
- 'random': a fixed random permutation per layer, drawn from the layer's init rng.
- 'learned' (PA-DST, arXiv 2510.14812): while exploring, a soft permutation (a doubly
  stochastic m x m matrix, `soft`: Sinkhorn of the learned param `perm_logits` over the
  relative temperature T / t_start of the gates' schedule, so it sharpens with them) mixes
  x @ P^T; at the freeze `hard` picks the permutation of largest total logit (linear
  assignment), stored as `perm` like 'random'. The logits start at the identity (each slot
  keeps its own feature with weight e / (e + 1) ~ 0.73 at t_start) and enter Sinkhorn times
  GAIN, so under Adam they move GAIN times faster than the weights: a slot can change its
  feature within the first tens of steps, while T is high enough for gradients to pass.
The layer stores the permutation in its `dynadiag` collection as `perm` (m,) int32, so it
survives the freeze, checkpoints and exact resume; after the freeze it is a
`static.StaticArray` like the offsets (a constant under jit). A permutation does not change
which inputs or outputs a kept diagonal touches, only which features they are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

NAMES = ("none", "stride", "random", "learned")
LOGITS = "perm_logits"  # the param of a learned mixing while exploring
SINKHORN_ITERS = 20
GAIN = 30.0  # Sinkhorn sees GAIN * perm_logits / tau


def check(name: str) -> str:
  """`name` if it is a mixing (NAMES), else ValueError listing them."""
  if name not in NAMES:
    raise ValueError(f"unknown mixing {name!r}; choose one of {list(NAMES)}")
  return name


def stride_perm(m: int, b: int) -> np.ndarray:
  """Monarch's stride permutation of m features for b x b blocks: arange(m).reshape(b, M).T."""
  return np.arange(m, dtype=np.int32).reshape(b, m // b).T.reshape(-1)


def random_perm(key: jax.Array, m: int) -> jax.Array:
  """A uniformly random permutation of m features (int32)."""
  return jax.random.permutation(key, m).astype(jnp.int32)


def scale(m: int) -> float:
  """Logit scale of a learned mixing: exp(scale) / (exp(scale) + m - 1) = e / (e + 1) at init."""
  return float(np.log(max(m - 1, 1)) + 1.0)


def logits_init(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
  """The identity x scale(m) / GAIN (a learned mixing starts near 'none'); deterministic."""
  del key
  return (jnp.eye(shape[0], shape[1]) * (scale(shape[0]) / GAIN)).astype(dtype)


def soft(logits_MxM: jax.Array, tau: jax.Array, iters: int = SINKHORN_ITERS) -> jax.Array:
  """Sinkhorn(GAIN * logits / tau), log-domain, float32: rows sum to 1, columns to 1 once
  converged (SINKHORN_ITERS suffice at tau ~ 1; at small tau each row nears a one-hot)."""
  z = logits_MxM.astype(jnp.float32) * (GAIN / jnp.asarray(tau, jnp.float32))

  def body(_, z):  # columns, then rows: every slot's weights sum to 1 exactly
    z = z - jax.nn.logsumexp(z, axis=0, keepdims=True)
    return z - jax.nn.logsumexp(z, axis=1, keepdims=True)

  return jnp.exp(jax.lax.fori_loop(0, iters, body, z))


def soft_permute(x: jax.Array, p_MxM: jax.Array) -> jax.Array:
  """x @ P^T: slot q of the result is sum_j P[q, j] x[..., j] (x[..., perm] when P is hard)."""
  return jnp.einsum("...j,qj->...q", x, p_MxM.astype(x.dtype))


def hard(logits_MxM) -> np.ndarray:
  """The permutation perm (slot q reads feature perm[q]) of largest total logit (host, scipy)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  logits = np.asarray(logits_MxM, np.float64)
  if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
    raise ValueError(f"perm_logits must be square (m, m), got shape {logits.shape}")
  _, cols = optimize.linear_sum_assignment(logits, maximize=True)
  return cols.astype(np.int32)


def inverse(perm) -> np.ndarray | jax.Array:
  """inv with inv[perm[q]] = q (numpy for numpy, else in-graph)."""
  if isinstance(perm, np.ndarray):
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv
  perm = jnp.asarray(perm)
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def stride(x: jax.Array, b: int) -> jax.Array:
  """x[..., stride_perm(m, b)] as a reshape and a transpose (XLA folds it into the layout)."""
  m = x.shape[-1]
  if b == 1 or b == m:
    return x
  return jnp.swapaxes(x.reshape(*x.shape[:-1], b, m // b), -1, -2).reshape(x.shape)


class _Perm:
  """A concrete permutation as a hashable static argument, with its inverse."""

  def __init__(self, perm: np.ndarray):
    self.perm = np.asarray(perm, np.int32)
    self.inv = inverse(self.perm)
    self._key = self.perm.tobytes()

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other) -> bool:
    return isinstance(other, _Perm) and self._key == other._key


def _take(x, idx):
  return jnp.take(x, idx, axis=-1, mode="clip", unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _permute_static(x, p: _Perm):
  return _take(x, p.perm)


_permute_static.defvjp(lambda x, p: (_take(x, p.perm), None),
                       lambda p, _, g: (_take(g, p.inv),))


@jax.custom_vjp
def _permute_traced(x, perm):
  return _take(x, perm)


def _traced_bwd(perm, g):
  return _take(g, inverse(perm)), None


_permute_traced.defvjp(lambda x, perm: (_take(x, perm), perm), _traced_bwd)


def permute(x: jax.Array, perm) -> jax.Array:
  """x[..., perm]; its gradient is a gather by the inverse (not a scatter-add).

  A concrete perm (numpy, a `StaticArray`, closed over by jit) is a constant gather.
  """
  if isinstance(perm, jax.core.Tracer):
    return _permute_traced(x, perm)
  return _permute_static(x, _Perm(np.asarray(perm)))
