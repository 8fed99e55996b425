"""A second virtual environment holding the CUDA compile plugin, kept out of the CPU runtime.

    python -m tests.gpu_compile_env          # create it if needed, print its python

It sees this environment's packages (`--system-site-packages`) and adds only
`jax-cuda12-plugin` and `jax-cuda12-pjrt` at jax's own version (compile only, no nvidia
runtime wheels) and `nvidia-cuda-nvcc-cu12` for `ptxas`. The CPU tests and the library
never import it; `tests/test_gpu_compile.py` runs its suite in a subprocess with it.
Location: $DYNADIAG_GPU_VENV, else ~/.cache/dynadiag-jax/gpu-compile-jax<version>, so
that fresh clones on one machine share it.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

NVCC = "nvidia-cuda-nvcc-cu12==12.9.86"


def jax_version() -> str:
  return importlib.metadata.version("jax")


def requirements() -> list[str]:
  v = jax_version()
  return [f"jax-cuda12-plugin=={v}", f"jax-cuda12-pjrt=={v}", NVCC]


def venv_dir() -> Path:
  if os.environ.get("DYNADIAG_GPU_VENV"):
    return Path(os.environ["DYNADIAG_GPU_VENV"])
  cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
  return cache / "dynadiag-jax" / f"gpu-compile-jax{jax_version()}"


def python() -> Path:
  return venv_dir() / "bin" / "python"


def _ready_marker() -> Path:
  return venv_dir() / "dynadiag-ready.txt"


def is_ready() -> bool:
  """True if the venv exists and was completed for exactly these requirements."""
  m = _ready_marker()
  return python().exists() and m.exists() and m.read_text() == "\n".join(requirements())


def ensure(log=sys.stderr) -> Path:
  """Creates (or completes) the venv; returns its python. Raises RuntimeError with pip's
  output if the plugin cannot be installed (no registry, unsupported platform)."""
  d = venv_dir()
  d.parent.mkdir(parents=True, exist_ok=True)
  with open(d.parent / f".{d.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one creator at a time (parallel test workers, CI)
    if is_ready():
      return python()
    print(f"gpu-compile venv: creating {d} ({' '.join(requirements())})", file=log, flush=True)
    steps = [[sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(d)],
             [str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *requirements()]]
    for cmd in steps:
      r = subprocess.run(cmd, capture_output=True, text=True)
      if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n"
                           f"{(r.stdout + r.stderr)[-3000:]}")
    _ready_marker().write_text("\n".join(requirements()))
    return python()


if __name__ == "__main__":
  print(ensure())
