"""The fused sparse MLP against two plain layers, the dense backend and float64 numpy; models."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynadiag_jax as dd
from dynadiag_jax import mlp_block, ops
from dynadiag_jax.backends import fused_mlp
from dynadiag_jax.diag_dense import DiagDense
from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.models import GPT2
from dynadiag_jax.models.mixer import Mixer
from dynadiag_jax.models.vit import ViT
from dynadiag_jax.pattern import Geometry
from tests.test_backend_xla import _blocks_of, _np_dense

_TOL = dict(rtol=2e-4, atol=2e-4)
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
jit = functools.partial(jax.jit, compiler_options=FAST)
_C = np.sqrt(2 / np.pi)


def _gelu64(u):
  """flax's nn.gelu (approximate=True) and its derivative, float64."""
  a = np.tanh(_C * (u + 0.044715 * u ** 3))
  d = 0.5 * (1 + a) + 0.5 * u * (1 - a ** 2) * _C * (1 + 3 * 0.044715 * u ** 2)
  return 0.5 * u * (1 + a), d


def _offsets(rng, geo: Geometry, k: int, must=None) -> np.ndarray:
  """K sorted random offsets; with `must`, one of them is `must` (so the layers overlap)."""
  pool = [p for p in range(geo.P) if p != must]
  o = list(rng.choice(pool, k - (must is not None), replace=False))
  return np.sort(o + ([must] if must is not None else [])).astype(np.int32)


def _case(rng, m, h, n, b, k1, k2, rows):
  """x, c (cotangent), (v1, o1, b1), (v2, o2, b2): layer 1 writes a hidden block layer 2 reads."""
  g1, g2 = Geometry(m, h, b), Geometry(h, n, b)
  o2 = _offsets(rng, g2, k2)
  # a hidden block layer 2 reads (tall: (o + t) % H, here t = 0; wide: block 0): wide layer 1
  # writes block o1_k at t = 0, a tall one writes every block
  read = int(o2[0]) if g2.M >= g2.N else 0
  o1 = _offsets(rng, g1, k1, None if g1.M >= g1.N else read)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  v1 = f(*g1.values_shape(k1)) * np.float32(1 / np.sqrt(k1 * b))
  v2 = f(*g2.values_shape(k2)) * np.float32(1 / np.sqrt(k2 * b))
  return f(rows, m), f(rows, n), (v1, o1, f(h)), (v2, o2, f(n)), (g1, g2)


def _np_ref(x, c, l1, l2, geos):
  """(y, dx, dv1, db1, dv2, db2) of sum(mlp(x) * c) in float64."""
  (v1, o1, b1), (v2, o2, b2), (g1, g2) = l1, l2, geos
  w1 = _np_dense(v1.astype(np.float64), o1, g1.m, g1.n, g1.block)
  w2 = _np_dense(v2.astype(np.float64), o2, g2.m, g2.n, g2.block)
  x, c = x.astype(np.float64), c.astype(np.float64)
  pre = x @ w1 + b1
  hid, dact = _gelu64(pre)
  y = hid @ w2 + b2
  dpre = (c @ w2.T) * dact
  dv = lambda dw, o, g, v: np.stack([_blocks_of(dw, p, g.m, g.n, g.block) for p in o]).reshape(v.shape)
  return (y, dpre @ w1.T, dv(x.T @ dpre, o1, g1, v1), dpre.sum(0), dv(hid.T @ c, o2, g2, v2),
          c.sum(0))


def _grads(mlp, x, c, l1, l2):
  """(y, dx, dv1, db1, dv2, db2) of sum(mlp(x, v1, b1, v2, b2) * c), jitted."""
  def loss(x, v1, b1, v2, b2):
    y = mlp(x, v1, b1, v2, b2)
    return (y * c).sum(), y

  g, y = jit(jax.grad(loss, argnums=range(5), has_aux=True))(x, l1[0], l1[2], l2[0], l2[2])
  return (y, *g)


