"""The pallas backend under jit, grad, vmap and pmap, and a small DiagDense model training."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dynadiag_jax import DiagDense, freeze, ops, static, with_phase
from pallas_kernels import diag
from tests.pallas_testing import assert_close, fresh_seed, random_offsets

F32 = jnp.float32


def _setup(m=40, n=24, k=6, rows=5, lead=()):
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  o = random_offsets(rng, m, n, k)
  x = jnp.asarray(rng.standard_normal((*lead, rows, m)), F32)
  v = jnp.asarray(rng.standard_normal((k, min(m, n))), F32)
  return seed, x, v, o


def test_jit_grad_of_scalar_loss():
  seed, x, v, o = _setup()
  m, n = 40, 24

  def loss(x, v, o, backend):
    y = ops.diag_matmul(x, v, o, m, n, backend)
    return jnp.sum(jnp.tanh(y) * jnp.arange(n))

  g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3)
  got, want = g(x, v, o, "pallas"), g(x, v, o, "dense")
  for a, b, name in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("loss", "dx", "dv")):
    assert_close(a, b, F32, seed, name)


def test_vmap_over_batch_axis_and_over_patterns():
  seed, x, v, o = _setup(lead=(3,))
  m, n = 40, 24
  grad = lambda be: jax.jit(jax.vmap(
      jax.value_and_grad(lambda x, v: jnp.sum(ops.diag_matmul(x, v, o, m, n, be) ** 2),
                         argnums=(0, 1)), in_axes=(0, None)))
  got, want = grad("pallas")(x, v), grad("dense")(x, v)
  chex.assert_trees_all_equal_shapes(got, want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(a, b, F32, seed, "vmap(grad)")
  # Per-example values and offsets (traced, batched): the jittable layout under vmap.
  rng = np.random.default_rng(seed)
  o_3K = jnp.asarray(np.stack([random_offsets(rng, m, n, 6) for _ in range(3)]))
  v_3KD = jnp.asarray(rng.standard_normal((3, 6, n)), F32)
  fwd = lambda be: jax.jit(jax.vmap(lambda x, v, o: ops.diag_matmul(x, v, o, m, n, be)))
  assert_close(fwd("pallas")(x, v_3KD, o_3K), fwd("dense")(x, v_3KD, o_3K), F32, seed,
               "vmap over patterns")


def test_pmap_data_parallel_grad():
  ndev = jax.local_device_count()
  seed, x, v, o = _setup(lead=(ndev,))
  m, n = 40, 24

  def step(be):
    def f(x, v):
      g = jax.grad(lambda v: jnp.mean(ops.diag_matmul(x, v, o, m, n, be) ** 2))(v)
      return lax.pmean(g, "d")
    return jax.pmap(f, axis_name="d", in_axes=(0, None))

  got, want = step("pallas")(x, v), step("dense")(x, v)
  chex.assert_shape(got, (ndev, *v.shape))
  assert_close(got, want, F32, seed, "pmap grad")


class _MLP(nn.Module):
  backend: str
  kernel: ops.KernelConfig = ops.KernelConfig()

  @nn.compact
  def __call__(self, x):
    kw = dict(sparsity=0.5, backend=self.backend, kernel_config=self.kernel)
    x = nn.relu(DiagDense(16, **kw)(x))
    return DiagDense(8, **kw)(x)


def _train(backend, x, y, variables, steps=5, kernel=ops.KernelConfig(), level=1.0):
  # level 1: every diagonal computed; 0: only the top K (frozen layers ignore it)
  model = with_phase(_MLP(backend, kernel), level)
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  opt = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, rest):  # frozen offsets (StaticArray) pass in static
    def loss(p):
      return jnp.mean((model.apply({"params": p, **rest}, x) - y) ** 2)
    val, g = jax.value_and_grad(loss)(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, val

  opt_state, losses = opt.init(params), []
  for _ in range(steps):
    params, opt_state, val = step(params, opt_state, rest)
    losses.append(float(val))
  return np.asarray(losses)


def test_diag_dense_trains_like_dense_backend():
  seed = fresh_seed()
  key_x, key_y, key_i = jax.random.split(jax.random.PRNGKey(seed % 2**31), 3)
  x = jax.random.normal(key_x, (32, 12))
  y = jax.random.normal(key_y, (32, 8))
  variables = _MLP("dense").init(key_i, x)
  n_params = sum(a.size for a in jax.tree.leaves(variables["params"]))
  assert 200 <= n_params <= 1000
  for level in (1.0, 0.0):  # every diagonal; only the top-K (K_active = K)
    _compare_training(x, y, variables, f"level={level} seed={seed}", level=level)
  # Frozen: offsets are static (no leaves) in the jitted step, so the exact host layout is used.
  frozen, _ = freeze(variables)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(frozen)[0]]
  assert not any("alpha" in p or "offsets" in p for p in paths)
  assert set(frozen["dynadiag"]) == set(frozen["params"]) == {"DiagDense_0", "DiagDense_1"}
  for layer in frozen["dynadiag"].values():
    assert set(layer) == {"offsets", "in_features"}
    assert all(isinstance(a, static.StaticArray) for a in layer.values())
  for cluster in (False, True):
    calls = sum(diag._host_layout.cache_info()[:2])  # hits + misses
    _compare_training(x, y, frozen, f"frozen cluster={cluster} seed={seed}",
                      ops.KernelConfig(cluster=cluster))
    assert sum(diag._host_layout.cache_info()[:2]) > calls  # the host layout was used


def _compare_training(x, y, variables, what, kernel=ops.KernelConfig(), level=1.0):
  pal = _train("pallas", x, y, variables, kernel=kernel, level=level)
  den = _train("dense", x, y, variables, level=level)
  assert den[-1] < den[0]
  try:
    chex.assert_trees_all_close(pal, den, rtol=1e-5, atol=1e-5)
  except AssertionError as e:
    raise AssertionError(f"{what}: {pal} vs {den}") from e
