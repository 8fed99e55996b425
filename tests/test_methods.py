"""config.method: mask mechanics (RigL / SET / GMP / N:M / diagonal masks) and every method
training through `train_and_evaluate` with equal kept weights and exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dynadiag_jax as dd
from configs import digits_mlp
from dynadiag_jax import methods
from dynadiag_jax.diag_dense import COLLECTION
from dynadiag_jax.methods import masks, records
from dynadiag_jax.train import checkpoint, progress, train_and_evaluate
from dynadiag_jax.train import state as state_lib

ROOT = Path(__file__).resolve().parents[1]


def test_regrow_and_prune_keep_counts(rng):
  u = masks.init_units(masks.Layer("w", 8, 8, "unstructured", 10), jax.random.PRNGKey(1), False)
  assert int(u.sum()) == 10
  mag = jnp.asarray(rng.random(u.shape), jnp.float32)
  grow = jnp.asarray(rng.random(u.shape), jnp.float32)
  new = masks.regrow(u, mag, grow, jnp.asarray(3), 10)
  assert int(new.sum()) == 10
  m, g, u_, n_ = (np.asarray(t).ravel() for t in (mag, grow, u, new))
  act = np.flatnonzero(u_)
  low3 = act[np.argsort(m[act])[:3]]  # dropped: the 3 smallest magnitudes among the active
  stay = np.setdiff1d(act, low3)
  assert n_[stay].all()
  # grown: the 3 largest grow scores among the units not staying (a just-dropped one may
  # come back, as in RigL)
  free = np.setdiff1d(np.arange(u_.size), stay)
  grown = np.setdiff1d(np.flatnonzero(n_), stay)
  assert len(grown) == 3 and set(grown) == set(free[np.argsort(-g[free])[:3]])
  pr = masks.prune(jnp.ones((2, 6), bool), jnp.asarray(rng.random((2, 6)), jnp.float32),
                   jnp.asarray(2))
  np.testing.assert_array_equal(np.asarray(pr).sum(-1), [2, 2])


@pytest.mark.parametrize("m,n", [(12, 8), (8, 12)])
def test_diag_and_nm_layers(m, n, rng):
  lay = masks.layer("w", m, n, 0.75, "diag")
  p = dd.pattern.num_diagonals(m, n)
  assert lay.shape == (1, p) and lay.keep == dd.pattern.num_kept(m, n, 0.75)
  sel = np.zeros(p, bool)
  sel[[1, p - 1]] = True
  w = np.asarray(lay.to_weights(jnp.asarray(sel)[None]))
  np.testing.assert_array_equal(w, np.isin(dd.pattern.diagonal_index(m, n), [1, p - 1]))
  x = rng.standard_normal((m, n)).astype(np.float32)
  idx = dd.pattern.diagonal_index(m, n)
  want = [np.sqrt((x[idx == q] ** 2).sum()) for q in range(p)]
  np.testing.assert_allclose(np.asarray(lay.to_units(jnp.asarray(x)))[0], want, rtol=1e-5)
  nm = masks.layer("w", m, n, 0.75, "nm", group=4)
  u = masks.init_units(nm, jax.random.PRNGKey(0), False)
  wn = np.asarray(nm.to_weights(u))  # N of every 4 consecutive inputs of each output
  np.testing.assert_array_equal(wn.reshape(m // 4, 4, n).sum(1), nm.keep)
  assert abs(nm.kept - masks.layer("w", m, n, 0.75, "unstructured").kept) <= n * m // 4


def test_masked_optimizer_keeps_zeros_and_is_deterministic(rng):
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)},
            "b": jnp.zeros(8)}
  lay = {"a/kernel": masks.layer("a/kernel", 16, 8, 0.8, "unstructured")}
  sched = masks.Schedule(100, every=2, growth="gradient")
  tx = masks.masked(optax.adam(0.1), lay, sched, seed=3)
  s0 = tx.init(params)
  assert int(s0.masks["a/kernel"].sum()) == lay["a/kernel"].keep
  step = jax.jit(tx.update)
  p, s = params, s0
  seen = set()
  for i in range(6):
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), p)
    u, s = step(g, s, p)
    p = optax.apply_updates(p, u)
    w = np.asarray(lay["a/kernel"].to_weights(s.masks["a/kernel"]))
    assert w.sum() == lay["a/kernel"].keep  # constant budget through regrowth
    assert np.all(np.asarray(p["a"]["kernel"])[~w] == 0)  # exactly zero off the mask
    seen.add(w.tobytes())
  assert len(seen) > 1  # the mask moved
  s_again = tx.init(params)
  np.testing.assert_array_equal(s_again.masks["a/kernel"], s0.masks["a/kernel"])
  # GMP: starts dense, reaches the budget at its last pruning step
  gmp = masks.masked(optax.sgd(0.1), lay, masks.Schedule(20, every=5, growth="none", gmp=True), 0)
  sg, pg = gmp.init(params), params
  assert bool(sg.masks["a/kernel"].all())
  gstep = jax.jit(gmp.update)
  for _ in range(20):
    u, sg = gstep(jax.tree.map(jnp.ones_like, pg), sg, pg)
    pg = optax.apply_updates(pg, u)
  assert int(sg.masks["a/kernel"].sum()) == lay["a/kernel"].keep


def _config(method: str, steps: int = 24):
  c = digits_mlp.get_config()
  c.method = method
  c.model.hidden = (32, 32)
  c.total_steps = steps
  c.masks.every = 4
  c.recipe.update(freeze_fraction=0.5, num_levels=2)
  c.checkpoint.update(every=8, keep=10, async_save=False)
  c.update(eval_every=0, log_every=4, progress_bar=False, num_devices=2, fast_compile=True)
  return c


def test_static_diag_freezes_on_given_patterns(tmp_path):
  """config.static_patterns: static_diag keeps a run's offsets instead of random ones."""
  from dynadiag_jax.train import loop  # pylint: disable=g-import-not-at-top
  run = loop.Run.build(_config("static_diag"))
  x = run.spec.dummy_input()
  rand = records.patterns(run.model, run.fresh().variables, x)
  assert set(rand) == {"fc1", "fc2", "head"}
  want = {}
  for name, e in rand.items():  # K offsets other than the random ones where P allows
    p = max(e["m"], e["n"])
    k = len(e["offsets"])
    rest = [o for o in range(p) if o not in e["offsets"]]
    want[name] = {**e, "offsets": sorted((rest + e["offsets"])[:k])}
  path = tmp_path / records.PATTERNS
  path.write_text(json.dumps(want))
  given = run.config.copy_and_resolve_references()
  given.static_patterns = str(path)
  got = records.patterns(run.model, state_lib.prepare(given, run.fresh_unprepared()).variables, x)
  assert {k: v["offsets"] for k, v in got.items()} == {k: v["offsets"] for k, v in want.items()}
  assert got != rand
  bad = {**want, "fc1": {**want["fc1"], "offsets": want["fc1"]["offsets"][:-1]}}
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match="'fc1' needs"):
    state_lib.prepare(given, run.fresh_unprepared())
  path.write_text(json.dumps({k: v for k, v in want.items() if k != "fc2"}))
  with pytest.raises(ValueError, match="no layer 'fc2'"):
    state_lib.prepare(given, run.fresh_unprepared())
  given.static_patterns = str(tmp_path / "missing.json")
  with pytest.raises(FileNotFoundError, match="missing.json"):
    state_lib.prepare(given, run.fresh_unprepared())