def _two_layers(backend, l1, l2, geos):
  (_, o1, _), (_, o2, _), (g1, g2) = l1, l2, geos
  return lambda x, v1, b1, v2, b2: ops.diag_matmul(
      nn.gelu(ops.diag_matmul(x, v1, o1, g1.m, g1.n, backend) + b1), v2, o2, g2.m, g2.n,
      backend) + b2


# (m, h, n, block, K1, K2, rows): the models' wide -> tall (ViT-like, rows no multiple of
# anything), rectangular (m != n), tall -> wide, wide -> wide, tall -> tall, square, K = 1
# at 1 row, K2 = all diagonals (hidden blocks read twice over).
CASES = [
    (64, 256, 64, 16, 3, 2, 37), (48, 192, 96, 16, 4, 5, 11), (256, 64, 128, 16, 2, 3, 9),
    (32, 64, 128, 16, 2, 3, 5), (128, 64, 32, 16, 3, 2, 6), (64, 64, 64, 32, 2, 1, 3),
    (32, 128, 32, 16, 1, 1, 1), (32, 64, 32, 8, 3, 8, 13),
]


@pytest.mark.parametrize("m,h,n,b,k1,k2,rows", CASES)
def test_matches_two_layers_dense_and_float64(m, h, n, b, k1, k2, rows, rng):
  x, c, l1, l2, geos = _case(rng, m, h, n, b, k1, k2, rows)
  (_, o1, _), (_, o2, _) = l1, l2
  fused = lambda x, v1, b1, v2, b2: fused_mlp.fused_mlp(x, v1, o1, b1, v2, o2, b2, *geos)
  got = _grads(fused, x, c, l1, l2)
  ref64 = _np_ref(x, c, l1, l2, geos)
  chex.assert_shape(got, tuple(np.shape(r) for r in ref64))
  assert np.abs(ref64[1]).max() > 0 and np.abs(ref64[2]).max() > 0  # the layers do meet
  chex.assert_trees_all_close(got, tuple(r.astype(np.float32) for r in ref64), **_TOL)
  for backend in ("xla", "dense"):
    chex.assert_trees_all_close(got, _grads(_two_layers(backend, l1, l2, geos), x, c, l1, l2),
                                **_TOL)


def test_pruned_diagonals_and_constant_hidden_blocks(rng):
  """H = 8 blocks: layer 1 writes 0, 1 (diagonal 0) and 4, 5 (diagonal 1, never read: left
  out); layer 2 reads 1, 2 (diagonal 0: block 1 live, block 2 constant act(b1)) and 6, 7
  (diagonal 1, all constant: left out, its products one vector)."""
  g1, g2 = Geometry(32, 128, 16), Geometry(128, 32, 16)
  o1, o2 = np.array([0, 4], np.int32), np.array([1, 6], np.int32)
  f = lambda *s: rng.normal(size=s).astype(np.float32) / 4
  x, c = f(5, 32), f(5, 32)
  l1, l2 = (f(2, 2, 16, 16), o1, f(128)), (f(2, 2, 16, 16), o2, f(32))
  fused = lambda x, v1, b1, v2, b2: fused_mlp.fused_mlp(x, v1, o1, b1, v2, o2, b2, g1, g2)
  got = _grads(fused, x, c, l1, l2)
  ref64 = _np_ref(x, c, l1, l2, (g1, g2))
  chex.assert_trees_all_close(got, tuple(r.astype(np.float32) for r in ref64), **_TOL)
  assert np.abs(ref64[3][32:48]).max() > 0  # db1 of the constant block 2
  chex.assert_trees_all_equal(got[2][1], jnp.zeros_like(got[2][1]))  # dv1 of diagonal 1


