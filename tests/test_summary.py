"""summarize / totals count stored against dense parameters."""

import jax
import jax.numpy as jnp
import numpy as np

import dynadiag_jax as dd
from dynadiag_jax import pattern
from tests.test_allocation import Tower


def test_totals_and_table():
  x = jnp.ones((2, 8, 40))
  sp = {"up": 0.9, "mid": 0.8}
  model = Tower(dd.LayerFactory.from_dict(sp, backend="dense"))
  v = model.init(jax.random.PRNGKey(0), x)
  t = dd.totals(model, v, x)
  kd = (pattern.num_kept(40, 300, 0.9) * 40 + 2 * pattern.num_kept(300, 300, 0.8) * 300)
  dense_k = 300 * 64 + 64 * 17
  bias = 300 * 3 + 64 + 17
  assert t["stored_params"] == kd + dense_k + bias
  assert t["dense_params"] == 40 * 300 + 2 * 300 * 300 + dense_k + bias
  assert abs(t["sparsity"] - (1 - kd / (40 * 300 + 2 * 300 * 300))) < 1e-12
  table = dd.summarize(model, v, x)
  assert "sub/mid" in table and "40x300" in table and f"{t['stored_params']:,}" in table
  frozen, _ = dd.freeze(v)
  t2 = dd.totals(model, frozen, x)
  assert (t2["stored_params"], t2["dense_params"]) == (t["stored_params"], t["dense_params"])
  assert "frozen" in dd.summarize(model, frozen, x)


def test_summary_reports_inputs_and_outputs_no_kept_diagonal_touches():
  """8x32 at K = 2 adjacent diagonals: each covers the 8 inputs and 8 of the 32 outputs."""
  layer = dd.DiagDense(32, sparsity=0.95)
  x = jnp.ones((1, 8))
  v = layer.init(jax.random.PRNGKey(0), x)
  alpha = np.zeros(32, np.float32)
  alpha[[5, 6]] = 1.0  # the top-2: offsets 5 and 6 cover outputs 5..13
  v["params"]["alpha"] = jnp.asarray(alpha)
  calls = dd.linear_calls(layer, v, x)
  assert dd.summary.unconnected(v, calls[0]) == (0, 32 - 9)
  frozen, _ = dd.freeze(v)
  assert dd.summary.unconnected(frozen, dd.linear_calls(layer, frozen, x)[0]) == (0, 23)
  table = dd.summarize(layer, frozen, x)
  assert "unconnected in / out" in table and "0 / 23" in table
  wide = dd.DiagDense(8, sparsity=0.0)  # every diagonal: nothing unconnected
  vw = wide.init(jax.random.PRNGKey(0), jnp.ones((1, 32)))
  assert dd.summary.unconnected(vw, dd.linear_calls(wide, vw, jnp.ones((1, 32)))[0]) == (0, 0)


def test_masked_layers_count_what_their_masks_keep():
  """A mask method's nn.Dense layers: 'dense, masked' at the weights their masks keep."""
  x = jnp.ones((2, 8, 40))
  model = Tower(dd.LayerFactory.from_dict({}, backend="dense"))  # all nn.Dense
  v = model.init(jax.random.PRNGKey(0), x)
  kept = {"up/kernel": 1200, "sub/mid/kernel": 9000}
  t = dd.totals(model, v, x, masks_kept=kept)
  plain = dd.totals(model, v, x)
  assert plain["sparsity"] == 0.0 and plain["stored_params"] == plain["dense_params"]
  dense_up = 40 * 300
  mid = next(c for c in t["layers"] if "/".join(c.path) == "sub/mid")
  assert t["held"][mid.path] == 9000
  assert t["stored_params"] == plain["stored_params"] - dense_up - mid.m * mid.n + 1200 + 9000
  assert abs(t["sparsity"] - (1 - (1200 + 9000) / (dense_up + mid.m * mid.n))) < 1e-12
  table = dd.summarize(model, v, x, masks_kept=kept)
  up = next(l for l in table.splitlines() if l.startswith("up "))
  assert "dense, masked" in up and f"{1 - 1200 / dense_up:.4f}" in up and "1,200" in up
  assert f"masked kernels: sparsity {t['sparsity']:.4f}" in table


def test_rigl_run_reports_the_sparsity_of_its_masks(tmp_path):
  """train.py with a mask method: its table, last line and summary.json agree (never 'dense at
  sparsity 0.0000' beside 'sparsity 0.9')."""
  import json
  import subprocess
  import sys
  from pathlib import Path
  root = Path(__file__).resolve().parents[1]
  r = subprocess.run([sys.executable, str(root / "train.py"), "--config",
                      str(root / "configs" / "digits_mlp.py"), "--workdir", str(tmp_path / "wd"),
                      "--config.method=rigl", "--config.total_steps=10", "--config.masks.every=5",
                      "--config.progress_bar=False", "--config.fast_compile=True",
                      "--config.eval_every=0"], cwd=root, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  s = json.loads((tmp_path / "wd" / "summary.json").read_text())
  assert 0.85 < s["sparsity"] < 0.95
  rows = [l for l in r.stdout.splitlines() if l.startswith(("fc1 ", "fc2 ", "head "))]
  assert len(rows) == 3 and all("dense, masked" in l for l in rows), r.stdout
  assert sum(int(l.split()[-5].replace(",", "")) for l in rows) == sum(s["layer_kept"].values())
  assert f"masked kernels: sparsity {s['sparsity']:.4f}" in r.stdout
  assert f"sparsity {s['sparsity']:.4f}  stored {s['stored_params']:,}" in r.stdout
