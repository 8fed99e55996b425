"""A whole ViT with DiagDense layers against the dense ViT on this machine, one run.

    python -m benchmarks.models                  # ViT-S/16, 224 px, 90%, block 64
    python -m benchmarks.models --quick          # depth 4, batch 4
    python -m benchmarks.models --parts          # one encoder block, piece by piece
    python -m benchmarks.models --recipe fast    # a named recipe: its block, mixing, cover
    python -m benchmarks.models --recipe fast --mixing learned   # and another mixing

Every linear layer of the encoder blocks (qkv, attn_out, mlp_in, mlp_out) is a DiagDense
at the given sparsity and block (each layer the largest valid block up to it), backend
`auto`; the head, patch embedding and norms stay dense. Measured, interleaved round-robin,
medians: inference images/s (jitted forward, train=False) and train steps/s (loss, grads,
AdamW update) for the dense ViT, the sparse ViT while exploring (K_active = K, offsets
traced from alpha) and after the freeze (offsets closed over as constants, as the training
loop does), the frozen one also with its MLPs unfused (`LayerFactory(fuse_mlp=False)`: two
plain layer calls instead of `dynadiag_jax.mlp_block`'s fused op).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dynadiag_jax as dd
from benchmarks.layers import time_round_robin
from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.models.vit import ViT

LINEARS = ("qkv", "attn_out", "mlp_in", "mlp_out")


def _split(variables):
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  return params, rest


def _infer(model, rest, closed: bool):
  """jit(params, [rest,] x) -> logits; frozen offsets closed over when `closed`."""
  if closed:
    const = jax.tree.map(np.asarray, rest)
    return jax.jit(lambda p, x: model.apply({"params": p, **const}, x))
  return jax.jit(lambda p, x: model.apply({"params": p, **rest}, x))


def _train(model, rest, closed: bool, tx):
  """jit(params, opt_state, x, y) -> (params, opt_state, loss): one AdamW step."""
  const = jax.tree.map(np.asarray, rest) if closed else None

  def step(p, s, x, y, cols):
    def loss(p):
      logits = model.apply({"params": p, **cols}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    val, g = jax.value_and_grad(loss)(p)
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s, val

  if closed:
    return jax.jit(lambda p, s, x, y: step(p, s, x, y, const))
  return jax.jit(lambda p, s, x, y: step(p, s, x, y, rest))


def build(variant: str, depth: int | None, sparsity: float, block: int | None, image: int,
          batch: int, key, recipe: str | dd.recipe.Recipe = "default"):
  """{name: (kind, fn, state)}: inference and train variants, each compiled once (block None:
  the recipe's)."""
  x = jax.random.normal(key, (batch, image, image, 3), jnp.float32)
  y = jax.random.randint(key, (batch,), 0, 1000)
  tx = optax.adamw(1e-4)
  dense = ViT(variant, depth=depth, num_classes=1000)
  fac = LayerFactory.from_dict({n: sparsity for n in LINEARS}, block=block, backend="auto",
                               recipe=dd.recipe.get(recipe))
  sparse = ViT(variant, depth=depth, num_classes=1000, linear=fac)
  unfused = ViT(variant, depth=depth, num_classes=1000, linear=fac.replace(fuse_mlp=False))
  vd = dense.init(key, x[:1])
  ve = sparse.init(key, x[:1])
  p_e, r_e = _split(ve)
  # exploring near its end: K_active = K, alpha learned (random here), offsets traced
  p_e = jax.tree_util.tree_map_with_path(
      lambda path, a: jax.random.normal(key, a.shape) if path[-1].key == "alpha" else a, p_e)
  ve = {"params": p_e, **r_e}
  vf, _ = dd.freeze(ve)
  out = {}
  exploring = dd.with_phase(sparse, level=0.0)
  for name, model, v, closed in (("dense", dense, vd, False), ("exploring", exploring, ve, False),
                                 ("frozen", sparse, vf, True),
                                 ("frozen unfused", unfused, vf, True)):
    p, rest = _split(v)
    if name != "exploring":
      out[f"infer {name}"] = ("infer", _infer(model, rest, closed), [p, x])
    st = _train(model, rest, closed, tx)
    out[f"train {name}"] = ("train", st, [p, tx.init(p), x, y])
  return out


def parts(variant: str, sparsity: float, block: int, batch: int, seed: int = 0) -> dict:
  """{part: (fn, args)}: the pieces of one encoder block at ViT shapes, dense and sparse.

  Each linear as nn.Dense and as the frozen layer `diag_matmul(x, values, offsets) + bias`
  with backend `auto` (K, b as the sparse ViT has them), and the dense rest of the block:
  the attention core (`models.attention.core`), a LayerNorm, GELU.
  """
  from dynadiag_jax import ops, pattern  # pylint: disable=import-outside-toplevel
  from dynadiag_jax.models import attention  # pylint: disable=import-outside-toplevel
  from dynadiag_jax.models.vit import VARIANTS  # pylint: disable=import-outside-toplevel
  d, _, h = VARIANTS[variant]
  t, dh = (224 // 16) ** 2 + 1, d // h
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  out = {}
  for name, (m, n) in {"qkv": (d, 3 * d), "attn_out": (d, d), "mlp_in": (d, 4 * d),
                       "mlp_out": (4 * d, d)}.items():
    x, bias = f32(batch, t, m), jnp.zeros((n,), jnp.float32)
    out[f"{name} {m}x{n} nn.Dense"] = (jax.jit(lambda x, w, c: x @ w + c), (x, f32(m, n), bias))
    b = pattern.largest_block(m, n, block)  # as DiagDense(fit_block=True) in the ViT
    geo = pattern.Geometry(m, n, b)
    k = pattern.num_kept(m, n, sparsity, b)
    o = np.sort(rng.choice(geo.P, k, replace=False)).astype(np.int32)
    fn = (lambda o, m, n: jax.jit(lambda x, v, c: ops.diag_matmul(x, v, o, m, n) + c))(o, m, n)
    out[f"{name} {m}x{n} sparse (b {b}, K {k} / {geo.P})"] = (fn, (x, f32(*geo.values_shape(k)), bias))

  out["attention core (dense)"] = (jax.jit(attention.core), (f32(batch, t, 3, h, dh),))
  ln = flax.linen.LayerNorm()
  x = f32(batch, t, d)
  out["layernorm (dense)"] = (jax.jit(ln.apply), (ln.init(jax.random.PRNGKey(0), x), x))
  out["gelu of the MLP (dense)"] = (jax.jit(flax.linen.gelu), (f32(batch, t, 4 * d),))
  return out


def main_parts(args) -> None:
  """Where the time of one encoder block goes: each piece, median ms, interleaved."""
  batch = args.batch or 8
  repeats = args.repeats or 7
  ps = parts(args.variant, args.sparsity, args.block, batch)
  for fn, a in ps.values():
    jax.block_until_ready(fn(*a))
  med = time_round_robin({k: ((lambda _, a, fn=fn: fn(*a)), None, a) for k, (fn, a) in ps.items()},
                         repeats, calls=3)
  print(f"{jax.default_backend()}, one ViT-{args.variant}/16 encoder block, 224 px, batch {batch} "
        f"({batch * ((224 // 16) ** 2 + 1)} rows), float32, sparsity {args.sparsity:g}, block up to "
        f"{args.block}, backend auto, median of {repeats} interleaved rounds, load average "
        f"{os.getloadavg()[0]:.1f}\n")
  print("| part | ms |")
  print("|---|---|")
  for name, t in med.items():
    print(f"| {name} | {t * 1e3:.2f} |")


def _call(kind, fn, state):
  if kind == "infer":
    return fn(*state)
  p, s, x, y = state
  p, s, val = fn(p, s, x, y)
  state[0], state[1] = p, s
  return val


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="depth 4, batch 4, 3 rounds")
  ap.add_argument("--variant", default="S", help="ViT variant (Ti, S, B, ...)")
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--block", type=int, default=None,
                  help="block of every sparse layer (default 64, or the --recipe's)")
  ap.add_argument("--recipe", default=None,
                  help="a named recipe (dd.recipe.RECIPES): its block, mixing, cover and gate")
  ap.add_argument("--mixing", default=None, choices=dd.mixing.NAMES,
                  help="input permutation of every sparse layer (default: the recipe's)")
  ap.add_argument("--batch", type=int, default=None, help="images per call (default 8)")
  ap.add_argument("--image", type=int, default=224)
  ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
  ap.add_argument("--parts", action="store_true",
                  help="time the pieces of one encoder block instead (where the time goes)")
  args = ap.parse_args(argv)
  if args.block is None:
    args.block = dd.recipe.get(args.recipe).block if args.recipe else 64
  if args.parts:
    main_parts(args)
    return
  depth = 4 if args.quick else None
  batch = args.batch or (4 if args.quick else 8)
  repeats = args.repeats or (3 if args.quick else 5)
  key = jax.random.PRNGKey(0)
  print(f"  building and compiling ViT-{args.variant}/16 ...", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  recipe = dd.recipe.get(args.recipe or "default")
  if args.mixing is not None:
    recipe = recipe.replace(mixing=args.mixing)
  vs = build(args.variant, depth, args.sparsity, args.block, args.image, batch, key, recipe)
  for name, (kind, fn, st) in vs.items():
    jax.block_until_ready(_call(kind, fn, st))
    print(f"  compiled {name} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
  times = {k: [] for k in vs}
  for r in range(repeats):
    for name, (kind, fn, st) in vs.items():
      t = time.perf_counter()
      jax.block_until_ready(_call(kind, fn, st))
      times[name].append(time.perf_counter() - t)
    print(f"  round {r + 1} / {repeats}", file=sys.stderr, flush=True)
  med = {k: statistics.median(t) for k, t in times.items()}
  print(f"{jax.default_backend()}, ViT-{args.variant}/16{f' depth {depth}' if depth else ''}, "
        f"{args.image} px, batch {batch}, float32, sparsity {args.sparsity:g} in qkv / attn_out / "
        f"mlp_in / mlp_out, block {args.block}, recipe {args.recipe or 'default'}, mixing "
        f"{recipe.mixing}, backend auto, "
        f"median of {repeats} interleaved rounds\n")
  print("| model | inference images/s | vs dense | train steps/s | vs dense |")
  print("|---|---|---|---|---|")
  for name in ("dense", "exploring", "frozen", "frozen unfused"):
    inf = med.get(f"infer {name}")
    tr = med[f"train {name}"]
    i_cell = (f"{batch / inf:.2f} | {med['infer dense'] / inf:.2f}x" if inf is not None
              else "- | -")
    print(f"| {name} | {i_cell} | {1 / tr:.3f} | {med['train dense'] / tr:.2f}x |")


if __name__ == "__main__":
  main()
