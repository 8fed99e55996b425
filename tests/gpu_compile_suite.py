"""The GPU-compile cases: what `tests/test_gpu_compile.py` compiles for an H100, no GPU needed.

    <gpu-compile venv python> -m tests.gpu_compile_suite --out results.json [--only PREFIX]

Run in the venv of `tests/gpu_compile_env.py` (it holds the CUDA plugin). Each case is
jitted with ShapeDtypeStructs on a compile-only H100 (`pallas_kernels.aot`) and compiled
through XLA's GPU pipeline, Triton included, to PTX and cubin for sm_90a. The results
(one JSON object per case: ok, error, and a report per Triton kernel) go to --out; the
test file asserts on them. Cases are listed by `cases()` without compiling anything, so
the test file can enumerate them without the plugin.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

KINDS = ("bcsr_spmm", "bcsr_spmm_t", "bcsr_sddmm")
DTYPES = ("float32", "bfloat16")
VIT_B = ((768, 768), (768, 3072), (3072, 768))
ROWS = 197 * 8       # ViT-B tokens x batch 8
SPARSITY = 0.9


@dataclasses.dataclass(frozen=True)
class Case:
  """One compile: `build()` -> (f, args, static_argnums) traced on the target device.

  expect: kernel names that must appear, or, for a negative control, `refused_by`
  'us' (our ValueError before XLA) or 'xla' (XLA's compile error).
  """
  id: str
  build: Callable[[], tuple[Callable, tuple]]
  expect: tuple[str, ...] = ()
  refused_by: str | None = None
  meta: dict = dataclasses.field(default_factory=dict)


def _sds(shape, dtype):
  import jax
  import jax.numpy as jnp
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def _kernels_alone(kind: str, dtype: str, b: int):
  """One kernel at block b and every batch tile, compiled together (told apart by grid)."""
  import jax.numpy as jnp
  from pallas_kernels.bcsr import BLOCKS
  from tests.pallas_testing import kernel_alone
  fs, argss = zip(*(kernel_alone(kind, jnp.dtype(dtype), b, bt, tag=i)
                    for i, bt in enumerate(BLOCKS)))
  sizes = [len(a) for a in argss]

  def f(*flat):
    out, i = [], 0
    for fn, k in zip(fs, sizes):
      out.append(fn(*flat[i:i + k]))
      i += k
    return out

  return f, tuple(a for args in argss for a in args)


def _vit_value_and_grad(dtype: str):
  """value_and_grad over x and values of the three ViT-B layers, 90%, traced offsets."""
  import jax
  import jax.numpy as jnp
  from dynadiag_jax import ops, pattern
  ks = [pattern.num_kept(m, n, SPARSITY) for m, n in VIT_B]

  def loss(xs, vs, os_):
    return sum(jnp.sum(ops.diag_matmul(x, v, o, m, n, "pallas").astype(jnp.float32) ** 2)
               for x, v, o, (m, n) in zip(xs, vs, os_, VIT_B))

  f = jax.value_and_grad(loss, argnums=(0, 1))
  return f, (tuple(_sds((ROWS, m), dtype) for m, _ in VIT_B),
             tuple(_sds((k, pattern.diag_length(m, n)), dtype) for k, (m, n) in zip(ks, VIT_B)),
             tuple(_sds((k,), "int32") for k in ks))


BLOCK_LAYERS = ((3072, 768, 16), (3072, 768, 32), (768, 3072, 64), (768, 3072, 128))


def _blocks_value_and_grad(dtype: str):
  """value_and_grad of block-diagonal layers (b = 16..128, M > N and M < N), 90%, traced
  offsets: the layout is the pattern, values are the block data."""
  import jax
  import jax.numpy as jnp
  from dynadiag_jax import ops, pattern
  geos = [pattern.Geometry(m, n, b) for m, n, b in BLOCK_LAYERS]
  ks = [pattern.num_kept(g.m, g.n, SPARSITY, g.block) for g in geos]

  def loss(xs, vs, os_):
    return sum(jnp.sum(ops.diag_matmul(x, v, o, g.m, g.n, "pallas").astype(jnp.float32) ** 2)
               for x, v, o, g in zip(xs, vs, os_, geos))

  f = jax.value_and_grad(loss, argnums=(0, 1))
  return f, (tuple(_sds((ROWS, g.m), dtype) for g in geos),
             tuple(_sds(g.values_shape(k), dtype) for k, g in zip(ks, geos)),
             tuple(_sds((k,), "int32") for k in ks))


def _train_step(dtype: str, frozen: bool):
  """One jitted step (loss, grads, adamw update) of an MLP of two pallas DiagDense layers
  (block 1, then block 16).

  Exploring: K_active between K and P, the `dynadiag` collection passed in (offsets are
  the traced top-k of alpha). Frozen: after `dd.freeze`, the collection closed over
  (offsets static, exact host layouts).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  import dynadiag_jax as dd

  class Mlp(nn.Module):  # wide diagonals, then narrow 16 x 16 block-diagonals
    @nn.compact
    def __call__(self, x):
      kw = dict(dtype=dtype, backend="pallas")
      x = nn.gelu(dd.DiagDense(256, sparsity=SPARSITY, **kw)(x))
      x = dd.DiagDense(128, sparsity=0.75, block=16, **kw)(x)
      return nn.Dense(10, dtype=dtype)(x.mean(1))

  model = dd.with_phase(Mlp(), 0.5)  # K < K_active < P: diag_matmul runs
  x_sds, y_sds = _sds((8, 17, 128), dtype), _sds((8,), "int32")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros(x_sds.shape, x_sds.dtype))
  if frozen:
    variables, _ = dd.freeze(variables)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)

  def step(params, opt_state, extra, x, y):
    def loss(p):
      logits = model.apply({"params": p, **extra}, x).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return value, optax.apply_updates(params, updates), opt_state

  shapes = lambda t: jax.tree.map(lambda a: _sds(a.shape, a.dtype), t)
  if frozen:  # closed over: numpy offsets reach the backend
    extra_np = jax.tree.map(np.asarray, extra)
    f = lambda p, s, x, y: step(p, s, extra_np, x, y)
    return f, (shapes(params), shapes(opt_state), x_sds, y_sds)
  return step, (shapes(params), shapes(opt_state), shapes(extra), x_sds, y_sds)


