"""A fused frozen sparse MLP: y = act(x @ W1 + b1) @ W2 + b2, hidden kept block-leading (`xla`).

Both W1 (m, h) and W2 (h, n) are frozen b x b block-diagonal patterns (static offsets, the
same block b). Unfused, the `xla` backend turns x block-leading, writes the wide layer's
output back to (B, h), adds the bias and applies GELU (two more passes over (B, h)), then the
second layer turns that block-leading again. Here the hidden activation never exists as
(B, h): layer 1's product ends in pieces of hidden blocks, and one fusion sums each hidden
block's pieces, adds its bias, applies the activation and writes it straight into the operand
of layer 2's batched product, only for the hidden blocks layer 2 reads. Only x (into blocks)
and the final y (out of blocks) are relaid.

Each layer's K diagonals pair, for every block t of its short side (D of them), K blocks of
its long side: a tall layer (M >= N) reads input blocks r = (o_k + t) % M for output block t;
a wide one sends input block t to output blocks c = (o_k + t) % N. So every product is one
batched matmul over t with contraction or output width K * b:
- tall: A[t] = [a_r(0, t), ..., a_r(K-1, t)] (B, K b); y_t = A[t] @ W[t] (K b, b);
- wide: Z[t] = a_t @ [v[0, t], ..., v[K-1, t]] (B, K b); y_c = the sum of the pieces of Z
  that land on c.

Backward (one custom_vjp): the residuals are layer 1's operand, layer 1's product (Z or the
stacked output blocks: the pre-activation is a sum of <= K of its pieces plus the bias, so it
is recomputed inside the fusion that forms layer 1's output gradient, with no extra pass and
no extra residual) and layer 2's operand (needed for dW2 anyway). dx, dW1, db1, dW2, db2 are
again batched products in the block-leading layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax.backends import xla
from dynadiag_jax.pattern import Geometry

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static description of a fused MLP: geometries, frozen offsets, activation, precisions."""
  geo_in: Geometry
  geo_out: Geometry
  o_in: xla.Frozen
  o_out: xla.Frozen
  activation: Callable
  precision_in: Any = None
  precision_out: Any = None
  live: tuple[int, ...] = ()  # hidden blocks layer 1 writes and layer 2 reads

  def __post_init__(self):
    gi, go = self.geo_in, self.geo_out
    if gi.n != go.m or gi.block != go.block or gi.block < 2:
      raise ValueError(f"fused MLP needs layer 1's output width = layer 2's input width and one "
                       f"block size > 1, got {gi} and {go}")

  @property
  def hidden(self) -> int:
    """H: the number of hidden blocks."""
    return self.geo_in.N


def _tall(geo: Geometry) -> bool:
  return geo.M >= geo.N


@functools.lru_cache(maxsize=256)
def _long(key: bytes, d: int, p: int) -> tuple[tuple[int, ...], ...]:
  """long[t][k] = (o_k + t) % P: the long-side block that entry t of diagonal k touches."""
  o_K = np.frombuffer(key, np.int32)
  return tuple(tuple((int(o) + t) % p for o in o_K) for t in range(d))


def _pairs(geo: Geometry, o: xla.Frozen) -> tuple[tuple[int, ...], ...]:
  return _long(o._key, geo.D, geo.P)


def _landing(geo: Geometry, o: xla.Frozen) -> list[list[tuple[int, int]]]:
  """For each long-side block j, the (t, k) whose entry touches it."""
  out: list[list[tuple[int, int]]] = [[] for _ in range(geo.P)]
  for t, row in enumerate(_pairs(geo, o)):
    for k, j in enumerate(row):
      out[j].append((t, k))
  return out


def _w_short(v_KxDxbxb) -> jax.Array:
  """(D, K b, b): W[t] stacks v[k, t] over k along its rows (tall: contraction K b)."""
  k, d, b, _ = v_KxDxbxb.shape
  return v_KxDxbxb.transpose(1, 0, 2, 3).reshape(d, k * b, b)


def _w_wide(v_KxDxbxb) -> jax.Array:
  """(D, b, K b): W[t] = [v[0, t], ..., v[K-1, t]] along its columns (wide: output K b)."""
  k, d, b, _ = v_KxDxbxb.shape
  return v_KxDxbxb.transpose(1, 2, 0, 3).reshape(d, b, k * b)


def _dv_tall(dw_DxKbxb, k: int) -> jax.Array:
  d, _, b = dw_DxKbxb.shape
  return dw_DxKbxb.reshape(d, k, b, b).transpose(1, 0, 2, 3)