def test_alpha_trace_is_exact_and_last_record_wins(tmp_path, rng):
  """alpha.jsonl holds alpha bit-exact in float32 (near-ties stay ordered); a resumed step overwrites."""
  layer = dd.DiagDense(24, sparsity=0.75)
  v = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 16)))
  a = rng.standard_normal(v["params"]["alpha"].shape).astype(np.float32)
  a[1] = np.nextafter(a[0], np.float32(np.inf))  # a tie that 7 decimals would blur
  params = {"layer": {**v["params"], "alpha": jnp.asarray(a)}}
  rep = lambda t: jax.tree.map(lambda x: jnp.asarray(x)[None], t)  # as pmap replicates
  state = types.SimpleNamespace(params=rep(params), extra={COLLECTION: rep({"layer": v[COLLECTION]})})
  records.trace(str(tmp_path), 3, state, 0.5)
  records.trace(str(tmp_path), 4, state, 0.25)
  state.params = rep({"layer": {**v["params"], "alpha": jnp.asarray(-a)}})
  records.trace(str(tmp_path), 4, state, 0.125)  # step 4 again, as after a resume
  got = records.read_trace(str(tmp_path))
  assert [r["step"] for r in got] == [3, 4] and got[1]["temperature"] == 0.125
  assert got[0]["layer"] == "layer" and got[0]["k"] == int(v[COLLECTION]["k"])
  np.testing.assert_array_equal(np.asarray(got[0]["alpha"], np.float32), a)
  np.testing.assert_array_equal(np.asarray(got[1]["alpha"], np.float32), -a)
  assert np.float32(got[0]["alpha"][1]) > np.float32(got[0]["alpha"][0])


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown config.method 'lottery'"):
    methods.name(_config("lottery"))


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.METHODS)
def test_method_trains_and_resumes_exactly(method, tmp_path):
  """Each method trains on 2 pmap devices; resuming from step 8 (as after kill -9) ends bitwise equal."""
  c = _config(method)
  ref, run = tmp_path / "ref", tmp_path / "run"
  s = train_and_evaluate(c, str(ref))
  assert s["method"] == method and 0.0 <= s["test_accuracy"] <= 1.0
  loss = [r["loss"] for r in progress.read_metrics(str(ref)) if r.get("split") == "train"]
  assert loss[-1] < loss[0], loss  # it learns
  assert (ref / records.PREDICTIONS).exists() and (ref / "summary.json").exists()
  kept = np.load(ref / records.PREDICTIONS)
  assert kept.shape == (360,) and abs(kept.mean() - s["test_accuracy"]) < 1e-6
  if method != "dense":  # equal kept weights: within one diagonal of DynaDiag's K x D
    assert 0.88 < s["sparsity"] < 0.91, s["sparsity"]
  if method == "static_diag":
    pat = json.loads((ref / records.PATTERNS).read_text())
    assert set(pat) == {"fc1", "fc2", "head"}
  # kill -9 after the step-8 checkpoint: its later checkpoints and the summary never happened
  shutil.copytree(ref, run)
  for d in (run / "checkpoints").iterdir():
    if d.name.isdigit() and int(d.name) > 8:
      shutil.rmtree(d)
  (run / "summary.json").unlink()
  s2 = train_and_evaluate(c, str(run))
  assert s2["resumed_from"] == 8
  a, _ = checkpoint.load(str(ref / "checkpoints"))
  b, _ = checkpoint.load(str(run / "checkpoints"))
  assert sorted(a) == sorted(b)
  diff = [k for k in a if a[k].tobytes() != b[k].tobytes()]
  assert not diff, diff[:5]
  if method in methods.MASKED:
    assert any("masks" in k for k in a)  # the masks are in the checkpoint