def _mesh_devices(n: int = 2):
  """n compile-only H100s in one process (topology 1 slice x 1 host x n devices)."""
  from pathlib import Path
  from jax.experimental import topologies
  from pallas_kernels import aot
  topo = topologies.get_topology_desc("", "cuda", topology=f"1x1x{n}",
                                      target_config=Path(aot.H100).read_text())
  return topo.devices


def _sharded_train_step(frozen: bool):
  """`_train_step` (float32) over a 2-device ('data', 'fsdp') = (2, 1) mesh, the batch split
  along 'data', the pallas products per shard (`dynadiag_jax.sharding.use_mesh`)."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import dynadiag_jax as dd
  f, args = _train_step("float32", frozen)
  mesh = Mesh(np.array(_mesh_devices(2)).reshape(2, 1), ("data", "fsdp"))

  def step(*a):
    with dd.sharding.use_mesh(mesh, ("data",)):
      return f(*a)

  rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  put = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  *state, x, y = args
  args = (*jax.tree.map(lambda a: put(a, rep), tuple(state)), put(x, batch), put(y, batch))
  return step, args


def _compile_sharded(f, *args, device=None):
  """aot.compile_kernels for args that carry their own (multi-device) shardings."""
  import shutil
  import tempfile
  import jax
  from pallas_kernels import aot, compat
  tmp = tempfile.mkdtemp(prefix="aot_dump_")
  try:
    with compat.cuda_lowering(compat.H100_KIND):
      lowered = jax.jit(f).trace(*args).lower()
    lowered.compile(compiler_options={"xla_dump_to": tmp})
    return aot.read_dump(tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _over_smem(bypass: bool):
  """256 x 256 f32 blocks, batch tile 16: over 227 KiB of shared memory even unpipelined.

  bypass=False: our check refuses it. bypass=True: the check is skipped (1 stage, 8
  warps), so XLA's own compile must refuse it: the control shows the check is not vacuous.
  """
  import jax.numpy as jnp
  from tests.pallas_testing import kernel_alone
  f, args = kernel_alone("bcsr_spmm", jnp.float32, 256, 16)
  if not bypass:
    return f, args
  from jax.experimental.pallas import triton as pl_triton
  from pallas_kernels import _call

  def unchecked(*a):
    check = _call.compiler_params
    _call.compiler_params = lambda *_, **__: pl_triton.CompilerParams(num_warps=8,
                                                                      num_stages=1)
    try:
      return f(*a)
    finally:
      _call.compiler_params = check

  return unchecked, args


def cases() -> list[Case]:
  """Every case, in run order (cheap ones first)."""
  from pallas_kernels.bcsr import BLOCKS
  out = [Case("negative/ours", functools.partial(_over_smem, False), refused_by="us")]
  for kind in KINDS:
    for dtype in DTYPES:
      for b in BLOCKS:
        out.append(Case(f"kernel/{kind}/{dtype}/b{b}",
                        functools.partial(_kernels_alone, kind, dtype, b), (kind,),
                        meta=dict(kind=kind, dtype=dtype, block=b, tiles=BLOCKS)))
  for dtype in DTYPES:
    out.append(Case(f"vit_b/{dtype}", functools.partial(_vit_value_and_grad, dtype), KINDS,
                    meta=dict(shapes=VIT_B, dtype=dtype)))
  for dtype in DTYPES:
    out.append(Case(f"blocks/{dtype}", functools.partial(_blocks_value_and_grad, dtype),
                    KINDS, meta=dict(layers=BLOCK_LAYERS, dtype=dtype)))
  for phase in ("exploring", "frozen"):
    for dtype in DTYPES:
      out.append(Case(f"train_step/{phase}/{dtype}",
                      functools.partial(_train_step, dtype, phase == "frozen"), KINDS,
                      meta=dict(phase=phase, dtype=dtype)))
  for phase in ("exploring", "frozen"):
    out.append(Case(f"sharded/train_step/{phase}",
                    functools.partial(_sharded_train_step, phase == "frozen"), KINDS,
                    meta=dict(phase=phase, dtype="float32", devices=2)))
  out.append(Case("negative/xla", functools.partial(_over_smem, True), refused_by="xla"))
  return out


def _tile_of(case: Case, grid) -> int | None:
  """The batch tile of a kernel-alone case's kernel, from its grid."""
  from tests.pallas_testing import kernel_grid
  for i, bt in enumerate(case.meta.get("tiles", ())):
    if tuple(grid) == kernel_grid(case.meta["kind"], i):
      return bt
  return None


