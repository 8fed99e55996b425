"""The jax differences the kernels meet, guarded in one place: jax 0.10.2 (our pin) and 0.11.x.

Read from jax's CHANGELOG.md, docs/pallas/CHANGELOG.md and the source at the tags
jax-v0.10.2 and jax-v0.11.0 (docs/GPU.md lists every difference and where it was found).
What the kernels use is the same in both: `pl.pallas_call(..., interpret=, name=,
compiler_params=)`, `pl.BlockSpec` (a `None` block dimension squeezed), `pl.ds`,
`pl.multiple_of`, `pl.program_id`, `jax.experimental.pallas.triton.CompilerParams`,
`lax.platform_dependent`, `jax.experimental.topologies.get_topology_desc`. Two things
differ, both only when lowering for a GPU:

1. jax 0.11 deprecates the Pallas Triton backend: every Triton lowering warns
   (`DeprecationWarning`, deprecation id 'jax-pallas-triton'). It still lowers to the same
   `__gpu$xla.gpu.triton` custom call (`CUSTOM_CALL_TARGET_NAME`). `silence_triton_deprecation`
   filters exactly that message (installed on import of `pallas_kernels._call`), so a run
   with `-W error::DeprecationWarning` keeps working; nothing else is filtered.
2. jax 0.10.2's Triton lowering takes the compute capability of a local GPU and falls
   back to 9.0 without one; jax 0.11 asks `jax._src.pallas.triton.gpu_info.get_gpu_info()`,
   which reads the *default* device (or the abstract mesh's `AbstractDevice`) and raises
   `RuntimeError: No supported GPU devices found` when that is not a GPU: lowering for
   cuda on a CPU machine (`lower(lowering_platforms=("cuda",))`, the compile-only H100 of
   `pallas_kernels.aot`) needs an abstract GPU device there. `cuda_lowering()` provides one
   (as jax 0.11's own tests/pallas/triton_pallas_test.py::test_deviceless_aot does) where
   it is needed, and is a no-op on jax 0.10.2 and on a machine whose default device is a
   GPU. Not exercised on jax 0.11 (not installable here).

Nothing here is imported at `import pallas_kernels` time beyond jax itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import warnings
from typing import Iterator

import jax

# What the compile-only H100 (pallas_kernels/targets/h100_sxm.txtpb) and a real one call
# themselves; jax 0.11's gpu_info matches the prefix "NVIDIA H100".
H100_KIND = "NVIDIA H100"
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


def version_tuple(v: str) -> tuple[int, ...]:
  """'0.11.1.dev20260701' -> (0, 11, 1): the leading numeric components."""
  out = []
  for part in v.split("."):
    m = re.match(r"\d+", part)
    if not m:
      break
    out.append(int(m.group()))
  return tuple(out)


JAX_VERSION = version_tuple(jax.__version__)


def triton_compiler_params(**kw):
  """`jax.experimental.pallas.triton.CompilerParams(**kw)`: that name from jax 0.7 on,
  0.10.2 and 0.11 included (0.5-0.6 spelled it `TritonCompilerParams` in the same module).
  Passing it on every pallas_call keeps GPU lowering on Triton, not Mosaic GPU."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=import-outside-toplevel
  cls = getattr(pl_triton, "CompilerParams", None) or getattr(pl_triton, "TritonCompilerParams")
  return cls(**kw)


def silence_triton_deprecation() -> None:
  """Ignore jax 0.11's 'Pallas Triton backend is deprecated' warning (only that message)."""
  warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def _gpu_info_reads_default_device() -> bool:
  """True on jax versions whose Triton lowering looks the GPU up from the default device."""
  try:
    return importlib.util.find_spec("jax._src.pallas.triton.gpu_info") is not None
  except ModuleNotFoundError:  # pragma: no cover
    return False


def _default_is_gpu() -> bool:
  try:
    return jax.devices()[0].platform in ("gpu", "cuda", "rocm")
  except RuntimeError:  # pragma: no cover
    return False


def needs_abstract_gpu() -> bool:
  """Whether lowering a Pallas Triton kernel for cuda here needs `cuda_lowering()`."""
  return _gpu_info_reads_default_device() and not _default_is_gpu()


def abstract_gpu_mesh(device_kind: str = H100_KIND):
  """A one-device AbstractMesh whose AbstractDevice is a cuda GPU of `device_kind`."""
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType  # pylint: disable=import-outside-toplevel
  return AbstractMesh((1,), ("gpu",), (AxisType.Explicit,),
                      abstract_device=AbstractDevice(device_kind, 1, "cuda"))


@contextlib.contextmanager
def cuda_lowering(device_kind: str = H100_KIND, force: bool = False) -> Iterator[None]:
  """Lower Pallas Triton kernels for cuda inside this block on any machine.

  jax 0.11 without a GPU default device: inside an abstract mesh whose device is a
  `device_kind` GPU (compute capability from jax's table; 9.0 for an H100). Elsewhere (jax
  0.10.2, or a GPU machine) nothing changes, unless `force` (tests).
  """
  if not (force or needs_abstract_gpu()):
    yield
    return
  from jax.sharding import use_abstract_mesh  # pylint: disable=import-outside-toplevel
  with use_abstract_mesh(abstract_gpu_mesh(device_kind)):
    yield
