"""Cost of channel mixing and of coverage-aware selection, side by side on this machine.

    python -m benchmarks.mixing                 # 1576 rows, 768x3072 and 3072x768, b = 64, 90%
    python -m benchmarks.mixing --repeats 3     # a short run (a shared machine: note it)

Frozen: a DiagDense (backend 'auto', frozen on random alpha, variables closed over so the
offsets and the perm are constants, as in the train step after the freeze) with mixing
'none', 'stride' and 'random'; forward, and forward + backward (grads of x and params).
Exploring: the same layer at the last K_active level (K diagonals), recipe.cover off and
on (the selection runs in the step: a top-k, or the top-k and the DP). Timed round-robin,
medians, as ratios over the first variant of each group (benchmarks.layers' timing).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import dynadiag_jax as dd
from benchmarks.layers import calls_per_sample, time_round_robin


def _fn(model, variables, mode: str):
  """A jitted call closing over `variables` (constants, as `PatternStep` does once frozen)."""
  if mode == "fwd":
    return jax.jit(lambda p, x: model.apply({**variables, "params": p}, x))
  loss = lambda p, x: jnp.mean(model.apply({**variables, "params": p}, x) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def frozen_variants(m, n, rows, b, s, mode, seed=0) -> dict:
  """{'mixing=...': (fn, params, x)}: the frozen layer for each mixing."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(rows, m)), jnp.float32)
  out = {}
  for mix in ("none", "stride", "random"):
    layer = dd.DiagDense(n, sparsity=s, block=b, mixing=mix)
    v = layer.init(jax.random.PRNGKey(seed), x[:1])
    v["params"]["alpha"] = jnp.asarray(rng.normal(size=v["params"]["alpha"].shape), jnp.float32)
    frozen, _ = dd.freeze(v)
    fn = _fn(layer, frozen, mode)
    jax.block_until_ready(fn(frozen["params"], x))
    out[f"mixing={mix}"] = (fn, frozen["params"], x)
  return out


def exploring_variants(m, n, rows, b, s, mode, seed=0) -> dict:
  """{'cover=...': (fn, params, x)}: the exploring layer at K_active = K."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(rows, m)), jnp.float32)
  out = {}
  for cov in (False, True):
    layer = dd.DiagDense(n, sparsity=s, block=b, recipe=dd.recipe.DEFAULT.replace(cover=cov))
    v = layer.init(jax.random.PRNGKey(seed), x[:1])
    v["params"]["alpha"] = jnp.asarray(rng.normal(size=v["params"]["alpha"].shape), jnp.float32)
    fn = _fn(dd.with_phase(layer, 0.0, 0.05), {k: a for k, a in v.items() if k != "params"}, mode)
    jax.block_until_ready(fn(v["params"], x))
    out[f"cover={cov}"] = (fn, v["params"], x)
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="768x3072,3072x768")
  ap.add_argument("--rows", type=int, default=1576)
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--modes", default="fwd,train")
  ap.add_argument("--repeats", type=int, default=7)
  a = ap.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {a.rows} rows, block "
        f"{a.block}, sparsity {a.sparsity}; medians of {a.repeats} rounds, time / first row")
  for shape in a.shapes.split(","):
    m, n = (int(v) for v in shape.split("x"))
    for mode in a.modes.split(","):
      for what, make in (("frozen", frozen_variants), ("exploring", exploring_variants)):
        vs = make(m, n, a.rows, a.block, a.sparsity, mode)
        first = next(iter(vs))
        calls = calls_per_sample({"nn.Dense": vs[first]})
        t = time_round_robin(vs, a.repeats, calls)
        for key, sec in t.items():
          print(f"{m}x{n:<5} {mode:5} {what:9} {key:14} {sec * 1e3:8.3f} ms  "
                f"{sec / t[first]:.3f}x")


if __name__ == "__main__":
  main()