def test_leading_axes_no_bias_and_disjoint_layers(rng):
  """(B, T, m) inputs; biases None; layers that never meet give dx = dv1 = 0 (no NaN)."""
  g1, g2 = Geometry(32, 128, 16), Geometry(128, 32, 16)  # H = 8 hidden blocks
  o1, o2 = np.array([0], np.int32), np.array([4], np.int32)  # writes 0, 1; reads 4, 5
  v1 = rng.normal(size=g1.values_shape(1)).astype(np.float32)
  v2 = rng.normal(size=g2.values_shape(1)).astype(np.float32)
  x = rng.normal(size=(2, 5, 32)).astype(np.float32)

  def loss(x, v1, v2):
    return (fused_mlp.fused_mlp(x, v1, o1, None, v2, o2, None, g1, g2) ** 2).sum()

  dx, dv1, dv2 = jax.grad(loss, argnums=(0, 1, 2))(x, v1, v2)
  y = fused_mlp.fused_mlp(x, v1, o1, None, v2, o2, None, g1, g2)
  ref = ops.diag_matmul(nn.gelu(ops.diag_matmul(x, v1, o1, 32, 128, "dense")), v2, o2, 128, 32,
                        "dense")
  chex.assert_shape(y, (2, 5, 32))
  chex.assert_trees_all_close(y, ref, **_TOL)  # gelu(0) = 0: y = 0 as well
  chex.assert_trees_all_equal((dx, dv1), (jnp.zeros_like(dx), jnp.zeros_like(dv1)))
  assert np.all(np.isfinite(dv2))


def test_bad_arguments_name_the_problem():
  g1, g2 = Geometry(32, 64, 16), Geometry(64, 48, 16)
  v = jnp.zeros(g1.values_shape(1))  # (1, 2, 16, 16); W_out's are (1, 3, 16, 16)
  with pytest.raises(ValueError, match="one block size > 1"):
    fused_mlp.fused_mlp(jnp.zeros((2, 32)), v, [0], None, v, [0], None, g1, Geometry(64, 32, 32))
  with pytest.raises(ValueError, match="v_out has shape"):
    fused_mlp.fused_mlp(jnp.zeros((2, 32)), v, [0], None, v, [0], None, g1, g2)
  with pytest.raises(ValueError, match="offsets of v_in"):
    fused_mlp.fused_mlp(jnp.zeros((2, 32)), v, [7], None, jnp.zeros(g2.values_shape(1)), [0],
                        None, g1, g2)


# -- models ---------------------------------------------------------------------------------

class _Pair(nn.Module):
  """An MLP of two DiagDense layers through `sparse_mlp`; `layer` builds each."""
  hidden: int
  out: int
  fuse: bool = True
  block: int = 16
  backend: str = "auto"
  cls: type = DiagDense

  @nn.compact
  def __call__(self, x, between=None):
    kw = dict(sparsity=0.8, block=self.block, backend=self.backend)
    return mlp_block.sparse_mlp(self.cls(self.hidden, name="mlp_in", **kw),
                                self.cls(self.out, name="mlp_out", **kw), x, nn.gelu, between,
                                fuse=self.fuse)


class _Mixed(DiagDense):
  """A DiagDense with a random input permutation (`mixing`): never fused."""
  mixing: str = "random"


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
  """One entry per `fused_mlp.fused_mlp` call traced from here on."""
  seen: list[int] = []
  real = fused_mlp.fused_mlp
  monkeypatch.setattr(fused_mlp, "fused_mlp", lambda *a, **kw: seen.append(1) or real(*a, **kw))
  return seen


def _frozen(model, x, seed):
  """Frozen variables of `model` (random alpha, so the offsets are a random choice)."""
  v = jit(dd.with_phase(model).init)(jax.random.key(seed), x)
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: jax.random.normal(jax.random.key(seed + 1), a.shape)
      if p[-1].key == "alpha" else a, v)
  return dd.freeze(v)[0]


