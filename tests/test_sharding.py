"""diag_matmul (pallas, xla) inside a user's sharded jit step: one train step (loss, grads,
adamw update) over a mesh of four CPU devices equals the same step on one device, exploring
and frozen (docs/SHARDING.md)."""

from __future__ import annotations

import contextlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dynadiag_jax import DiagDense, freeze, ops, sharding, with_phase
from tests.pallas_testing import random_offsets

ROWS, M_IN, CLASSES = 16, 32, 10
TOL = dict(rtol=1e-5, atol=1e-5)
# (mesh shape, axis types, batch axes): FSDP's batch split over both axes, data only, 4 x 1
# (Explicit axes, `jax.make_mesh`'s default: params replicated, as fsdp has one device).
MESHES = {
    "2x2-data": ((2, 2), AxisType.Auto, ("data",)),
    "2x2-data+fsdp": ((2, 2), AxisType.Auto, ("data", "fsdp")),
    "4x1-data-explicit": ((4, 1), AxisType.Explicit, ("data",)),
}


class _MLP(nn.Module):
  """Block-1 then block-16 DiagDense layers, a dense head."""
  backend: str

  @nn.compact
  def __call__(self, x):
    cfg = ops.KernelConfig(interpret=True) if self.backend == "pallas" else ops.KernelConfig()
    kw = dict(backend=self.backend, kernel_config=cfg)
    x = nn.relu(DiagDense(64, sparsity=0.8, block=1, **kw)(x))
    x = nn.relu(DiagDense(32, sparsity=0.5, block=16, **kw)(x))
    return nn.Dense(CLASSES)(x)


def _mesh(name: str) -> tuple[jax.sharding.Mesh, tuple[str, ...]]:
  shape, kind, batch_axes = MESHES[name]
  return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(kind, kind)), batch_axes


def fsdp_spec(a, mesh) -> P:
  """The FSDP rule of the test (and of docs/SHARDING.md): a parameter of 2 or more axes is
  split along 'fsdp' on its largest axis that the axis size divides (the first such if
  tied); vectors (bias, alpha) and the rest are replicated."""
  size = mesh.shape["fsdp"]
  dims = [d for d in np.argsort([-s for s in a.shape], kind="stable") if a.shape[d] % size == 0]
  if size == 1 or a.ndim < 2 or not dims:
    return P()
  return P(*[("fsdp" if d == dims[0] else None) for d in range(a.ndim)])


def _step(model, opt, mesh=None, batch_axes=("data",)):
  def step(params, opt_state, rest, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p, **rest}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    ctx = sharding.use_mesh(mesh, batch_axes) if mesh is not None else contextlib.nullcontext()
    with ctx:
      loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if mesh is not None:  # the updated params keep the FSDP rule (XLA may place them otherwise)
      new_params = jax.tree.map(
          lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, fsdp_spec(a, mesh))),
          new_params)
    return loss, grads, new_params, opt_state

  return jax.jit(step)


def _variables(rng, backend, frozen):
  x = jnp.asarray(rng.standard_normal((ROWS, M_IN)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, ROWS), jnp.int32)
  key = jax.random.PRNGKey(int(rng.integers(2**31)))
  variables = _MLP(backend).init(key, x)
  if frozen:
    variables, _ = freeze(variables)
  return variables, x, y


@pytest.mark.parametrize("frozen", [False, True], ids=["exploring", "frozen"])
@pytest.mark.parametrize("backend", ["pallas", "xla"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_step_equals_single_device(rng, mesh_name, backend, frozen):
  mesh, batch_axes = _mesh(mesh_name)
  variables, x, y = _variables(rng, backend, frozen)
  # level 0: only the top-K diagonals, traced offsets through diag_matmul (frozen: static)
  model = _MLP(backend) if frozen else with_phase(_MLP(backend), level=0.0)
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  # eps 1e-4: adam's first step is ~lr * sign(g); eps keeps float noise on a g ~ 0 from
  # flipping it
  opt = optax.adamw(1e-2, eps=1e-4)

  want = _step(model, opt)(params, opt.init(params), rest, x, y)

  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  params_s = jax.tree.map(lambda a: put(a, fsdp_spec(a, mesh)), params)
  x_s, y_s = put(x, P(batch_axes, None)), put(y, P(batch_axes))
  sharded = _step(model, opt, mesh, batch_axes)
  # every DiagDense product runs per shard (16 rows split evenly), none falls back
  assert str(jax.make_jaxpr(sharded)(params_s, opt.init(params_s), rest, x_s, y_s)).count(
      "shard_map[") == 2 * 2  # 2 layers x (the forward, its transpose: dx and dvalues)
  got = sharded(params_s, opt.init(params_s), rest, x_s, y_s)

  loss, grads, new_params, _ = got
  print(f"{mesh_name} {backend} {'frozen' if frozen else 'exploring'}: max |diff| loss "
        f"{_maxdiff(loss, want[0]):.2e}, grads {_maxdiff(grads, want[1]):.2e}, "
        f"params {_maxdiff(new_params, want[2]):.2e}")
  chex.assert_trees_all_close(loss, want[0], **TOL)
  chex.assert_trees_all_close(grads, want[1], **TOL)
  chex.assert_trees_all_close(new_params, want[2], **TOL)
  # the params kept the FSDP rule's sharding through the step
  for a in jax.tree.leaves(new_params):
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, fsdp_spec(a, mesh)), a.ndim)


def _maxdiff(a, b) -> float:
  """The largest |a - b| over two trees of the same structure."""
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _jaxpr(f, *args) -> str:
  # a fresh function each time: jax caches traces by function and use_mesh is not in the key
  return str(jax.make_jaxpr(lambda *a: f(*a))(*args))


