"""`python -m benchmarks.gpu --smoke` on the CPU (interpret mode), and import hygiene.

The GPU check (docs/GPU.md) must keep working without a GPU: this runs the whole command
in its smoke mode, one subprocess as CI would, and reads its JSON; and it checks that
nothing the GPU check imports pulls in tfds, grain, OpenCV, mlxtend or ml_collections
(the GPU machine has none of them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("tensorflow_datasets", "tensorflow", "grain", "cv2", "mlxtend", "ml_collections")


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = str(ROOT)
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_bench") / "smoke.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out)],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_smoke_env(smoke):
  res, stdout = smoke
  env = res["sections"]["env"]
  assert env["status"] == "ok", env
  assert env["jax"] and env["distributions"]["jax"]
  assert all(v["ok"] for v in env["imports"].values()), env["imports"]
  assert env["forbidden_loaded"] == []
  assert env["compat"]["needs_abstract_gpu"] is False  # jax 0.10.2 here
  for name, v in env["sanity"].items():
    assert v["max_rel_err"] < 1e-4, (name, v)
  assert "## env" in stdout and "| import dynadiag_jax | ok |" in stdout


def test_smoke_numerics(smoke):
  res, stdout = smoke
  num = res["sections"]["numerics"]
  assert num["status"] == "ok", num
  cases = num["cases"]
  assert {c["block"] for c in cases} == {1, 16, 32, 64}
  assert {c["offsets"] for c in cases} == {"frozen", "exploring"}
  assert {c["dtype"] for c in cases} == {"float32", "bfloat16"}
  for c in cases:
    assert not c["errors"], c
    assert c["pass"], c
    for be in ("pallas", "xla"):
      for ref in ("vs_f64", "vs_dense"):
        errs = c[ref][be]
        assert set(errs) == {"y", "dx", "dv"}
        # interpret mode on a CPU: exact float32; bfloat16 rounding of the outputs
        assert max(errs.values()) <= (1e-5 if c["dtype"] == "float32" else 2e-2), (c, be, ref)
  assert "| y vs dense |" in stdout


def test_smoke_layers(smoke):
  res, stdout = smoke
  lay = res["sections"]["layers"]
  assert lay["status"] == "ok", lay
  assert len(lay["cases"]) == 4 and not lay["skipped"]
  for c in lay["cases"]:
    assert not c["errors"], c
    assert set(c["ms"]) == {"nn.Dense", "pallas", "xla", "dense"}
    assert all(t > 0 for t in c["ms"].values())
    assert all(v > 0 for v in c["speedup"].values())
    assert c["auto"] in ("pallas", "xla", "dense")
  assert {(c["mode"], c["dtype"]) for c in lay["cases"]} == {
      ("fwd", "float32"), ("train", "float32"), ("fwd", "bfloat16"), ("train", "bfloat16")}
  assert "| nn.Dense ms |" in stdout


def test_smoke_peers(smoke):
  res, _ = smoke
  peers = res["sections"]["peers"]
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    assert peers["status"] == "skipped"
    assert any("skipped: no torch" in n for n in peers["notes"])
    return
  assert peers["status"] == "ok", peers
  for c in peers["cases"]:
    assert c["ms"]["F.linear"] > 0, c


def test_smoke_models(smoke):
  res, stdout = smoke
  mod = res["sections"]["models"]
  assert mod["status"] == "ok", mod
  cases = {c["name"]: c for c in mod["cases"]}
  for kind in ("infer", "train"):
    for name in ("dense", "frozen", "exploring"):
      c = cases[f"{kind} {name}"]
      assert "error" not in c, c
      assert c["images_per_s"] > 0, c
  assert "| model | inference images/s |" in stdout
  assert res["wall_s"] > 0 and res["smoke"] is True


def test_print_rerenders(smoke, tmp_path):
  res, _ = smoke
  f = tmp_path / "r.json"
  f.write_text(json.dumps(res))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--print", str(f)], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "## numerics" in proc.stdout and "## models" in proc.stdout


def test_import_hygiene():
  """What the GPU check imports loads none of the data-pipeline packages."""
  code = (
      "import sys, json\n"
      "import dynadiag_jax, pallas_kernels, pallas_kernels.compat, pallas_kernels.diag\n"
      "import dynadiag_jax.backends.xla, dynadiag_jax.models.vit, dynadiag_jax.layers\n"
      "import benchmarks.gpu, benchmarks.layers, benchmarks.models\n"
      "import tests.pallas_testing\n"
      "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert "dynadiag_jax" in loaded and "jax" in loaded
  assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_failed_section_is_recorded_and_others_run(tmp_path, monkeypatch):
  """A section that raises is recorded with its traceback's last line; the run goes on."""
  from benchmarks import gpu  # pylint: disable=import-outside-toplevel

  def boom(rec, budget, cfg):
    raise RuntimeError("first line\nthe last line of the message")

  def fine(rec, budget, cfg):
    rec.case({"name": "infer dense", "images_per_s": 1.0})

  monkeypatch.setitem(gpu.SECTION_FNS, "peers", boom)
  monkeypatch.setitem(gpu.SECTION_FNS, "models", fine)
  out = tmp_path / "r.json"
  rc = gpu.main(["--smoke", "--inprocess", "--sections", "peers,models", "--out", str(out)])
  assert rc == 0
  res = json.loads(out.read_text())
  assert res["sections"]["peers"]["status"] == "error"
  assert res["sections"]["peers"]["error"] == "RuntimeError: the last line of the message"
  assert res["sections"]["models"]["status"] == "ok"
  assert res["sections"]["models"]["cases"] == [{"name": "infer dense", "images_per_s": 1.0}]


def test_budget_skips_with_a_note(tmp_path):
  """Past its share a section skips its remaining cases, each listed with the reason."""
  from benchmarks import gpu  # pylint: disable=import-outside-toplevel
  rec = gpu.Record("layers", str(tmp_path / "l.json"))
  gpu.section_layers(rec, gpu.Budget(0.0), gpu.SMOKE["layers"])
  assert rec.data["cases"] == []
  assert len(rec.data["skipped"]) == 4
  assert all(s.endswith("over budget") for s in rec.data["skipped"])


def test_section_past_its_share_is_killed_and_recorded(tmp_path, monkeypatch):
  """The driver kills a section's subprocess GRACE_S after its share and keeps going."""
  from benchmarks import gpu  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(gpu, "GRACE_S", 0.0)
  data = gpu.run_child("models", 1.0, True, str(tmp_path))
  assert data["status"] == "killed", data
  assert "killed" in data["error"] and data["wall_s"] < 30


def test_sigterm_keeps_partial_results(tmp_path):
  """`timeout` sends SIGTERM: the driver kills the running section, saves, exits 124."""
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  out = tmp_path / "r.json"
  proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--sections",
                           "models", "--out", str(out)], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(3.0)
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=60)
  assert proc.returncode == 124, stdout
  res = json.loads(out.read_text())
  assert res["sections"]["models"]["status"] == "killed"
  assert res["sections"]["models"]["terminated"] is True
