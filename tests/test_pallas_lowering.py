"""GPU lowering checked from CPU: every kernel becomes a Triton call; bad blocks fail early."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynadiag_jax import ops
from pallas_kernels import spmm
from tests.pallas_testing import fresh_seed, random_offsets

KERNELS = {"bcsr_spmm", "bcsr_spmm_t", "bcsr_sddmm"}
_TRITON = re.compile(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "(\w+)"')


def _lower_cuda(f, *args) -> str:
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _args(m, n, k, dtype, rows=8):
  rng = np.random.default_rng(fresh_seed())
  o = random_offsets(rng, m, n, k)
  x = jnp.asarray(rng.standard_normal((rows, m)), dtype)
  v = jnp.asarray(rng.standard_normal((k, min(m, n))), dtype)
  return x, v, o


def _loss(m, n, cfg=None):
  return lambda x, v, o: jnp.sum(
      ops.diag_matmul(x, v, o, m, n, "pallas", kernel=cfg).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("m,n,dtype", [(48, 32, jnp.float32), (32, 80, jnp.bfloat16),
                                       (40, 40, jnp.float32)])
def test_forward_and_grad_lower_to_triton_traced_offsets(m, n, dtype):
  x, v, o = _args(m, n, 5, dtype)
  fwd = _lower_cuda(lambda x, v, o: ops.diag_matmul(x, v, o, m, n, "pallas"), x, v, o)
  assert set(_TRITON.findall(fwd)) == {"bcsr_spmm"}
  txt = _lower_cuda(jax.grad(_loss(m, n), argnums=(0, 1)), x, v, o)
  assert set(_TRITON.findall(txt)) == KERNELS
  assert "mosaic_gpu" not in txt  # Triton params on every pallas_call


def test_grad_lowers_to_triton_with_static_offsets():
  """Offsets closed over as constants take the host layout; still Triton everywhere."""
  x, v, o = _args(72, 40, 9, jnp.float32)
  for cluster in (False, True):
    cfg = ops.KernelConfig(cluster=cluster)
    txt = _lower_cuda(jax.grad(lambda x, v: _loss(72, 40, cfg)(x, v, o), argnums=(0, 1)), x, v)
    assert set(_TRITON.findall(txt)) == KERNELS


def test_cpu_lowering_is_interpreted():
  x, v, o = _args(48, 32, 5, jnp.float32)
  txt = jax.jit(jax.grad(_loss(48, 32), argnums=(0, 1))).trace(x, v, o).lower(
      lowering_platforms=("cpu",)).as_text()
  assert "xla.gpu.triton" not in txt


@pytest.mark.parametrize("block", [24, 8, 12])
def test_bad_block_fails_before_lowering(block):
  x, v, o = _args(48, 32, 5, jnp.float32)
  with pytest.raises(ValueError, match="power of two >= 16"):
    _lower_cuda(jax.grad(_loss(48, 32, ops.KernelConfig(bcsr_block=block)), argnums=(0, 1)),
                x, v, o)


def test_triton_lowering_itself_rejects_a_24_block():
  """Below our own check: the raw kernel with 24x24 blocks fails in the Triton lowering.

  (8x8 blocks pass the lowering, since 64 is a power of two; only the GPU compile of
  tl.dot would refuse them, which is why `check_block` insists on >= 16.)
  """
  b, rows = 24, 16
  ptr, slot = jnp.zeros((3,), jnp.int32), jnp.zeros((1,), jnp.int32)
  x, data = jnp.zeros((rows, 2 * b)), jnp.zeros((1, b, b))
  f = lambda x, d: spmm.spmm_padded(ptr, slot, slot, x, d, n_out_blocks=2, batch_tile=rows)
  with pytest.raises(ValueError, match="power of 2"):
    _lower_cuda(f, x, data)
