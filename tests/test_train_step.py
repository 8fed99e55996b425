"""The pmapped train step closes over the frozen pattern (static offsets for the kernels)."""

import dataclasses

import jax
import numpy as np
import pytest

import dynadiag_jax as dd
from dynadiag_jax import ops
from dynadiag_jax.train import build, state, step

from configs import digits_mlp


def test_frozen_step_sees_concrete_offsets(rng):
  seen = []

  def prepare(o_K, geo, cfg):
    seen.append(isinstance(o_K, jax.core.Tracer))
    return o_K

  ops.register_backend(dataclasses.replace(ops.resolve_backend("dense"), name="spy_step",
                                           prepare=prepare))
  c = digits_mlp.get_config()
  c.backend, c.total_steps = "spy_step", 10
  spec = build.DataSpec("image", (8, 8, 1), 10, 1437)
  model, _ = build.build_model(c, spec)
  sched = build.build_schedule(c, 10)
  tx = build.build_optimizer(c, 10, sched)
  host = state.create(model, tx, spec.dummy_input(), 0, step.FAST_COMPILE)
  host = state.advance(host, sched, sched.freeze_step - 1)  # K <= K_active < P: diag_matmul
  assert not host.frozen and host.level < 1.0
  devs = jax.local_devices()[:2]
  p_train = step.make_train_step(model, tx, sched, spec, 0.0, step.FAST_COMPILE)
  batch = {"image": rng.normal(size=(2, 4, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, (2, 4)).astype(np.int32)}
  r, _ = p_train(state.replicate(host, devs), state.shard(batch, devs))
  assert seen and all(seen)  # exploring: offsets come from top-k of alpha, traced
  seen.clear()
  frozen = state.advance(state.unreplicate(r), sched, sched.freeze_step)
  assert frozen.frozen
  r, m = p_train(state.replicate(frozen, devs), state.shard(batch, devs))
  assert seen and not any(seen)  # frozen: the pattern is a constant of the step
  assert np.isfinite(np.asarray(m["loss"])).all()
  assert p_train.num_compiled == 2
  out = state.unreplicate(r)
  np.testing.assert_array_equal(out.extra["dynadiag"]["fc1"]["offsets"],
                                frozen.extra["dynadiag"]["fc1"]["offsets"])


def test_kernel_settings_reach_the_layers():
  c = digits_mlp.get_config()
  c.backend = "pallas"
  c.recipe.block = 32
  c.kernel.update(bcsr_block=32, cluster=True)
  assert build.configure_backend(c) == "pallas"
  spec = build.DataSpec("image", (8, 8, 1), 10)
  model, _ = build.build_model(c, spec)
  fc1 = model.linear("fc1", 128)
  assert fc1.kernel_config == ops.KernelConfig(bcsr_block=32, cluster=True)
  assert (fc1.block, fc1.recipe.block, fc1.block_for(64)) == (None, 32, 32)  # the recipe's
  c.recipe.update(name="fast", block=None)  # one name: the fast recipe's layout and cover
  fast = build.build_model(c, spec)[0].linear("fc1", 128)
  assert fast.recipe == dd.recipe.FAST and fast.recipe.cover
  assert fast.block_for(64) == dd.pattern.largest_covering_block(64, 128, fast.sparsity, 32) == 8
  c.kernel.bcsr_block = 24
  with pytest.raises(ValueError, match="power of two"):
    build.configure_backend(c)
  c.kernel.bcsr_block = 16
  c.backend = "nope"
  with pytest.raises(ValueError, match="unknown diag_matmul backend"):
    build.configure_backend(c)


def test_hold_alpha_keeps_the_named_layers_selection_while_the_others_learn(rng):
  c = digits_mlp.get_config()
  c.total_steps, c.recipe.experimental.hold = 10, ("fc1",)
  spec = build.DataSpec("image", (8, 8, 1), 10, 1437)
  model, _ = build.build_model(c, spec)
  sched = build.build_schedule(c, 10)
  tx = build.build_optimizer(c, 10, sched)
  host = state.advance(state.create(model, tx, spec.dummy_input(), 0, step.FAST_COMPILE), sched, 0)
  devs = jax.local_devices()[:1]
  p_train = step.make_train_step(model, tx, sched, spec, 0.0, step.FAST_COMPILE)
  batch = {"image": rng.normal(size=(1, 8, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, (1, 8)).astype(np.int32)}
  r, _ = p_train(state.replicate(host, devs), state.shard(batch, devs))
  r, _ = p_train(r, state.shard(batch, devs))
  out = state.unreplicate(r)
  a0, a1 = host.params["fc1"]["alpha"], out.params["fc1"]["alpha"]
  np.testing.assert_array_equal(a1, a0)  # held: the random start
  assert not np.array_equal(out.params["fc2"]["alpha"], host.params["fc2"]["alpha"])
  assert not np.array_equal(out.params["fc1"]["values"], host.params["fc1"]["values"])
  c.recipe.experimental.hold = ("fc9",)
  with pytest.raises(ValueError, match="not sparse layers"):
    build.build_optimizer(c, 10, sched)
