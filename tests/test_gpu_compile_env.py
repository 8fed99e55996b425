"""tests/gpu_compile_env.py from inside a virtual environment (as the README makes one): the
compile venv it creates sees that venv's packages (editable installs included), not the base
interpreter's. A tiny venv with marker packages stands in for the README's (a full install
takes long on 2 cores); the CUDA plugin itself is not installed here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _py(venv: Path, code: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([str(venv / "bin" / "python"), "-c", code, *args], cwd=venv.parent,
                        env=ENV, capture_output=True, text=True, timeout=120)


def test_compile_venv_sees_the_packages_of_the_venv_that_made_it(tmp_path):
  user = tmp_path / "dotvenv"  # python3.11 -m venv .venv, as the README says
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(user)], check=True,
                 env=ENV, timeout=120)
  sp = Path(_py(user, "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
  (sp / "dd_marker_installed").mkdir()
  (sp / "dd_marker_installed" / "__init__.py").write_text("")
  src = tmp_path / "checkout"  # an editable install: a .pth naming a source folder
  (src / "dd_marker_editable").mkdir(parents=True)
  (src / "dd_marker_editable" / "__init__.py").write_text("")
  (sp / "__editable__.dd_marker_editable.pth").write_text(f"{src}\n")
  assert _py(user, "import dd_marker_installed, dd_marker_editable").returncode == 0

  compile_dir = tmp_path / "compile"
  made = _py(user, "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
             "from tests import gpu_compile_env as g; print(g.create(Path(sys.argv[2])))",
             str(ROOT), str(compile_dir))
  assert made.returncode == 0, made.stderr[-3000:]
  assert made.stdout.strip() == str(compile_dir / "bin" / "python")
  seen = _py(compile_dir, "import dd_marker_installed, dd_marker_editable")
  assert seen.returncode == 0, seen.stderr[-3000:]
  # the base interpreter's own packages stay out (numpy is in the base, not in the user's venv)
  assert _py(user, "import numpy").returncode != 0
  assert _py(compile_dir, "import numpy").returncode != 0