def _dv_wide(dw_DxbxKb, k: int) -> jax.Array:
  d, b, _ = dw_DxbxKb.shape
  return dw_DxbxKb.reshape(d, b, k, b).transpose(2, 0, 1, 3)


def _piece(z_SxBxKb, t: int, k: int, b: int) -> jax.Array:
  return z_SxBxKb[t, :, k * b:(k + 1) * b]


def _gathered(blocks: Callable[[int], jax.Array], pairs) -> jax.Array:
  """(D, B, K b): A[t] = [blocks(pairs[t][0]), ..., blocks(pairs[t][K-1])], one fusion."""
  return jnp.stack([jnp.concatenate([blocks(j) for j in row], axis=-1) for row in pairs])


def _x_operand(x_BxM, plan: Plan) -> jax.Array:
  """Layer 1's operand from x: blocks (wide) or the K gathered blocks per output (tall)."""
  geo, b = plan.geo_in, plan.geo_in.block
  if not _tall(geo):
    return xla.to_blocks(x_BxM, b)
  return _gathered(lambda r: x_BxM[:, r * b:(r + 1) * b], _pairs(geo, plan.o_in))


def _layer1(a1, v1, plan: Plan) -> jax.Array:
  """Layer 1's product: (M, B, K b) pieces (wide) or (N, B, b) output blocks (tall)."""
  prec = plan.precision_in
  if _tall(plan.geo_in):
    return jnp.einsum("tzq,tqd->tzd", a1, _w_short(v1), precision=prec,
                      preferred_element_type=_F32)
  return jnp.einsum("tzc,tcq->tzq", a1, _w_wide(v1), precision=prec, preferred_element_type=_F32)


def _pre_blocks(z1, b1_H, plan: Plan) -> Callable[[int], jax.Array]:
  """pre(j): hidden block j before the activation, (B, b) float32 (a lazy expression)."""
  geo, b = plan.geo_in, plan.geo_in.block
  rows = z1.shape[1]
  land = None if _tall(geo) else _landing(geo, plan.o_in)

  def pre(j: int) -> jax.Array:
    bias = b1_H[j * b:(j + 1) * b].astype(_F32)
    if land is None:
      return z1[j] + bias
    pieces = [_piece(z1, t, k, b) for t, k in land[j]]
    if not pieces:
      return jnp.broadcast_to(bias, (rows, b))
    return sum(pieces[1:], pieces[0]) + bias

  return pre


def _a2(z1, b1_H, plan: Plan, dtype) -> jax.Array:
  """Layer 2's operand, act(pre) of the live hidden blocks it reads (others 0), one fusion."""
  pre = _pre_blocks(z1, b1_H, plan)
  zero = jnp.zeros((z1.shape[1], plan.geo_in.block), dtype)
  live = frozenset(plan.live)
  g = lambda j: plan.activation(pre(j)).astype(dtype) if j in live else zero
  if _tall(plan.geo_out):
    return _gathered(g, _pairs(plan.geo_out, plan.o_out))
  return jnp.stack([g(j) for j in range(plan.hidden)])


def _layer2(a2, v2, plan: Plan) -> jax.Array:
  """y (B, n) float32 from layer 2's operand."""
  geo, prec = plan.geo_out, plan.precision_out
  if _tall(geo):
    return xla.from_blocks(jnp.einsum("tzq,tqd->tzd", a2, _w_short(v2), precision=prec,
                                      preferred_element_type=_F32))
  return xla._scatter_form(a2, v2, plan.o_out, geo.N, prec)  # pylint: disable=protected-access


def _forward(x_BxM, v1, b1, v2, b2, plan: Plan):
  dtype = jnp.result_type(x_BxM, v1, v2)
  a1 = _x_operand(x_BxM, plan)
  z1 = _layer1(a1, v1, plan)
  a2 = _a2(z1, _bias(b1, plan.geo_in.n, dtype), plan, dtype)
  y = _layer2(a2, v2, plan)
  if b2 is not None:
    y = y + b2.astype(_F32)
  return y.astype(dtype), (a1, z1, a2)


def _bias(b, n: int, dtype) -> jax.Array:
  return jnp.zeros((n,), dtype) if b is None else b


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(x_BxM, v1, b1, v2, b2, plan: Plan):
  return _forward(x_BxM, v1, b1, v2, b2, plan)[0]


def _fused_fwd(x_BxM, v1, b1, v2, b2, plan: Plan):
  y, res = _forward(x_BxM, v1, b1, v2, b2, plan)
  return y, (res, v1, b1, v2, b2)


