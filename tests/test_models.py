"""Models: shapes, which roles are DiagDense, GPT-2 causality, training, parameter counts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import dynadiag_jax as dd
from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.models import GPT2, attention, build, linear_roles, sparse_roles

# Tiny models: compile time dominates, so compile without the slow XLA CPU passes.
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
jit = functools.partial(jax.jit, compiler_options=FAST)

VOCAB, CTX = 64, 16
TINY = {
    "mlp": dict(name="mlp", hidden=[32, 16], num_classes=10),
    "vit": dict(name="vit", variant="Ti", patch_size=4, num_classes=10, width=32, depth=2,
                num_heads=2, mlp_dim=64),
    "vit_gap": dict(name="vit", variant="Ti", patch_size=4, num_classes=10, width=32, depth=2,
                    num_heads=2, mlp_dim=64, pool="gap"),
    "mixer": dict(name="mixer", variant="S", patch_size=4, num_classes=10, hidden=32, depth=2,
                  token_mlp_dim=16, channel_mlp_dim=64),
    "gpt2": dict(name="gpt2", size="tiny", vocab_size=VOCAB, context=CTX, num_layers=2, width=32,
                 num_heads=2),
    "gpt2_split": dict(name="gpt2", size="tiny", vocab_size=VOCAB, context=CTX, num_layers=2,
                       width=32, num_heads=2, split_qkv=True),
}


def _cfg(key: str, **kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**TINY[key], **kw})


def _factory(cfg, sparse: bool) -> LayerFactory:
  return LayerFactory.from_dict({r: 0.9 for r in sparse_roles(cfg)} if sparse else {}, backend="dense")


def _model(cfg, sparse: bool):
  """The model of `cfg`; a sparse one in the first exploration phase (every diagonal)."""
  model = build(cfg, _factory(cfg, sparse))
  return dd.with_phase(model) if sparse else model


def _batch(cfg, b: int = 4, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """(inputs, targets): images (B, 16, 16, 3) and labels, or tokens (B, CTX) and next tokens."""
  kx, ky = jax.random.split(jax.random.key(seed))
  if cfg.name == "gpt2":
    tok = jax.random.randint(kx, (b, CTX + 1), 0, VOCAB)
    return tok[:, :-1], tok[:, 1:]
  return jax.random.normal(kx, (b, 16, 16, 3)), jax.random.randint(ky, (b,), 0, 10)


@functools.lru_cache(maxsize=None)
def _built(key: str, sparse: bool):
  """(cfg, model, variables, x, y, apply) of the tiny model `key`, initialised once per session."""
  cfg = _cfg(key)
  model = _model(cfg, sparse)
  x, y = _batch(cfg)
  apply = jit(model.apply, static_argnames="train")
  return cfg, model, jit(model.init)(jax.random.key(0), x), x, y, apply


def _random_like(a: jax.Array) -> jax.Array:
  """N(0, 1) in a's shape (a zero-init head, or an all-ones one after LayerNorm, outputs ~0)."""
  return jax.random.normal(jax.random.key(7), a.shape, a.dtype)


def _linears(tree, path=()) -> dict[str, set[str]]:
  """role -> {'diag', 'dense'}: the kind of every linear module (2-D kernel or alpha) by its name."""
  out: dict[str, set[str]] = {}
  if "alpha" in tree or ("kernel" in tree and tree["kernel"].ndim == 2):
    out.setdefault(path[-1], set()).add("diag" if "alpha" in tree else "dense")
    return out
  for k, v in tree.items():
    if isinstance(v, dict):
      for r, kinds in _linears(v, path + (k,)).items():
        out.setdefault(r, set()).update(kinds)
  return out


