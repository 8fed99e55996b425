"""pallas_kernels.compat: the jax 0.10.2 / 0.11 guards (docs/GPU.md, "jax 0.11")."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynadiag_jax import ops
from pallas_kernels import _call, compat


def test_version_tuple():
  assert compat.version_tuple("0.10.2") == (0, 10, 2)
  assert compat.version_tuple("0.11.1.dev20260701+abc") == (0, 11, 1)
  assert compat.version_tuple("0.11.0rc1") == (0, 11, 0)
  assert compat.JAX_VERSION[:2] >= (0, 10)


def test_compiler_params_are_tritons():
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=import-outside-toplevel
  p = compat.triton_compiler_params(num_warps=4, num_stages=2)
  assert isinstance(p, pl_triton.CompilerParams)
  assert (p.num_warps, p.num_stages) == (4, 2)
  assert isinstance(_call.compiler_params("bcsr_spmm", 16, 16, jnp.float32),
                    pl_triton.CompilerParams)


def test_triton_deprecation_is_filtered_only_by_its_message():
  compat.silence_triton_deprecation()
  with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter("default")
    compat.silence_triton_deprecation()  # inside the block: the filter applies here too
    warnings.warn("The Pallas Triton backend is deprecated and will be removed in a future "
                  "JAX version.", DeprecationWarning)
    warnings.warn("something else is deprecated", DeprecationWarning)
  assert [str(w.message) for w in got] == ["something else is deprecated"]


def test_cuda_lowering_is_a_no_op_where_not_needed():
  # jax 0.10.2 (pinned): its Triton lowering needs no GPU, so nothing to set up
  if compat.JAX_VERSION[:2] <= (0, 10):
    assert not compat.needs_abstract_gpu()
  with compat.cuda_lowering():
    assert jax.sharding.get_abstract_mesh().empty or not compat.needs_abstract_gpu()


def _lowered_text(m=64, n=32, block=16):
  # abstract arguments: inside an abstract mesh nothing may run eagerly
  k = 2
  o = np.arange(k, dtype=np.int32)
  x = jax.ShapeDtypeStruct((8, m), jnp.float32)
  v = jax.ShapeDtypeStruct((k, min(m, n) // block, block, block), jnp.float32)
  f = lambda x, v: ops.diag_matmul(x, v, o, m, n, "pallas")
  return jax.jit(f).trace(x, v).lower(lowering_platforms=("cuda",)).as_text()


def test_forced_abstract_gpu_mesh_still_lowers_to_triton():
  """The jax 0.11 path (an abstract H100 in an abstract mesh), run on this jax: the kernel
  still lowers to Triton's custom call, so the guard is harmless where it is not needed."""
  mesh = compat.abstract_gpu_mesh()
  assert mesh.abstract_device.device_kind == compat.H100_KIND
  assert mesh.abstract_device.platform == "cuda"
  with compat.cuda_lowering(force=True):
    assert jax.sharding.get_abstract_mesh().abstract_device.platform == "cuda"
    txt = _lowered_text()
  assert "__gpu$xla.gpu.triton" in txt
  assert "__gpu$xla.gpu.triton" in _lowered_text()  # and without it


@pytest.mark.parametrize("force", [False, True])
def test_triton_modules_capture_under_the_guard(force):
  from pallas_kernels import triton_check  # pylint: disable=import-outside-toplevel
  S = jax.ShapeDtypeStruct
  f = lambda x, v: ops.diag_matmul(x, v, np.arange(2, dtype=np.int32), 64, 32, "pallas")
  args = (S((8, 64), jnp.float32), S((2, 2, 16, 16), jnp.float32))
  if force:
    with compat.cuda_lowering(force=True):
      mods = triton_check.triton_modules(f, *args)
  else:
    mods = triton_check.triton_modules(f, *args)
  assert [m.name for m in mods] == ["bcsr_spmm"]
  mods[0].verify()
