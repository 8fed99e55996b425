"""config.parallel='mesh': the FSDP sharding rule, the state placed by it, DiagDense products per
shard, and a run saved on 4 devices resumed on 2 and on 1 (mesh and pmap) equal to an
uninterrupted run on that device count (4 forced CPU devices, conftest)."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import digits_mlp
from dynadiag_jax import data
from dynadiag_jax.train import checkpoint, loop, mesh, parallel, progress, train_and_evaluate
from dynadiag_jax.train import state as state_lib

STEPS, SAVE = 12, 6  # freeze at 9: the resumed runs explore, then freeze


def _config(devices: int, parallel: str = "mesh", fsdp: int = 1, **kw):
  """digits_mlp, hidden (32, 32), on `devices` local devices; every leaf shardable."""
  c = digits_mlp.get_config()
  c.model.hidden = (32, 32)
  c.update(total_steps=STEPS, progress_bar=False, eval_every=0, log_every=4, num_devices=devices,
           fast_compile=True, parallel=parallel, **kw)
  c.recipe.update(num_levels=2, freeze_fraction=0.75)
  c.checkpoint.update(every=SAVE, keep=5)
  c.mesh.update(fsdp=fsdp, fsdp_min_size=0)
  return c


def test_fsdp_rule():
  assert mesh.spec((64, 32), 2, 0) == P("fsdp")  # the largest axis
  assert mesh.spec((32, 64), 2, 0) == P(None, "fsdp")
  assert mesh.spec((6, 9), 3, 0) == P(None, "fsdp")  # 9 first, divisible
  assert mesh.spec((9, 4), 2, 0) == P(None, "fsdp")  # 9 not divisible: the next
  assert mesh.spec((9, 5), 2, 0) == P()  # none divisible
  assert mesh.spec((64,), 2, 0) == P()  # vectors (bias, alpha) replicated
  assert mesh.spec((), 2, 0) == P()
  assert mesh.spec((64, 32), 2, 4096) == P()  # below fsdp_min_size
  assert mesh.spec((64, 32), 1, 0) == P()
  c = _config(4)
  assert mesh.mesh_shape(c, 4) == (4, 1)
  c.mesh.fsdp = 2
  assert mesh.mesh_shape(c, 4) == (2, 2)
  c.mesh.data = 1
  with pytest.raises(ValueError, match="must equal the 4 devices"):
    mesh.mesh_shape(c, 4)
  c.mesh.update(data=-1, fsdp=3)
  with pytest.raises(ValueError, match="divide the 4 devices"):
    mesh.mesh_shape(c, 4)
  c.parallel = "shard"
  with pytest.raises(ValueError, match="config.parallel must be one of"):
    parallel.build(c, jax.local_devices())


@pytest.mark.parametrize("frozen", [False, True])
def test_state_sharded_by_the_rule_products_per_shard(frozen):
  """Every params / optimizer leaf sits as `spec` says, comes back bitwise, keeps its sharding
  through a step, and the step runs each DiagDense product under shard_map (exploring at the
  last K_active level, and frozen with the offsets closed over)."""
  run = loop.Run.build(_config(4, fsdp=2, backend="xla"))
  at = run.sched.freeze_step - (0 if frozen else 1)
  par, host = run.par, state_lib.advance(run.fresh(), run.sched, at)
  assert dict(par.mesh.shape) == {"data": 2, "fsdp": 2} and host.frozen == frozen
  placed = par.put(host)
  want = par.shardings(host)
  sharded = 0
  for x, sh in zip(jax.tree.leaves(placed), jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(sh, x.ndim), (x.shape, x.sharding, sh)
    sharded += sh.spec != P()
  assert sharded >= 6  # values of fc1, fc2, head and their two Adam moments
  back = par.host(placed)
  for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(back)):
    assert np.asarray(a).tobytes() == b.tobytes()
  step = par.train_step(run.model, run.tx, run.sched, run.spec, 0.0, None)
  raw = data.train_batch(run.source, at, global_batch=64, seed=0, num_devices=4, shard=False,
                         raw=True)
  batch = par.batch(run.source, raw)
  const = par.host(placed.extra)
  jaxpr = str(jax.make_jaxpr(lambda s, b: step.fn(s.replace(extra=const), b))(placed, batch))
  assert jaxpr.count("shard_map[") == 3 * 2, "DiagDense products not per shard"  # fwd, transpose
  new, metrics = step(placed, batch)
  for x, sh in zip(jax.tree.leaves(new), jax.tree.leaves(par.shardings(par.host(new)))):
    assert x.sharding.is_equivalent_to(sh, x.ndim), (x.shape, x.sharding, sh)
  assert np.isfinite(float(par.scalars(metrics)["loss"]))


def _final(wd: Path) -> tuple[dict, dict]:
  flat, meta = checkpoint.load(str(wd / "checkpoints"))
  losses = {r["step"]: r["loss"] for r in progress.read_metrics(str(wd)) if r.get("split") == "train"}
  return flat, losses


def _resumed(src: Path, wd: Path, config) -> Path:
  """A workdir holding only src's checkpoint at SAVE, run to the end with `config`."""
  (wd / "checkpoints").mkdir(parents=True)
  shutil.copytree(src / "checkpoints" / str(SAVE), wd / "checkpoints" / str(SAVE))
  summary = train_and_evaluate(config, str(wd))
  assert summary["resumed_from"] == SAVE
  return wd


def _compare(a: Path, b: Path, rtol: float = 1e-5, atol: float = 1e-6) -> float:
  """Max relative difference of the final leaves and losses after SAVE; bitwise for ints."""
  (fa, la), (fb, lb) = _final(a), _final(b)
  assert sorted(fa) == sorted(fb)
  worst = 0.0
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    if not np.issubdtype(x.dtype, np.floating):
      np.testing.assert_array_equal(x, y, err_msg=k)  # step, rng, offsets, k: exact
      continue
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=k)
    worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
  steps = [s for s in la if s > SAVE]
  assert steps and steps == [s for s in lb if s > SAVE]
  np.testing.assert_allclose([la[s] for s in steps], [lb[s] for s in steps], rtol=rtol)
  return worst


@pytest.mark.slow
def test_saved_on_4_resumes_on_2_and_1(tmp_path):
  """A mesh run on 4 devices (2x2, FSDP) saved at step 6 resumes on 2 (a 1x2 mesh, and pmap) and
  on 1 device; each ends as an uninterrupted run on that count does. To float tolerance, not
  bitwise: XLA sums the gradient over another number of shards, so two uninterrupted runs on 4
  and on 2 devices differ in the last bits too (both differences are printed; observed 6e-8)."""
  four = tmp_path / "four"
  train_and_evaluate(_config(4, fsdp=2), str(four))
  refs = {}
  for name, config in [("mesh on 2", _config(2, fsdp=2)), ("mesh on 1", _config(1)),
                       ("pmap on 2", _config(2, parallel="pmap"))]:
    devices = config.num_devices
    if devices not in refs:  # pmap and mesh on 2 differ by rounding only: one reference
      refs[devices] = tmp_path / f"ref{devices}"
      train_and_evaluate(config, str(refs[devices]))
    got = _resumed(four, tmp_path / name.replace(" ", "_"), config)
    worst = _compare(got, refs[devices])
    print(f"{name}: resumed from the 4-device step {SAVE} vs uninterrupted on {devices}: max "
          f"|diff| {worst:.2e}; uninterrupted on 4 vs on {devices}: "
          f"{_compare(four, refs[devices]):.2e}")
