"""Compile for a described GPU without one: XLA's whole GPU pipeline, Triton included, to PTX.

Needs the CUDA PJRT plugin (`jax-cuda12-plugin` and `jax-cuda12-pjrt` at jax's version;
`nvidia-cuda-nvcc-cu12` adds `ptxas` for register and spill counts), imported only when
`target_device` is called: nothing here touches CUDA at import time. The tests keep the
plugin in a separate virtual environment (`tests/gpu_compile_env.py`) so that the CPU
runtime never sees it.

    dev = target_device()                      # a compile-only H100 (sm_90a)
    reps = compile_kernels(f, *shapes, device=dev)   # one KernelReport per Triton kernel

A compile refuses what the GPU would (a Triton module that does not verify, a tile over the
shared-memory limit); it proves nothing about numerics, speed or launch limits.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

TARGETS = Path(__file__).resolve().parent / "targets"
H100 = TARGETS / "h100_sxm.txtpb"
KERNELS = ("bcsr_spmm", "bcsr_spmm_t", "bcsr_sddmm")

_THUNK = re.compile(r"kCustomKernel .*?\] (\S+) grid: \[(\d+), (\d+), (\d+)\] "
                    r"threads: \[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+) bytes")
_ENTRY = re.compile(r"^\.visible \.entry (\w+)\(", re.M)
_MMA = re.compile(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)")
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclasses.dataclass(frozen=True)
class KernelReport:
  """One compiled Triton kernel: launch shape from XLA's thunks, code facts from its PTX."""
  name: str                 # the pallas_call's name (XLA's `__1` suffixes of repeats cut)
  grid: tuple[int, int, int]
  threads: int
  smem: int                 # bytes of shared memory per block (XLA's thunk sequence)
  ptx_lines: int
  mma: str                  # the first MMA instruction, e.g. wgmma.mma_async...bf16.bf16
  registers: int | None     # ptxas -v, None without ptxas
  spill_bytes: int | None   # spill stores + loads

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def target_device(target: str | os.PathLike = H100):
  """A compile-only device described by a GPU target config (default: H100 SXM, sm_90a)."""
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc("", "cuda", topology="1x1x1",
                                        target_config=Path(target).read_text())
  except Exception as e:  # no plugin: name what to install
    raise RuntimeError(
        "compiling for a described GPU needs the CUDA PJRT plugin at jax's version: "
        "pip install jax-cuda12-plugin==$JAXVER jax-cuda12-pjrt==$JAXVER (no GPU needed); "
        f"got {type(e).__name__}: {e}") from e
  return topo.devices[0]


def ptxas_path() -> str | None:
  """ptxas from nvidia-cuda-nvcc-cu12 (or PATH), None if absent."""
  try:
    import nvidia.cuda_nvcc as nvcc  # noqa: PLC0415 -- optional, compile venv only
    p = Path(list(nvcc.__path__)[0]) / "bin" / "ptxas"
    if p.exists():
      return str(p)
  except ImportError:
    pass
  return shutil.which("ptxas")


def ptxas_usage(ptx_file: str, arch: str = "sm_90a") -> tuple[int | None, int | None]:
  """(registers, spill bytes) of the one kernel in a PTX file, from `ptxas -v`."""
  exe = ptxas_path()
  if exe is None:
    return None, None
  out = subprocess.run([exe, f"-arch={arch}", "-v", ptx_file, "-o", os.devnull],
                       capture_output=True, text=True, check=True).stderr
  regs, spill = _REGS.search(out), _SPILL.search(out)
  return (int(regs.group(1)) if regs else None,
          int(spill.group(1)) + int(spill.group(2)) if spill else None)


def read_dump(dump_dir: str, names: tuple[str, ...] | None = None) -> list[KernelReport]:
  """Reports of the Triton kernels (by name, default all `bcsr_*`) in an XLA dump."""
  want = (lambda s: s in names) if names else (lambda s: s.startswith("bcsr_"))
  thunks = []
  for f in sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt"))):
    thunks += [t for t in _THUNK.findall(Path(f).read_text()) if want(t[0])]
  ptx = {}
  for f in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
    txt = Path(f).read_text()
    for e in _ENTRY.findall(txt):
      if want(e):
        ptx.setdefault(e, []).append((f, txt))
  reps, used = [], {}
  for name, gx, gy, gz, tx, ty, tz, smem in thunks:
    i = used.get(name, 0)
    used[name] = i + 1
    files = ptx.get(name, [])
    f, txt = files[min(i, len(files) - 1)] if files else (None, "")
    mma = _MMA.search(txt)
    regs, spill = ptxas_usage(f) if f else (None, None)
    reps.append(KernelReport(re.sub(r"__\d+$", "", name), (int(gx), int(gy), int(gz)), int(tx) * int(ty) * int(tz),
                             int(smem), txt.count("\n"), mma.group(1) if mma else "",
                             regs, spill))
  return reps


def compile_kernels(f: Callable, *args, device, static_argnums=(),
                    dump_dir: str | None = None) -> list[KernelReport]:
  """Compiles jit(f) for `device` with ShapeDtypeStruct args; reports its bcsr_* kernels.

  Raises whatever XLA raises (e.g. INVALID_ARGUMENT for a Triton module that does not
  verify, RESOURCE_EXHAUSTED for shared memory over the limit).
  """
  import jax
  from jax.sharding import SingleDeviceSharding
  sh = SingleDeviceSharding(device)
  put = lambda a: (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
                   if isinstance(a, jax.ShapeDtypeStruct) else a)
  args = jax.tree.map(put, args, is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))
  tmp = dump_dir or tempfile.mkdtemp(prefix="aot_dump_")
  try:
    from pallas_kernels import compat  # pylint: disable=import-outside-toplevel
    with compat.cuda_lowering(getattr(device, "device_kind", compat.H100_KIND)):
      lowered = jax.jit(f, static_argnums=static_argnums).trace(*args).lower()
    lowered.compile(compiler_options={"xla_dump_to": tmp})
    return read_dump(tmp)
  finally:
    if dump_dir is None:
      shutil.rmtree(tmp, ignore_errors=True)
