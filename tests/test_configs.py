"""Every config: fields, --config.x=y overrides of every field, model build, two train steps."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import dynadiag_jax as dd
from dynadiag_jax import data, models
from dynadiag_jax.train import build, state, step

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted({p.stem for p in (ROOT / "configs").glob("*.py")} - {"__init__", "common"})
OFFLINE_DATA = ("mnist5k", "digits", "pydoc")
# The size fields of each model (tests/test_configs.py overrides them on the command line).
SIZES = {"mlp": ("hidden",), "vit": ("width", "depth", "num_heads", "mlp_dim"),
         "mixer": ("hidden", "depth", "token_mlp_dim", "channel_mlp_dim"),
         "gpt2": ("width", "num_layers", "num_heads", "context")}


def _config(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{name}").get_config()


def _parse(name: str, *overrides: str) -> ml_collections.ConfigDict:
  """The config of configs/<name>.py as train.py parses it with `overrides`."""
  argv = ["train.py", f"--config={ROOT / 'configs' / f'{name}.py'}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_configs_found():
  assert {"mnist_mlp", "digits_mlp", "cifar10_vit_s", "imagenet_vit_b", "text_gpt2_tiny",
          "wikitext103_gpt2_s"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_fields(name):
  c = _config(name)
  assert c.sparse and c.sparsity == 0.9
  assert c.allocation in ("uniform", "erk", "compute_fraction")
  assert c.backend in ("auto", "dense", "pallas")
  r = build.build_recipe(c)
  assert 0 < r.freeze_fraction < 1 and r.num_levels >= 2
  assert c.total_steps > 0 or c.num_epochs > 0
  assert set(c.sparse_layers) <= set(models.linear_roles(c.model))
  if name in ("mnist_mlp", "digits_mlp", "text_gpt2_tiny", "mnist_vit_wide", "text_gpt2_wide"):
    assert c.data.name in OFFLINE_DATA
  if c.model.name in ("vit", "mixer") and c.data.name.startswith("cifar"):
    assert c.model.patch_size == 4 and c.optimizer.lr == 1e-3 and c.optimizer.weight_decay == 0.05
    assert 128 <= c.batch_size <= 512 and 200 <= c.num_epochs <= 300
  if c.data.name == "imagenet2012":
    o = c.optimizer
    assert (c.batch_size, o.lr, o.weight_decay, c.num_epochs) == (1024, 1e-3, 0.05, 300)
    assert c.data.mixup_alpha > 0 and c.data.crop == "random_resized_crop"
  if c.data.name == "wikitext103":
    assert (c.batch_size, c.data.seq_len, c.optimizer.lr) == (512, 1024, 6e-4)


@pytest.mark.parametrize("name", ["mnist_vit_wide", "text_gpt2_wide"])
def test_wide_configs_match_their_block_table(name):
  """Issue 22: the P / D / K table of mnist_vit_wide's docstring is that of the built layers."""
  c = _config(name)
  spec = (build.DataSpec("image", (28, 28, 1), 10, 4000) if c.model.name == "vit" else
          build.DataSpec("text", (c.data.seq_len,), 257, 10_000))
  model, sp = build.build_model(c, spec)
  shapes = {k.name: (k.m, k.n) for k in dd.linear_calls(model, None, spec.dummy_input())
            if k.name in sp}
  assert set(shapes) == set(c.sparse_layers) and np.allclose(list(sp.values()), 0.9)
  doc = importlib.import_module("configs.mnist_vit_wide").__doc__
  rows = {}
  for line in doc.splitlines():
    cells = [x.strip() for x in line.strip().strip("|").split("|")]
    if len(cells) == 5 and "x" in cells[0] and "/" in cells[1]:
      rows[cells[0]] = [tuple(int(v) for v in x.split("/")) for x in cells[1:]]
  assert len(rows) == 4
  for role, (m, n) in shapes.items():
    got = [(dd.pattern.num_diagonals(m, n, b), dd.pattern.diag_length(m, n, b),
            dd.pattern.num_kept(m, n, 0.9, b), dd.pattern.num_kept(m, n, 0.95, b))
           for b in (1, 16, 32, 64)]
    assert rows[f"{role} {m}x{n}"] == got, role
    assert got[1][0] >= 12  # P >= 12 block-diagonals at b = 16 on every sparse layer


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
          "--config.model.hidden=(64,32)", "--config.recipe.freeze_fraction=0.5",
          "--config.sparse_layers=('fc1',)", "--config.sparse=False"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  c = fv.config
  assert c.sparsity == 0.8 and tuple(c.model.hidden) == (64, 32) and c.sparse is False
  assert c.recipe.freeze_fraction == 0.5 and tuple(c.sparse_layers) == ("fc1",)
  argv = ["train.py", f"--config={ROOT / 'configs' / 'imagenet_mixer_s.py'}",
          "--config.model.dtype=bfloat16"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  assert fv.config.model.dtype == "bfloat16"
  assert _config("imagenet_mixer_s").model.dtype is None  # no field shared between configs


def _fields(c: ml_collections.ConfigDict, prefix: str = ""):
  """(dotted path, type, value) of every field; a typed placeholder gives its type."""
  for k in c.keys():
    f = c._fields[k]  # pylint: disable=protected-access
    if isinstance(f, ml_collections.ConfigDict):
      yield from _fields(f, f"{prefix}{k}.")
    elif isinstance(f, ml_collections.FieldReference):
      yield f"{prefix}{k}", f.get_type(), f.get()
    else:
      yield f"{prefix}{k}", type(f), f


def _sample(t: type, v) -> tuple[str, object]:
  """(command-line text, parsed value) of a new value for a field of type t holding v."""
  if t is bool:
    return str(not v).lower(), not v
  if t is int:
    return "7", 7
  if t is float:
    return "0.25", 0.25
  if t is str:
    return "x1", "x1"
  if t is tuple:
    new = ("a", "b") if v and isinstance(v[0], str) else (0.5, 1.0) if v is None else (3, 5)
    return str(new), new
  return "7", 7  # object: any Python literal


@pytest.mark.parametrize("name", NAMES)
def test_every_field_can_be_overridden(name):
  """Issue 12: data_dir, pad, scale, ... and the model sizes all parse from the command line."""
  fields = list(_fields(_config(name)))
  paths = [p for p, _, _ in fields]
  for want in ("data.data_dir", "data.pad", "data.scale", "data.ratio", "data.mix_prob",
               "data.eval_split", "data.image_size"):
    assert want in paths, want
  model = _config(name).model.name
  assert {f"model.{k}" for k in SIZES[model]} <= set(paths)
  want = {p: _sample(t, v) for p, t, v in fields if p != "model.name"}
  c = _parse(name, *[f"--config.{p}={arg}" for p, (arg, _) in want.items()])
  for p, (_, v) in want.items():
    node = c
    for k in p.split("."):
      node = node[k]
    assert node == v, (p, node, v)


def _tiny(name: str) -> tuple[ml_collections.ConfigDict, build.DataSpec]:
  """configs/<name>.py with tiny model sizes set on the command line, and a stand-in data spec."""
  small = {"mlp": ["--config.model.hidden=(16,16)"],
           "vit": ["--config.model.width=16", "--config.model.depth=1",
                   "--config.model.num_heads=2", "--config.model.mlp_dim=32"],
           "mixer": ["--config.model.hidden=16", "--config.model.depth=1",
                     "--config.model.token_mlp_dim=8", "--config.model.channel_mlp_dim=32"],
           "gpt2": ["--config.model.num_layers=1", "--config.model.width=16",
                    "--config.model.num_heads=2", "--config.model.context=8"]}
  c = _parse(name, *small[_config(name).model.name])
  m = c.model
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


# The (in, out) of one linear per model under _tiny's sizes: the overrides reach the model.
TINY_SHAPE = {"mlp": ("fc2", 16, 16), "vit": ("mlp_in", 16, 32),
              "mixer": ("channel_mlp_in", 16, 32), "gpt2": ("qkv", 16, 48)}


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_and_takes_two_steps(name, rng):
  c, spec = _tiny(name)
  model, sp = build.build_model(c, spec)
  assert sp and set(sp) == set(build.sparse_layers(c))
  role, m, n = TINY_SHAPE[c.model.name]
  calls = {k.name: (k.m, k.n) for k in dd.linear_calls(model, None, spec.dummy_input())}
  assert calls[role] == (m, n)
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