def _dh_blocks(dy_BxN, a2, v2, plan: Plan):
  """(dh(j) -> (B, b) float32 or None for hidden blocks layer 2 does not read, dW2)."""
  geo, b, prec = plan.geo_out, plan.geo_out.block, plan.precision_out
  k = v2.shape[0]
  live = frozenset(plan.live)
  if _tall(geo):  # y_t = A2[t] @ W2[t]: dA2[t] = dy_t @ W2[t].T, dW2[t] = A2[t].T @ dy_t
    dyt = xla.to_blocks(dy_BxN, b)
    da2 = jnp.einsum("tzd,tqd->tzq", dyt, _w_short(v2).astype(dyt.dtype), precision=prec,
                     preferred_element_type=_F32)
    dv2 = _dv_tall(jnp.einsum("tzq,tzd->tqd", a2, dyt.astype(a2.dtype), precision=prec,
                              preferred_element_type=_F32), k)
    land = _landing(geo, plan.o_out)

    def dh(j: int):
      pieces = [_piece(da2, t, kk, b) for t, kk in land[j]]
      return sum(pieces[1:], pieces[0]) if pieces and j in live else None

    return dh, dv2
  # wide: Z2[t] = A2[t] @ W2[t], y_c = sum of pieces: dZ2[t] gathers dy's blocks
  dz2 = _gathered(lambda c: dy_BxN[:, c * b:(c + 1) * b], _pairs(geo, plan.o_out))
  da2 = jnp.einsum("tzq,tcq->tzc", dz2, _w_wide(v2).astype(dz2.dtype), precision=prec,
                   preferred_element_type=_F32)
  dv2 = _dv_wide(jnp.einsum("tzc,tzq->tcq", a2, dz2.astype(a2.dtype), precision=prec,
                            preferred_element_type=_F32), k)
  return (lambda j: da2[j] if j in live else None), dv2


def _fused_bwd(plan: Plan, res, dy_BxN):
  (a1, z1, a2), v1, b1, v2, b2 = res  # a1 has x's dtype
  geo, b, prec = plan.geo_in, plan.geo_in.block, plan.precision_in
  dh, dv2 = _dh_blocks(dy_BxN, a2, v2, plan)
  pre = _pre_blocks(z1, _bias(b1, geo.n, a2.dtype), plan)
  zero = jnp.zeros((dy_BxN.shape[0], b), _F32)

  def dpre(j: int) -> jax.Array:  # dL/dpre_j = act'(pre_j) * dh_j, pre_j recomputed
    g = dh(j)
    if g is None:
      return zero
    _, vjp = jax.vjp(plan.activation, pre(j))
    return vjp(g.astype(_F32))[0]

  k1 = v1.shape[0]
  if _tall(geo):  # y1_t = A1[t] @ W1[t]
    dpre_NxBxb = jnp.stack([dpre(j) for j in range(geo.N)])
    db1 = dpre_NxBxb.sum(axis=1).reshape(-1)
    dv1 = _dv_tall(jnp.einsum("tzq,tzd->tqd", a1, dpre_NxBxb.astype(a1.dtype), precision=prec,
                              preferred_element_type=_F32), k1)
    dx = xla._scatter_form(  # pylint: disable=protected-access
        dpre_NxBxb.astype(a1.dtype), jnp.swapaxes(v1, -1, -2), plan.o_in, geo.M, prec)
  else:  # Z1[t] = x_t @ W1[t]: dZ1[t] gathers dpre of the hidden blocks it lands on
    dz1 = _gathered(dpre, _pairs(geo, plan.o_in))
    db1 = jnp.concatenate([dpre(j).sum(axis=0) for j in range(geo.N)])
    dz1 = dz1.astype(a1.dtype)
    dv1 = _dv_wide(jnp.einsum("tzc,tzq->tcq", a1, dz1, precision=prec,
                              preferred_element_type=_F32), k1)
    dx = xla.from_blocks(jnp.einsum("tzq,tcq->tzc", dz1, _w_wide(v1).astype(dz1.dtype),
                                    precision=prec, preferred_element_type=_F32))
  db1 = None if b1 is None else db1.astype(b1.dtype)
  db2 = None if b2 is None else dy_BxN.astype(_F32).sum(axis=0).astype(b2.dtype)
  return dx.astype(a1.dtype), dv1.astype(v1.dtype), db1, dv2.astype(v2.dtype), db2


_fused.defvjp(_fused_fwd, _fused_bwd)


