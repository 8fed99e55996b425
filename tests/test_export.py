"""Export of frozen models (symbolic batch / sequence) and densify, against model.apply."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynadiag_jax as dd
from dynadiag_jax import export as ddx
from dynadiag_jax import ops
from dynadiag_jax.models import GPT2, MLP

# fc1 81x1024 block 1 at 99% (xla, scatter windows in row tiles); fc2 1024x64 and fc3
# 64x1024 block 16 at 95% (xla gather form; scatter form with K = 4 > 2); head 1024x10
# takes block 2 (the largest dividing both sides up to 16; the dense backend).
MLP_SPARSITY = {"fc1": 0.99, "fc2": 0.95, "fc3": 0.95, "head": 0.9}
GPT_SPARSITY = {"qkv": 0.9, "attn_out": 0.9, "mlp_in": 0.9, "mlp_out": 0.9}
VOCAB, CONTEXT = 50, 16


def _mlp():
  return MLP(hidden=(1024, 64, 1024), linear=dd.LayerFactory.from_dict(MLP_SPARSITY, block=16))


def _gpt2(block=1):
  return GPT2(size="tiny", vocab_size=VOCAB, context=CONTEXT, num_layers=1, width=32,
              num_heads=2, linear=dd.LayerFactory.from_dict(GPT_SPARSITY, block=block))


def _frozen(model, x, seed=0):
  """Frozen variables with non-zero biases (so densify's bias is checked too)."""
  v = jax.jit(model.init)(jax.random.PRNGKey(seed), x)
  rng = np.random.default_rng(seed)
  v = jax.tree_util.tree_map(
      lambda a: np.asarray(a) + np.float32(0.05) * rng.standard_normal(a.shape, np.float32)
      if jnp.issubdtype(a.dtype, jnp.floating) else a, v)
  return dd.freeze(v)[0]


LOADER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np

    def load(path):  # docs/EXPORT.md: plain jax + numpy
      exp = jax.export.deserialize(bytearray(open(f"{path}/exported.bin", "rb").read()))
      weights = jax.device_put(dict(np.load(f"{path}/weights.npz")))
      run = jax.jit(exp.call)
      return lambda x: run(weights, x)

    cases = np.load(sys.argv[1])
    worst = {}
    for name in sorted({k.split(":")[0] for k in cases.files}):
      fn = load(f"{sys.argv[2]}/{name}")
      i = 0
      while f"{name}:x{i}" in cases.files:
        x, want = cases[f"{name}:x{i}"], cases[f"{name}:y{i}"]
        got = np.asarray(fn(x))
        assert got.shape == want.shape, (name, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        worst[f"{name}{x.shape}"] = float(np.max(np.abs(got - want)))
        i += 1
    assert "dynadiag_jax" not in sys.modules, "the loader imported dynadiag_jax"
    print(worst)
""")


@pytest.fixture(scope="module")
def frozen():
  """name -> (model, frozen variables, example input)."""
  mlp, gpt = _mlp(), _gpt2(block=16)
  x_mlp, x_gpt = jnp.ones((2, 9, 9)), jnp.ones((2, CONTEXT), jnp.int32)
  return {"mlp": (mlp, _frozen(mlp, x_mlp), x_mlp), "gpt2": (gpt, _frozen(gpt, x_gpt), x_gpt)}


@pytest.fixture(scope="module")
def artifacts(frozen, tmp_path_factory):
  """The folder holding one export per model: 'mlp' (symbolic batch), 'gpt2' (batch and sequence)."""
  root = tmp_path_factory.mktemp("export")
  model, v, x = frozen["mlp"]
  ddx.export(model, v, x, root / "mlp")
  model, v, x = frozen["gpt2"]
  ddx.export(model, v, x, root / "gpt2", symbolic=("b", "t"), constraints=(f"t <= {CONTEXT}",))
  return root


def test_export_runs_in_a_fresh_process_without_the_library(frozen, artifacts, tmp_path):
  rng = np.random.default_rng(0)
  inputs = {"mlp": [rng.normal(size=(b, 9, 9)).astype(np.float32) for b in (1, 64)],
            "gpt2": [rng.integers(0, VOCAB, (b, t)).astype(np.int32)
                     for b, t in ((1, 3), (64, CONTEXT))]}
  cases = {}
  for name, (model, v, _) in frozen.items():
    apply = jax.jit(model.apply)
    for i, x in enumerate(inputs[name]):
      cases[f"{name}:x{i}"], cases[f"{name}:y{i}"] = x, np.asarray(apply(v, x))
  np.savez(tmp_path / "cases.npz", **cases)

  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "cases.npz"), str(artifacts)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  print(out.stdout)


def test_artifact_holds_only_the_compact_weights(frozen, artifacts):
  model, v, _ = frozen["mlp"]
  path = artifacts / "mlp"
  meta = json.loads((path / "meta.json").read_text())
  with np.load(path / "weights.npz") as z:
    stored = {k: z[k].shape for k in z.files}
  assert stored == {k: np.shape(a) for k, a in ddx._flat(v["params"]).items()}
  for layer in ("fc1", "fc2", "fc3", "head"):  # K x D values, no dense kernel
    assert f"{layer}/values" in stored and f"{layer}/kernel" not in stored
  assert stored["fc1/values"] == (11, 81)
  assert meta["input"]["shape"] == ["b", "9", "9"]
  assert meta["sparse_layers"] == ["fc1", "fc2", "fc3", "head"]
  assert meta["weight_bytes"] == sum(int(np.prod(s)) * 4 for s in stored.values())
  fn = ddx.load(path)
  xb = jax.random.normal(jax.random.PRNGKey(3), (5, 9, 9))
  np.testing.assert_allclose(fn(xb), jax.jit(model.apply)(v, xb), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_densify_gives_the_dense_model_variables(frozen, name):
  model, v, x = frozen[name]
  dense = ddx.dense_model(model)
  dv = ddx.densify(model, v)
  want = jax.eval_shape(dense.init, jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_structure(dv) == jax.tree_util.tree_structure(want)
  assert jax.tree_util.tree_map(jnp.shape, dv) == jax.tree_util.tree_map(jnp.shape, want)
  x = x[:1] if name == "mlp" else x[:1, :11]  # any batch (and length)
  np.testing.assert_allclose(jax.jit(dense.apply)(dv, x), jax.jit(model.apply)(v, x),
                             rtol=1e-5, atol=1e-5)


def test_densify_of_a_bias_free_wide_layer_needs_the_input():
  model = dd.DiagDense(48, sparsity=0.75, use_bias=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16))
  v = dd.freeze(model.init(jax.random.PRNGKey(1), x))[0]
  with pytest.raises(ValueError, match="example_input"):
    ddx.densify(model, v)
  dv = ddx.densify(model, v, example_input=x)
  assert dv["params"]["kernel"].shape == (16, 48)
  np.testing.assert_allclose(ddx.dense_model(model).apply(dv, x), model.apply(v, x),
                             rtol=1e-5, atol=1e-6)


def test_export_refuses_exploring_variables(tmp_path):
  model = _gpt2()
  x = jnp.ones((2, 4), jnp.int32)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="freeze"):
    ddx.export(model, v, x, tmp_path)
  with pytest.raises(ValueError, match="freeze"):
    ddx.densify(model, v)


@pytest.mark.parametrize("backend", ["xla", "dense", "auto"])
@pytest.mark.parametrize("m,n,block,k", [(40, 24, 1, 3), (16, 160, 1, 2), (96, 32, 1, 30),
                                         (64, 32, 16, 2), (32, 96, 16, 1), (32, 128, 16, 3)])
def test_diag_matmul_exports_with_a_symbolic_row_count(backend, m, n, block, k, rng):
  """Every product of the backends at a symbolic batch (x of shape (b, 3, m): rows 3 b)."""
  geo = dd.pattern.Geometry(m, n, block)
  offsets = np.sort(rng.choice(geo.P, k, replace=False)).astype(np.int32)
  values = jnp.asarray(rng.normal(size=geo.values_shape(k)), jnp.float32)

  def f(x):  # offsets closed over: static, as in a frozen model
    return ops.diag_matmul(x, values, offsets, m, n, backend=backend)

  b, = jax.export.symbolic_shape("b")
  exp = jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct((b, 3, m), jnp.float32))
  w = dd.pattern.densify(values, offsets, m, n, block)
  for rows in (1, 30):  # 3 and 90 rows: both sides of the row bounds of concrete shapes
    x = jnp.asarray(rng.normal(size=(rows, 3, m)), jnp.float32)
    np.testing.assert_allclose(exp.call(x), x @ w, rtol=1e-5, atol=1e-5)


def test_export_for_two_platforms_and_bfloat16_weights(tmp_path):
  """platforms=('cpu', 'cuda') lowers both (runs the cpu half here); bfloat16 weights travel
  as their bits and `load` views them back."""
  model = MLP(hidden=(64,), linear=dd.LayerFactory.from_dict({"fc1": 0.9},
                                                             param_dtype=jnp.bfloat16))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8))
  v = _frozen(model, x)
  v = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == np.float32 else a, v)
  exp = ddx.export(model, v, x, tmp_path, platforms=("cpu", "cuda"))
  assert exp.platforms == ("cpu", "cuda")
  meta = json.loads((tmp_path / "meta.json").read_text())
  assert meta["weights"]["fc1/values"]["dtype"] == "bfloat16"
  with np.load(tmp_path / "weights.npz") as z:
    assert z["fc1/values"].dtype == np.uint16
  np.testing.assert_allclose(ddx.load(tmp_path)(x), jax.jit(model.apply)(v, x), rtol=1e-2, atol=1e-2)