def run_case(case: Case, device) -> dict[str, Any]:
  """Builds and compiles one case; never raises (errors are data).

  stage: where it stopped: 'build', 'compile' (ours raise ValueError while tracing,
  XLA raises its own error type while compiling), 'done'.
  """
  from pallas_kernels import aot
  t0 = time.perf_counter()
  res: dict[str, Any] = dict(id=case.id, ok=False, stage="build", error=None,
                             error_type=None, kernels=[], meta=case.meta)
  try:
    f, args = case.build()
    res["stage"] = "compile"
    compile_ = _compile_sharded if case.meta.get("devices") else aot.compile_kernels
    reps = [k.as_dict() for k in compile_(f, *args, device=device)]
    for r in reps:
      r["tile"] = _tile_of(case, r["grid"])
    res.update(kernels=reps, ok=True, stage="done")
  except Exception as e:  # noqa: BLE001 -- reported, asserted by the test
    res["error_type"] = type(e).__name__
    res["error"] = f"{type(e).__name__}: {e}"[:4000]
    if res["stage"] == "build":
      res["error"] += "\n" + traceback.format_exc()[-3000:]
  res["seconds"] = round(time.perf_counter() - t0, 2)
  return res


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--only", default="", help="run the cases whose id starts with this")
  a = ap.parse_args(argv)
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from pallas_kernels import aot
  dev = aot.target_device()
  results = []
  todo = [c for c in cases() if c.id.startswith(a.only)]
  t0 = time.perf_counter()
  for i, c in enumerate(todo):
    r = run_case(c, dev)
    results.append(r)
    print(f"[{i + 1}/{len(todo)} {time.perf_counter() - t0:5.0f}s] {c.id}: "
          f"{'ok' if r['ok'] else 'refused'} ({r['seconds']}s)", file=sys.stderr, flush=True)
    with open(a.out, "w") as fh:  # rewritten after every case: nothing lost on interrupt
      json.dump(results, fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