def _loss(model, variables, x, y) -> jax.Array:
  logits = model.apply(variables, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("key", list(TINY))
def test_build_shapes_and_roles(key, sparse):
  cfg, _, variables, x, _, apply = _built(key, sparse)
  assert set(variables) == ({"params", "dynadiag"} if sparse else {"params"})
  out = apply(variables, x)
  want = (4, CTX, VOCAB) if cfg.name == "gpt2" else (4, 10)
  assert out.shape == want and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  kinds = _linears(variables["params"])
  assert set(kinds) == set(linear_roles(cfg))
  for role, k in kinds.items():
    assert k == ({"diag"} if sparse and role in sparse_roles(cfg) else {"dense"}), role


@pytest.mark.parametrize("key", ["vit", "gpt2"])
def test_split_qkv_is_the_fused_projection_split(key):
  """split_qkv: 'q', 'k', 'v' linears compute what 'qkv' does with its kernel in three parts."""
  fused = build(_cfg(key), LayerFactory())
  split = build(_cfg(key, split_qkv=True), LayerFactory())
  x, _ = _batch(_cfg(key))
  v = fused.init(jax.random.key(0), x)
  p = jax.tree.map(lambda a: a, v["params"])
  for blk in [k for k in p if k.startswith("block_")]:
    qkv = p[blk]["attn"].pop("qkv")
    w, b = np.split(qkv["kernel"], 3, axis=1), np.split(qkv["bias"], 3)
    p[blk]["attn"].update({r: {"kernel": w[i], "bias": b[i]} for i, r in enumerate("qkv")})
  if "head" in p:  # the ViT's zero-init head would hide every difference
    p["head"]["kernel"] = _random_like(p["head"]["kernel"])
    v = {"params": {**v["params"], "head": p["head"]}}
  want = fused.apply(v, x)
  assert float(jnp.abs(want).max()) > 0.1
  got = split.apply({"params": p}, x)
  assert set(linear_roles(_cfg(key, split_qkv=True))) >= {"q", "k", "v"}
  assert "qkv" not in linear_roles(_cfg(key, split_qkv=True))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  ref = jax.tree.map(jnp.shape, split.init(jax.random.key(0), x)["params"])
  assert jax.tree.map(jnp.shape, p) == ref


def test_split_qkv_layers_named_k_are_layers_not_collection_fields():
  """A sparse layer called 'k' (split_qkv) is found, frozen and counted like any other."""
  _, model, variables, x, _, apply = _built("gpt2_split", True)
  roles = {p[-1] for p in dd.exploring_layers(variables)}
  assert roles == {"q", "k", "v", "attn_out", "mlp_in", "mlp_out"}
  frozen, _ = dd.freeze(variables)
  assert not dd.exploring_layers(frozen)
  calls = [c for c in dd.linear_calls(model, frozen, x) if c.sparse]
  assert {c.path[-1] for c in calls} == roles and all(c.frozen for c in calls)
  assert np.all(np.isfinite(apply(frozen, x)))


def test_sparse_roles():
  assert sparse_roles({"name": "mlp", "hidden": (8, 8, 8)}) == ("fc1", "fc2", "fc3")
  assert sparse_roles({"name": "vit"}) == ("attn_out", "mlp_in", "mlp_out")
  assert sparse_roles({"name": "gpt2"}) == ("qkv", "attn_out", "mlp_in", "mlp_out")
  assert set(sparse_roles({"name": "mixer"})) == {
      "token_mlp_in", "token_mlp_out", "channel_mlp_in", "channel_mlp_out"}
  with pytest.raises(ValueError):
    build(ml_collections.ConfigDict({"name": "vit", "no_such_field": 1}))
  with pytest.raises(ValueError):
    build(ml_collections.ConfigDict({"name": "resnet"}))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gpt2_causal(sparse):
  _, _, variables, x, _, apply = _built("gpt2", sparse)
  base = apply(variables, x)
  for t in (0, 5, CTX - 2):
    noise = jax.random.randint(jax.random.key(t), x.shape, 0, VOCAB)
    x2 = x.at[:, t + 1:].set((x[:, t + 1:] + 1 + noise[:, t + 1:] % (VOCAB - 1)) % VOCAB)
    out = apply(variables, x2)
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=1e-5)
    assert not np.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)


def test_gpt2_context_limit():
  model = GPT2(size="tiny", vocab_size=VOCAB, context=8, num_layers=1, width=16, num_heads=2)
  with pytest.raises(ValueError, match="context"):
    model.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("key", ["mlp", "vit", "mixer", "gpt2"])
def test_adam_lowers_loss(key):
  _, model, variables, x, y, _ = _built(key, True)
  params, state = variables["params"], {"dynadiag": variables["dynadiag"]}
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jit
  def step(params, opt_state):
    loss, g = jax.value_and_grad(lambda p: _loss(model, {"params": p, **state}, x, y))(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  losses = []
  for _ in range(10):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("key", ["vit", "mixer", "gpt2"])
def test_dropout_uses_rng(key):
  _, _, variables, x, _, eval_apply = _built(key, True)  # eval_apply: same model, no dropout
  model = _model(_cfg(key, dropout=0.3), sparse=True)
  apply = jit(model.apply, static_argnames="train")
  variables = jax.tree_util.tree_map(lambda v: v, variables)  # a copy: the cache stays intact
  if "head" in variables["params"]:  # a zero-init head hides the features
    variables["params"]["head"]["kernel"] = _random_like(variables["params"]["head"]["kernel"])
  eval_out = eval_apply(variables, x)
  a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  c = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, eval_out)


