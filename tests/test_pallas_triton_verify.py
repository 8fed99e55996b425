"""Every Triton module the kernels emit passes the MLIR verifier, on CPU (no plugin, no GPU).

Lowering for cuda skips Triton's verifier, so before these tests a module the GPU compiler
refuses (the SDDMM's loop bound typed i1) lowered fine. The GPU-compile suite
(test_gpu_compile.py) goes further, to PTX; this one is cheap and always runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.experimental import pallas as pl

from dynadiag_jax import ops
from pallas_kernels import _call, bcsr, triton_check
from tests.pallas_testing import kernel_alone

DTYPES = (jnp.float32, jnp.bfloat16)
S = jax.ShapeDtypeStruct
I32 = jnp.int32
KINDS = ("bcsr_spmm", "bcsr_spmm_t", "bcsr_sddmm")


def _check(mods, want: set[str]) -> None:
  assert {t.name for t in mods} == want
  for t in mods:
    t.verify()
    assert t.weak_selects() == [], (t.name, t.weak_selects())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("b", bcsr.BLOCKS)
def test_every_kernel_and_block_verifies(b, dtype):
  """Smallest and largest batch tile (the kernel's code only scales in between)."""
  for kind in KINDS:
    for bt in (bcsr.BLOCKS[0], bcsr.BLOCKS[-1]):
      f, args = kernel_alone(kind, dtype, b, bt)
      _check(triton_check.triton_modules(f, *args), {kind})


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_diag_matmul_grad_modules_verify(dtype):
  """Forward and both grads through the backend, traced offsets (the jittable layout)."""
  m, n, k = 96, 64, 7

  def loss(x, v, o):
    return jnp.sum(ops.diag_matmul(x, v, o, m, n, "pallas").astype(jnp.float32) ** 2)

  mods = triton_check.triton_modules(jax.value_and_grad(loss, argnums=(0, 1)),
                                     S((40, m), dtype), S((k, n), dtype), S((k,), I32))
  _check(mods, {"bcsr_spmm", "bcsr_spmm_t", "bcsr_sddmm"})


def _bound_kernel(n_ref, o_ref, *, typed: bool):
  """A loop bound from jnp.where: weak Python ints (the old SDDMM bug) or typed ones."""
  c = n_ref[0] > 0
  hi = jnp.where(c, jnp.int32(3), jnp.int32(0)) if typed else jnp.where(c, 3, 0)
  o_ref[...] = lax.fori_loop(0, hi, lambda i, a: a + 1.0, jnp.zeros((16, 16), jnp.float32))


@pytest.mark.parametrize("typed", [False, True])
def test_the_checks_catch_a_weakly_typed_loop_bound(typed):
  """Negative control: the SDDMM's old pattern fails both the lint and the verifier."""
  f = lambda n: pl.pallas_call(
      functools.partial(_bound_kernel, typed=typed), out_shape=S((16, 16), jnp.float32),
      compiler_params=_call.compiler_params("bcsr_spmm", 16, 16, jnp.float32),
      name="bound")(n)
  [mod] = triton_check.triton_modules(f, S((1,), I32))
  if typed:
    mod.verify()
    assert mod.weak_selects() == []
  else:
    assert len(mod.weak_selects()) == 1
    with pytest.raises(AssertionError, match="have same type"):
      mod.verify()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_allowed_tiles_fit_shared_memory(dtype):
  """Every block x batch tile accepted fits the H100's shared memory (1 or 2 stages)."""
  for kind in KINDS:
    for b in bcsr.BLOCKS:
      for bt in bcsr.BLOCKS:
        p = _call.compiler_params(kind, b, bt, dtype)
        assert (p.num_warps, p.num_stages) in {(4, 2), (8, 2), (8, 1)}
        assert _call.smem_estimate(kind, b, bt, dtype, p.num_stages) <= _call.SMEM_LIMIT


def test_shared_memory_over_the_limit_is_refused_before_lowering():
  """256 x 256 f32 blocks need more than 227 KiB even unpipelined: our own error, no XLA."""
  f, args = kernel_alone("bcsr_spmm", jnp.float32, 256, 16)
  with pytest.raises(ValueError, match=r"block 256 with batch tile 16 .* 232448-byte limit"):
    jax.jit(f).trace(*args)
  with pytest.raises(ValueError, match="<= 128"):
    bcsr.check_block(256)