def test_sparse_mlp_fuses_only_frozen_xla_blocks(rng, fused_calls):
  seed = int(rng.integers(1 << 30))
  x = jnp.asarray(rng.normal(size=(3, 7, 32)), jnp.float32)
  fz = _frozen(_Pair(128, 48), x, seed)
  y, y_plain = jit(_Pair(128, 48).apply)(fz, x), jit(_Pair(128, 48, fuse=False).apply)(fz, x)
  assert len(fused_calls) == 1  # StaticArray offsets stay concrete under jit
  chex.assert_trees_all_close(y, y_plain, **_TOL)
  # not fused (traced only): exploring, dropout between, block 1, backend dense, a mixing
  # layer, offsets traced (plain arrays passed into jit)
  shape = lambda f, *a: jax.eval_shape(f, *a)
  shape(functools.partial(dd.with_phase(_Pair(128, 48)).init, jax.random.key(seed)), x)
  shape(lambda v, x: _Pair(128, 48).apply(v, x, between=lambda h: h), fz, x)
  shape(_Pair(128, 48, block=1).apply, _frozen(_Pair(128, 48, block=1), x, seed), x)
  shape(_Pair(128, 48, backend="dense").apply, fz, x)
  shape(_Pair(128, 48, cls=_Mixed).apply, _frozen(_Pair(128, 48, cls=_Mixed), x, seed), x)
  shape(_Pair(128, 48).apply, dd.static.arrays(fz), x)
  assert len(fused_calls) == 1
  shape(_Pair(128, 48, backend="xla").apply, fz, x)
  assert len(fused_calls) == 2


def _vit(fuse: bool, block: int = 16) -> ViT:
  fac = LayerFactory.from_dict({"attn_out": 0.8, "mlp_in": 0.8, "mlp_out": 0.8}, block=block,
                               fuse_mlp=fuse)
  return ViT("Ti", patch_size=4, num_classes=10, width=64, depth=1, num_heads=2, mlp_dim=256,
             linear=fac)


def _logits_and_grads(model, variables, x):
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(p, x):
    out = model.apply({"params": p, **rest}, x)
    return (out * jnp.arange(out.shape[-1])).sum() + (out ** 2).sum(), out

  (g, gx), out = jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return out, g, gx


def test_vit_fused_matches_plain_and_keeps_the_tree(rng, fused_calls):
  seed = int(rng.integers(1 << 30))
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  init = lambda fuse: jax.eval_shape(dd.with_phase(_vit(fuse)).init, jax.random.key(seed), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(init(True), init(False))  # the same tree
  fz = _frozen(_vit(True), x, seed)
  head = fz["params"]["head"]  # a zero-init head would hide the features
  head["kernel"] = jnp.asarray(rng.normal(size=head["kernel"].shape), jnp.float32)
  got = _logits_and_grads(_vit(True), fz, x)
  assert len(fused_calls) == 1
  want = _logits_and_grads(_vit(False), fz, x)
  assert len(fused_calls) == 1
  chex.assert_trees_all_equal_structs(got, want)
  calls = {c.name: c for c in dd.linear_calls(_vit(True), fz, x)}  # summaries see both layers
  assert calls["mlp_in"].frozen and calls["mlp_out"].k == fz["params"]["block_0"]["mlp_out"][
      "values"].shape[0]
  assert len(fused_calls) == 1
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # float32 sums of large terms
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=2e-5 * float(np.abs(b).max()) + 1e-6)


@pytest.mark.parametrize("name", ["mixer", "gpt2"])
def test_mixer_and_gpt2_fuse_their_mlps(name, rng, fused_calls):
  seed = int(rng.integers(1 << 30))
  if name == "mixer":
    roles = ("token_mlp_in", "token_mlp_out", "channel_mlp_in", "channel_mlp_out")
    make = lambda fuse: Mixer("S", patch_size=4, num_classes=10, hidden=32, depth=1,
                              token_mlp_dim=32, channel_mlp_dim=64, linear=LayerFactory.from_dict(
                                  {r: 0.5 for r in roles}, block=8, backend="xla", fuse_mlp=fuse))
    x, calls = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32), 2
  else:
    make = lambda fuse: GPT2("tiny", vocab_size=32, context=8, num_layers=1, width=32,
                             num_heads=2, linear=LayerFactory.from_dict(
                                 {"mlp_in": 0.5, "mlp_out": 0.5}, block=8, backend="xla", fuse_mlp=fuse))
    x, calls = jnp.asarray(rng.integers(0, 32, size=(2, 8)), jnp.int32), 1
  fz = _frozen(make(True), x, seed)
  got = jit(make(True).apply)(fz, x)
  assert len(fused_calls) == calls
  chex.assert_trees_all_close(got, jit(make(False).apply)(fz, x), rtol=1e-4, atol=1e-4)