@pytest.mark.parametrize("key", ["vit", "gpt2"])
def test_bfloat16_compute_float32_params(key):
  _, _, variables, x, _, ref_apply = _built(key, True)
  model = _model(_cfg(key, dtype="bfloat16"), sparse=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes["params"]))
  variables = jax.tree_util.tree_map(lambda v: v, variables)
  if "head" in variables["params"]:  # a zero-init head would make the comparison vacuous
    variables["params"]["head"]["kernel"] = _random_like(variables["params"]["head"]["kernel"])
  jaxpr = str(jax.make_jaxpr(model.apply)(variables, x))
  assert "preferred_element_type=bfloat16" in jaxpr  # matmuls run in bf16
  ref = ref_apply(variables, x)
  out = jit(model.apply)(variables, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05 * float(np.abs(ref).max()), rtol=0)


def _num_params(cfg: dict, x: jax.ShapeDtypeStruct) -> int:
  shapes = jax.eval_shape(build(ml_collections.ConfigDict(cfg)).init, jax.random.key(0), x)
  return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"]))


IMG = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
TOK = jax.ShapeDtypeStruct((1, 1024), jnp.int32)


@pytest.mark.parametrize("cfg,x,want", [
    (dict(name="vit", variant="S", patch_size=16, num_classes=1000), IMG, 22_050_664),
    (dict(name="vit", variant="B", patch_size=16, num_classes=1000), IMG, 86_567_656),
    (dict(name="mixer", variant="S", patch_size=16, num_classes=1000), IMG, 18_528_264),
    (dict(name="mixer", variant="B", patch_size=16, num_classes=1000), IMG, 59_880_472),
    (dict(name="gpt2", size="small", vocab_size=50257), TOK, 124_439_808),
], ids=["vit-s16", "vit-b16", "mixer-s16", "mixer-b16", "gpt2-small"])
def test_param_counts(cfg, x, want):
  """The published sizes (ViT-B/16 86.6M, Mixer-S/16 18.5M, B/16 59.9M, GPT-2 small 124.4M)."""
  assert _num_params(cfg, x) == want


def _attention_np(qkv: np.ndarray, causal: bool) -> np.ndarray:
  """softmax(q k^T / sqrt(dh)) v per batch and head, float64, loops over heads."""
  b, t, _, h, dh = qkv.shape
  out = np.zeros((b, t, h, dh))
  for i in range(b):
    for j in range(h):
      q, k, v = (qkv[i, :, p, j].astype(np.float64) for p in range(3))
      s = q @ k.T / np.sqrt(dh)
      if causal:
        s = np.where(np.tri(t, dtype=bool), s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      out[i, :, j] = (w / w.sum(-1, keepdims=True)) @ v
  return out.reshape(b, t, h * dh)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_core_matches_float64(causal):
  qkv = np.random.default_rng(7).normal(size=(2, 9, 3, 3, 4)).astype(np.float32)
  got = jax.jit(attention.core, static_argnums=1)(qkv, causal)
  np.testing.assert_allclose(np.asarray(got), _attention_np(qkv, causal), rtol=1e-5, atol=1e-5)


def test_mlp_permute_is_a_fixed_reordering_of_each_linears_inputs(rng):
  """permute=True equals the plain MLP with each kernel's input rows permuted alike, in every run."""
  from dynadiag_jax.models.mlp import MLP, unit_permutation
  x = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  plain, perm = MLP(hidden=(16, 8), num_classes=6), MLP(hidden=(16, 8), num_classes=6, permute=True)
  v = plain.init(jax.random.key(int(rng.integers(1 << 30))), x)
  w = jax.tree.map(lambda a: a, v)
  for i, role in enumerate(("fc1", "fc2", "head")):
    k = np.asarray(v["params"][role]["kernel"])
    w["params"][role]["kernel"] = jnp.asarray(k[unit_permutation(i, k.shape[0])])
  np.testing.assert_allclose(perm.apply(w, x), plain.apply(v, x), rtol=1e-5, atol=1e-6)
  assert not np.allclose(perm.apply(v, x), plain.apply(v, x), atol=1e-3)
  p = unit_permutation(0, 20)
  assert sorted(p) == list(range(20)) and (p != np.arange(20)).any()
  np.testing.assert_array_equal(p, unit_permutation(0, 20))  # fixed: not drawn from the run's seed
