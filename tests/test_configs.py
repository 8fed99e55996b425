"""Every config: fields, --config.x=y overrides, model build, two train steps on stand-in data."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from dynadiag_jax import data, models
from dynadiag_jax.train import build, state, step

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["mnist_mlp", "digits_mlp", "cifar10_vit_s", "cifar10_mixer_s", "cifar100_vit_s",
         "imagenet_vit_b", "imagenet_mixer_s", "wikitext103_gpt2_s", "text_gpt2_tiny"]
OFFLINE = {"mnist_mlp", "digits_mlp", "text_gpt2_tiny"}


def _config(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{name}").get_config()


def test_every_config_file_is_listed():
  files = {p.stem for p in (ROOT / "configs").glob("*.py")} - {"__init__", "common"}
  assert files == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_fields(name):
  c = _config(name)
  assert c.sparse and c.sparsity == 0.9
  assert c.allocation in ("uniform", "erk", "compute_fraction")
  assert c.backend in ("auto", "dense", "pallas")
  assert 0 < c.schedule.freeze_fraction < 1 and c.schedule.num_levels >= 2
  assert c.total_steps > 0 or c.num_epochs > 0
  assert set(c.sparse_layers) <= set(models.linear_roles(c.model))
  assert (c.data.name in ("mnist5k", "digits", "pydoc")) == (name in OFFLINE)
  if c.model.name in ("vit", "mixer") and c.data.name.startswith("cifar"):
    assert c.model.patch_size == 4 and c.optimizer.lr == 1e-3 and c.optimizer.weight_decay == 0.05
    assert 128 <= c.batch_size <= 512 and 200 <= c.num_epochs <= 300
  if c.data.name == "imagenet2012":
    o = c.optimizer
    assert (c.batch_size, o.lr, o.weight_decay, c.num_epochs) == (1024, 1e-3, 0.05, 300)
    assert c.data.mixup_alpha > 0 and c.data.crop == "random_resized_crop"
  if c.data.name == "wikitext103":
    assert (c.batch_size, c.data.seq_len, c.optimizer.lr) == (512, 1024, 6e-4)


def test_mnist_mlp_is_the_quickstart_setup():
  c = _config("mnist_mlp")
  spec = build.DataSpec("image", (28, 28, 1), 10, 4000, 1000)
  model, sp = build.build_model(c, spec)
  calls = {k.name: (k.m, k.n, k.sparse) for k in __import__("dynadiag_jax").linear_calls(
      model, None, spec.dummy_input())}
  assert calls == {"fc1": (784, 256, True), "fc2": (256, 256, True), "head": (256, 10, True)}
  assert c.data.name == "mnist5k" and c.allocation == "erk" and sorted(sp) == ["fc1", "fc2", "head"]
  dense, sp0 = build.build_model(ml_collections.ConfigDict({**c.to_dict(), "sparse": False}), spec)
  assert sp0 == {}
  v = dense.init(jax.random.PRNGKey(0), spec.dummy_input())
  assert set(v) == {"params"}  # all nn.Dense


def test_command_line_overrides():
  argv = ["train.py", f"--config={ROOT / 'configs' / 'mnist_mlp.py'}", "--config.sparsity=0.8",
          "--config.model.hidden=(64,32)", "--config.schedule.freeze_fraction=0.5",
          "--config.sparse_layers=('fc1',)", "--config.sparse=False"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  c = fv.config
  assert c.sparsity == 0.8 and tuple(c.model.hidden) == (64, 32) and c.sparse is False
  assert c.schedule.freeze_fraction == 0.5 and tuple(c.sparse_layers) == ("fc1",)
  argv = ["train.py", f"--config={ROOT / 'configs' / 'imagenet_mixer_s.py'}",
          "--config.model.dtype=bfloat16"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  assert fv.config.model.dtype == "bfloat16"
  assert _config("imagenet_mixer_s").model.dtype is None  # no field shared between configs


def _tiny(c: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, build.DataSpec]:
  """Tiny model sizes and a stand-in data spec of the config's kind."""
  m = c.model
  if m.name == "mlp":
    m.hidden = (16, 16)
  elif m.name == "vit":
    m.update(width=16, depth=1, num_heads=2, mlp_dim=32)
  elif m.name == "mixer":
    m.update(hidden=16, depth=1, token_mlp_dim=8, channel_mlp_dim=32)
  else:
    m.update(num_layers=1, width=16, num_heads=2, context=8)
  if m.name == "gpt2":
    vocab = 50257 if c.data.tokenizer == "gpt2" else 257
    return c, build.DataSpec("text", (8,), vocab, 10_000)
  info = data.images.INFO[c.data.name]
  side = 2 * m.patch_size if m.name != "mlp" else 8
  return c, build.DataSpec("image", (side, side, info.channels), info.num_classes, 50_000)


def _stand_in(c, spec: build.DataSpec, b: int, rng: np.random.Generator) -> dict:
  """A (1, b, ...) batch of the right kind: images + int or mixed soft labels, or tokens."""
  if spec.kind == "text":
    tok = rng.integers(0, spec.num_outputs, (1, b, spec.input_shape[0] + 1)).astype(np.int32)
    return {"inputs": tok[..., :-1], "targets": tok[..., 1:]}
  x = rng.normal(size=(1, b, *spec.input_shape)).astype(np.float32)
  y = rng.integers(0, spec.num_outputs, (1, b)).astype(np.int32)
  if c.data.get("mixup_alpha") or c.data.get("cutmix_alpha"):
    y = np.eye(spec.num_outputs, dtype=np.float32)[y] * 0.7 + 0.3 / spec.num_outputs
  return {"image": x, "label": y}


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_and_takes_two_steps(name, rng):
  c, spec = _tiny(_config(name))
  model, sp = build.build_model(c, spec)
  assert sp and set(sp) == set(build.sparse_layers(c))
  steps = build.total_steps(c, spec)
  sched = build.build_schedule(c, steps)
  tx = build.build_optimizer(c, steps, sched, build.steps_per_epoch(c, spec))
  opts = step.FAST_COMPILE
  host = state.create(model, tx, spec.dummy_input(), 0, opts)
  host = state.advance(host, sched, 0)
  devs = jax.local_devices()[:1]
  p_train = step.make_train_step(model, tx, sched, spec, c.label_smoothing, opts)
  r = state.replicate(host, devs)
  before = jax.tree.map(np.copy, host.params)
  losses = []
  for _ in range(2):
    r, m = p_train(r, state.shard(_stand_in(c, spec, 4, rng), devs))
    losses.append(float(m["loss"][0]))
  assert np.isfinite(losses).all()
  after = state.unreplicate(r)
  assert int(after.step) == 2
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after.params)
  assert any(jax.tree.leaves(changed))
