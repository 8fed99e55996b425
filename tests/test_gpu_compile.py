"""Every Pallas kernel compiles for an H100 (sm_90a) without a GPU, through XLA and Triton.

The compiles run once per session in a subprocess with the venv of
`tests/gpu_compile_env.py` (the CUDA plugin never enters this process), over the cases of
`tests/gpu_compile_suite.py`; each test below asserts on one case's result: it compiled,
its kernels use tensor cores, spill no registers and stay within our shared-memory
estimate; the two negative controls are refused (by our check, and by XLA without it).

DYNADIAG_GPU_COMPILE=skip skips them; in CI (CI=true) or with =require, a plugin that
cannot be installed fails them instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from pallas_kernels import _call
from tests import gpu_compile_env, gpu_compile_suite as suite

ROOT = Path(__file__).resolve().parents[1]
CASES = {c.id: c for c in suite.cases()}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
  mode = os.environ.get("DYNADIAG_GPU_COMPILE", "")
  mode = mode or ("require" if os.environ.get("CI", "").lower() == "true" else "")
  if mode == "skip":
    pytest.skip("DYNADIAG_GPU_COMPILE=skip")
  try:
    py = gpu_compile_env.ensure()
  except RuntimeError as e:
    if mode == "require":
      pytest.fail(f"the CUDA compile plugin is required here but cannot be installed:\n{e}")
    pytest.skip(f"the CUDA compile plugin cannot be installed here, GPU compile not checked: {e}")
  out = tmp_path_factory.mktemp("gpu_compile") / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run([str(py), "-m", "tests.gpu_compile_suite", "--out", str(out)], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=1800)
  sys.stderr.write(r.stderr[-6000:])  # progress, shown by pytest on failure
  if r.returncode or not out.exists():
    pytest.fail(f"the GPU-compile suite failed ({r.returncode}):\n{r.stderr[-6000:]}")
  return {c["id"]: c for c in json.loads(out.read_text())}


def _case(results, cid: str) -> dict:
  assert cid in results, f"{cid} did not run"
  return results[cid]


def _compiled(res: dict, want: tuple[str, ...]) -> list[dict]:
  assert res["ok"], f"{res['id']} did not compile:\n{res['error']}"
  ks = res["kernels"]
  assert set(want) <= {k["name"] for k in ks}, (res["id"], [k["name"] for k in ks])
  for k in ks:
    assert k["registers"] is not None, "ptxas (nvidia-cuda-nvcc-cu12) missing"
    assert k["spill_bytes"] == 0, f"{res['id']}: {k['name']} spills registers: {k}"
    assert "mma" in k["mma"], f"{res['id']}: {k['name']} uses no tensor-core MMA: {k}"
    assert 0 < k["smem"] <= _call.SMEM_LIMIT, k
  return ks


@pytest.mark.parametrize("cid", [c for c in CASES if c.startswith("kernel/")])
def test_kernel_every_batch_tile_compiles(results, cid):
  """One kernel x dtype x block, at every batch tile; launch and resources as configured."""
  meta = CASES[cid].meta
  ks = _compiled(_case(results, cid), (meta["kind"],))
  assert sorted(k["tile"] for k in ks) == sorted(meta["tiles"])
  dtype = jnp.dtype(meta["dtype"])
  for k in ks:
    p = _call.compiler_params(meta["kind"], meta["block"], k["tile"], dtype)
    assert k["threads"] == 32 * p.num_warps
    est = _call.smem_estimate(meta["kind"], meta["block"], k["tile"], dtype, p.num_stages)
    assert k["smem"] <= est, f"shared memory {k['smem']} over our estimate {est}: {k}"
    if dtype == jnp.bfloat16:
      assert "bf16" in k["mma"], k


@pytest.mark.parametrize("dtype", suite.DTYPES)
def test_vit_b_value_and_grad_compiles(results, dtype):
  """value_and_grad of diag_matmul at 768x768, 768x3072, 3072x768 (90%, 1576 rows)."""
  ks = _compiled(_case(results, f"vit_b/{dtype}"), suite.KINDS)
  assert sorted(k["name"] for k in ks) == sorted(suite.KINDS * len(suite.VIT_B))


@pytest.mark.parametrize("dtype", suite.DTYPES)
def test_block_diagonal_value_and_grad_compiles(results, dtype):
  """Block-diagonal layers, b = 16, 32, 64, 128 (the layout is the pattern): no spills at
  the default batch tile, every block a kernel tile."""
  ks = _compiled(_case(results, f"blocks/{dtype}"), suite.KINDS)
  assert sorted(k["name"] for k in ks) == sorted(suite.KINDS * len(suite.BLOCK_LAYERS))
  from dynadiag_jax import pattern
  slots = sorted(pattern.num_kept(m, n, suite.SPARSITY, b) * pattern.diag_length(m, n, b)
                 for m, n, b in suite.BLOCK_LAYERS)
  assert sorted(k["grid"][0] for k in ks if k["name"] == "bcsr_sddmm") == slots


@pytest.mark.parametrize("phase", ["exploring", "frozen"])
@pytest.mark.parametrize("dtype", suite.DTYPES)
def test_train_step_compiles(results, phase, dtype):
  """A whole jitted step (loss, grads, adamw) of two pallas DiagDense layers (block 1, 16)."""
  ks = _compiled(_case(results, f"train_step/{phase}/{dtype}"), suite.KINDS)
  # two layers: two forwards and two SDDMMs; dx only for the second (x needs no grad)
  assert sorted(k["name"] for k in ks) == sorted(
      ["bcsr_spmm", "bcsr_spmm", "bcsr_sddmm", "bcsr_sddmm", "bcsr_spmm_t"])


@pytest.mark.parametrize("phase", ["exploring", "frozen"])
def test_sharded_train_step_compiles_per_shard(results, phase):
  """The pallas train step over a 2-device mesh of compile-only H100s (dd.sharding.use_mesh):
  every kernel compiles for the rows of one shard, with tensor-core MMAs and no spills."""
  res = results[f"sharded/train_step/{phase}"]
  assert res["ok"], res["error"]
  ks = res["kernels"]
  # as the unsharded train step: two forwards, two SDDMMs, one dx
  assert sorted(k["name"] for k in ks) == sorted(
      ["bcsr_spmm", "bcsr_spmm", "bcsr_sddmm", "bcsr_sddmm", "bcsr_spmm_t"]), ks
  for k in ks:
    assert k["spill_bytes"] in (0, None) and "mma" in k["mma"], k
  # the forward / dx kernels tile the 8 * 17 / 2 = 68 rows of one shard: 2 programs of 64
  # (the whole batch, 136 rows, takes 3)
  assert all(k["grid"][0] == 2 for k in ks if k["name"] != "bcsr_sddmm"), ks


def test_train_step_frozen_uses_exact_layouts(results):
  """Frozen (offsets closed over): exact host layouts, never more SDDMM programs than the
  bounded jittable layout of exploration, and fewer for the block-diagonal layer (K of its
  block-diagonals against K_active). The block-1 layer's K random offsets (hard gates break
  alpha's ties at random) may touch every BCSR block, as many as the bound."""
  grid = lambda cid: sorted(k["grid"][0] for k in _case(results, cid)["kernels"]
                            if k["name"] == "bcsr_sddmm")
  frozen, exploring = grid("train_step/frozen/float32"), grid("train_step/exploring/float32")
  assert len(frozen) == len(exploring) == 2, (frozen, exploring)
  assert all(f <= e for f, e in zip(frozen, exploring)), (frozen, exploring)
  assert frozen[0] < exploring[0], (frozen, exploring)  # the smaller: the block-16 layer


def test_over_shared_memory_is_refused_by_our_check(results):
  res = _case(results, "negative/ours")
  assert not res["ok"] and res["error_type"] == "ValueError", res
  for part in ("block 256", "batch tile 16", "232448-byte limit"):
    assert part in res["error"], res["error"]


def test_over_shared_memory_is_refused_by_xla_without_our_check(results):
  """The control of the control: the same tile, our check bypassed, fails in XLA."""
  res = _case(results, "negative/xla")
  assert not res["ok"] and res["stage"] == "compile", res
  assert "RESOURCE_EXHAUSTED" in res["error"] and "Shared memory" in res["error"], res["error"]