def _blocks(geo: Geometry, o_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(input block, output block) of entry t of each diagonal k, both (K, D)."""
  t_D = np.arange(geo.D)
  long_KxD = (o_K[:, None] + t_D[None, :]) % geo.P
  short_KxD = np.broadcast_to(t_D, long_KxD.shape)
  return (long_KxD, short_KxD) if _tall(geo) else (short_KxD, long_KxD)


def _constant_term(b1, v2, plan_act: Callable, geo_in: Geometry, geo_out: Geometry,
                   o2: np.ndarray, written: np.ndarray):
  """(n,): what layer 2 makes of the hidden blocks it reads that layer 1 never writes: there
  the hidden activation is act(b1_j) on every row, so its products are one vector (plain
  autodiff gives its gradients to b1 and v2), or None when there is none."""
  rin, rout = _blocks(geo_out, o2)
  const_KxD = ~written[rin]
  if not const_KxD.any():
    return None
  b = geo_in.block
  k_E, t_E = np.nonzero(const_KxD)
  bias = jnp.zeros((geo_in.n,), _F32) if b1 is None else b1.astype(_F32)
  g_ExB = plan_act(bias.reshape(geo_in.N, b))[rin[k_E, t_E]]
  y_E = jnp.einsum("ec,ecd->ed", g_ExB, v2[k_E, t_E].astype(_F32))
  return jnp.zeros((geo_out.N, b), _F32).at[rout[k_E, t_E]].add(y_E).reshape(-1)


def fused_mlp(x, v_in, o_in, bias_in, v_out, o_out, bias_out, geo_in: Geometry,
              geo_out: Geometry, activation: Callable = jax.nn.gelu, precision_in: Any = None,
              precision_out: Any = None) -> jax.Array:
  """y_...xn = act(x @ W_in + bias_in) @ W_out + bias_out for frozen block-diagonal W_in, W_out.

  values (K, D, b, b) with one b > 1 for both layers; offsets concrete (numpy or
  `StaticArray`); biases may be None. `activation` is elementwise (its VJP is taken with
  `jax.vjp`; `jax.nn.gelu` is flax's `nn.gelu`, approximate=True). Rows are any leading shape.
  Only hidden blocks that layer 1 writes and layer 2 reads ("live") go through the fused
  products: diagonals touching no live block are left out, and hidden blocks layer 2 reads
  but layer 1 never writes (act(bias) on every row) add one constant vector to y.
  """
  o1, o2 = np.asarray(o_in, np.int32).reshape(-1), np.asarray(o_out, np.int32).reshape(-1)
  Plan(geo_in, geo_out, xla.Frozen(o1), xla.Frozen(o2), activation)  # checks the geometries
  for name, v, geo, o in (("v_in", v_in, geo_in, o1), ("v_out", v_out, geo_out, o2)):
    if tuple(v.shape) != geo.values_shape(o.shape[0]):
      raise ValueError(f"fused_mlp: {name} has shape {tuple(v.shape)}, its {geo} with "
                       f"{o.shape[0]} offsets needs {geo.values_shape(o.shape[0])}")
    if o.size and (o.min() < 0 or o.max() >= geo.P):
      raise ValueError(f"fused_mlp: offsets of {name} must lie in [0, {geo.P}), got {o}")
  if x.shape[-1] != geo_in.m:
    raise ValueError(f"fused_mlp: x has {x.shape[-1]} features, W_in needs {geo_in.m}")
  written, read = np.zeros(geo_in.N, bool), np.zeros(geo_in.N, bool)
  written[_blocks(geo_in, o1)[1]] = True
  read[_blocks(geo_out, o2)[0]] = True
  live = written & read
  keep1 = np.flatnonzero(live[_blocks(geo_in, o1)[1]].any(axis=1))
  keep2 = np.flatnonzero(live[_blocks(geo_out, o2)[0]].any(axis=1))
  lead = x.shape[:-1]
  x = x.reshape(-1, geo_in.m)
  dtype = jnp.result_type(x, v_in, v_out)
  const = _constant_term(bias_in, v_out, activation, geo_in, geo_out, o2, written)
  if not live.any():  # y does not depend on x
    y = jnp.zeros((x.shape[0], geo_out.n), _F32)
    y = y + (0.0 if bias_out is None else bias_out.astype(_F32)) + (0.0 if const is None else const)
    return y.astype(dtype).reshape(*lead, geo_out.n)
  take = lambda v, keep: v if len(keep) == v.shape[0] else v[keep]
  plan = Plan(geo_in, geo_out, xla.Frozen(o1[keep1]), xla.Frozen(o2[keep2]), activation,
              precision_in, precision_out, tuple(int(j) for j in np.flatnonzero(live)))
  y = _fused(x, take(v_in, keep1), bias_in, take(v_out, keep2), bias_out, plan)
  if const is not None:
    y = (y.astype(_F32) + const).astype(dtype)
  return y.reshape(*lead, geo_out.n)