@pytest.mark.slow
def test_rigl_sigkill_subprocess_resumes_bitwise(tmp_path):
  flags = ["--config.method=rigl", "--config.total_steps=60", "--config.masks.every=5",
           "--config.model.hidden=(32,32)", "--config.checkpoint.every=10",
           "--config.eval_every=0", "--config.log_every=10", "--config.progress_bar=False",
           "--config.num_devices=1", "--config.fast_compile=True"]
  cmd = lambda wd: [sys.executable, str(ROOT / "train.py"), "--config",
                    str(ROOT / "configs" / "digits_mlp.py"), "--workdir", str(wd), *flags]
  ref, run = tmp_path / "ref", tmp_path / "run"
  r = subprocess.run(cmd(ref), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  p = subprocess.Popen(cmd(run), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 240
  ck = run / "checkpoints"
  while p.poll() is None and time.monotonic() < deadline:
    if ck.is_dir() and any(d.name.isdigit() and int(d.name) >= 20 for d in ck.iterdir()):
      os.kill(p.pid, signal.SIGKILL)
      break
    time.sleep(0.005)
  p.wait(timeout=60)
  assert p.returncode == -signal.SIGKILL
  r = subprocess.run(cmd(run), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  a, _ = checkpoint.load(str(ref / "checkpoints"))
  b, _ = checkpoint.load(str(run / "checkpoints"))
  assert [k for k in a if a[k].tobytes() != b[k].tobytes()] == []
