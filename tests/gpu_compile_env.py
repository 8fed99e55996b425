"""A second virtual environment holding the CUDA compile plugin, kept out of the CPU runtime.

    python -m tests.gpu_compile_env          # create it if needed, print its python

It sees this environment's packages and adds only `jax-cuda12-plugin` and `jax-cuda12-pjrt`
at jax's own version (compile only, no nvidia runtime wheels) and `nvidia-cuda-nvcc-cu12`
for `ptxas`. The CPU tests and the library never import it; `tests/test_gpu_compile.py`
runs its suite in a subprocess with it.

How it sees them: a .pth file in its site-packages runs `site.addsitedir` on every
site-packages directory of the interpreter that made it (their own .pth files, editable
installs included, are read too). `--system-site-packages` alone would not do: from inside
a virtual environment (the README's `python3.11 -m venv .venv`) it exposes the *base*
interpreter's packages, not the venv's. Location: $DYNADIAG_GPU_VENV, else
~/.cache/dynadiag-jax/gpu-compile-jax<version>[-<hash of the venv's path>], so that fresh
clones on one machine share it and each virtual environment has its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

NVCC = "nvidia-cuda-nvcc-cu12==12.9.86"
PTH = "dynadiag-parent-env.pth"


def jax_version() -> str:
  return importlib.metadata.version("jax")


def requirements() -> list[str]:
  v = jax_version()
  return [f"jax-cuda12-plugin=={v}", f"jax-cuda12-pjrt=={v}", NVCC]


def in_venv() -> bool:
  """Whether this interpreter runs in a virtual environment (not the base installation)."""
  return sys.prefix != sys.base_prefix


def venv_dir() -> Path:
  if os.environ.get("DYNADIAG_GPU_VENV"):
    return Path(os.environ["DYNADIAG_GPU_VENV"])
  cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
  tag = ("-" + hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
         if in_venv() else "")
  return cache / "dynadiag-jax" / f"gpu-compile-jax{jax_version()}{tag}"


def python(d: Path | None = None) -> Path:
  return (d or venv_dir()) / "bin" / "python"


def _ready_marker() -> Path:
  return venv_dir() / "dynadiag-ready.txt"


def site_dirs() -> list[str]:
  """This interpreter's site-packages directories (the venv's own when it runs in one)."""
  dirs = list(site.getsitepackages())
  user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
  if user and os.path.isdir(user):
    dirs.append(user)
  return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def pth_text() -> str:
  """One .pth line (executed at start-up) that adds this interpreter's site directories."""
  calls = "; ".join(f"site.addsitedir({d!r})" for d in site_dirs())
  return f"import site; {calls}\n"


def _venv_site(d: Path) -> Path:
  """The site-packages directory of the venv at d."""
  rel = Path(sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip(os.sep))
  return d / rel


def link(d: Path) -> Path:
  """(Re)writes the .pth of the venv at d that shows it this interpreter's packages."""
  sp = _venv_site(d)
  sp.mkdir(parents=True, exist_ok=True)
  pth = sp / PTH
  if not pth.exists() or pth.read_text() != pth_text():
    pth.write_text(pth_text())
  return pth


def create(d: Path) -> Path:
  """A fresh venv at d that sees this interpreter's packages; its python. Raises RuntimeError."""
  cmd = [sys.executable, "-m", "venv", "--clear", str(d)]
  if not in_venv():
    cmd.insert(3, "--system-site-packages")  # the base interpreter: its packages are these
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
  link(d)
  return python(d)


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
      if in_venv():
        link(d)
      return python()
    print(f"gpu-compile venv: creating {d} ({' '.join(requirements())})", file=log, flush=True)
    create(d)
    cmd = [str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           *requirements()]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n"
                         f"{(r.stdout + r.stderr)[-3000:]}")
    _ready_marker().write_text("\n".join(requirements()))
    return python()


if __name__ == "__main__":
  print(ensure())