def test_no_mesh_is_the_plain_product(rng):
  """Without use_mesh (and with a one-device batch split) no shard_map is traced."""
  m, n, k = 32, 48, 5
  o = random_offsets(rng, m, n, k)
  x = jnp.asarray(rng.standard_normal((8, m)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((k, m)), jnp.float32)
  f = lambda x, v: ops.diag_matmul(x, v, o, m, n, "xla")
  assert sharding.current() is None
  assert "shard_map" not in _jaxpr(f, x, v)
  mesh = jax.make_mesh((1, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  with sharding.use_mesh(mesh, "data"):  # one device along 'data': nothing to split
    assert "shard_map" not in _jaxpr(f, x, v)
  with sharding.use_mesh(mesh, ("data", "fsdp")) as rule:
    assert rule.shards == 4 and sharding.current() is rule
    assert "shard_map" in _jaxpr(f, x, v)
    assert "shard_map" not in _jaxpr(lambda x, v: ops.diag_matmul(x, v, o, m, n, "dense"), x, v)
  assert sharding.current() is None


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_rows_not_divisible_fall_back(rng, backend):
  """6 rows on 4 shards: the plain product (XLA places it), still equal to one device."""
  m, n, k = 32, 48, 5
  o = random_offsets(rng, m, n, k)
  x = jnp.asarray(rng.standard_normal((6, m)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((k, m)), jnp.float32)
  mesh = jax.make_mesh((4, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  loss = lambda x, v: jnp.sum(jnp.tanh(ops.diag_matmul(x, v, o, m, n, backend)) ** 2)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  want = grad(x, v)

  @jax.jit
  def sharded(x, v):
    with sharding.use_mesh(mesh):
      return jax.value_and_grad(loss, argnums=(0, 1))(x, v)

  assert "shard_map" not in _jaxpr(sharded, x, v)
  chex.assert_trees_all_close(sharded(x, v), want, **TOL)


def test_use_mesh_checks_its_axes():
  mesh = jax.make_mesh((4, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  with pytest.raises(ValueError, match="batch_axes"):
    with sharding.use_mesh(mesh, ("batch",)):
      pass
  with pytest.raises(TypeError, match="Mesh"):
    with sharding.use_mesh("data"):
      pass
  assert sharding.current() is None


def test_inside_the_callers_shard_map_is_the_plain_product(rng):
  """Called inside the user's own shard_map over the batch axes, the product is already
  per shard: no second shard_map, and the result is the per-shard product."""
  m, n, k = 32, 48, 5
  o = random_offsets(rng, m, n, k)
  x = jnp.asarray(rng.standard_normal((8, m)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((k, m)), jnp.float32)
  mesh = jax.make_mesh((4, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)

  def local(x, v):
    with sharding.use_mesh(mesh):
      return ops.diag_matmul(x, v, o, m, n, "xla")

  # check_vma off: the backends' loops do not mark their carries varying (xla.py's
  # fori_loop fails jax's check), as in sharding.product
  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"),
                            check_vma=False))
  assert _jaxpr(f, x, v).count("shard_map[") == 1
  chex.assert_trees_all_close(f(x, v), ops.diag_matmul(x, v, o, m, n, "xla"), **TOL)


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("traced", [False, True], ids=["static", "traced"])
@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_diag_matmul_with_fsdp_sharded_values(rng, backend, traced, kind):
  """diag_matmul alone on a 2 x 2 mesh, values split along 'fsdp' (gathered for the
  product), x along 'data': value and gradients (x, values) equal one device's."""
  m, n, k = 32, 48, 5
  o = random_offsets(rng, m, n, k)
  x = jnp.asarray(rng.standard_normal((8, m)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((k, m)), jnp.float32)
  mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(kind,) * 2)
  cfg = ops.KernelConfig(interpret=True)

  def loss(x, v, o_arg):
    y = ops.diag_matmul(x, v, o_arg if traced else o, m, n, backend, cfg)
    return jnp.mean(jnp.tanh(y) * jnp.arange(n) / n)

  @jax.jit
  def sharded(x, v, o_arg):
    with sharding.use_mesh(mesh):
      return jax.value_and_grad(loss, argnums=(0, 1))(x, v, o_arg)

  want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, v, jnp.asarray(o))
  x_s = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  v_s = jax.device_put(v, NamedSharding(mesh, P(None, "fsdp")))
  assert _jaxpr(sharded, x_s, v_s, jnp.asarray(o)).count("shard_map[") == 2
  got = sharded(x_s, v_s, jnp.asarray(o))
  diffs = [_maxdiff(a, b) for a, b in zip((got[0], *got[1]), (want[0], *want[1]))]
  print(f"max |diff| loss, dx, dvalues: {diffs}")
  chex.assert_trees_all_close(got, want, **TOL)


def test_use_mesh_as_a_decorator_under_jit(rng):
  """@jax.jit over @use_mesh(mesh): the context is entered while jit traces, so every trace
  (the first included) sees it; no context is left behind."""
  m, n, k = 32, 48, 5
  o = random_offsets(rng, m, n, k)
  x = jnp.asarray(rng.standard_normal((8, m)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((k, m)), jnp.float32)
  mesh = jax.make_mesh((4, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)

  @jax.jit
  @sharding.use_mesh(mesh)
  def f(x, v):
    return ops.diag_matmul(x, v, o, m, n, "xla")

  assert _jaxpr(f, x, v).count("shard_map[") == 1
  chex.assert_trees_all_close(f(x, v), ops.diag_matmul(x, v, o, m, n, "xla"), **TOL)
  assert sharding.current() is None
