"""Training loop: 4-way pmap equals 1 device; short real runs of MLP, ViT, Mixer, GPT-2; summary;
resume checks the saved config, keeps metrics.jsonl exact; divergence stops at the first
non-finite step and keeps the last good checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import cifar10_mixer_s, cifar10_vit_s, digits_mlp, mnist_vit_tiny, text_gpt2_tiny
from dynadiag_jax.train import (CheckpointError, checkpoint, guard, progress,
                                train_and_evaluate)


def _quiet(c, steps: int):
  """Few steps, no bar, one checkpoint at the end, 2 K_active levels."""
  c.total_steps = steps
  c.progress_bar = False
  c.eval_every = 0
  c.log_every = 1
  c.checkpoint.every = 10_000
  c.recipe.num_levels = 2
  c.num_devices = 1
  c.fast_compile = True
  return c


def _digits(steps: int = 50, **kw):
  """digits_mlp, hidden (32, 32); kw: fields, dotted names as 'optimizer__lr'."""
  c = _quiet(digits_mlp.get_config(), steps)
  c.model.hidden = (32, 32)
  for k, v in kw.items():
    node, *path = k.split("__")
    if path:
      c[node][path[0]] = v
    else:
      c[k] = v
  return c


SHARED = dict(log_every=3, checkpoint__every=5, checkpoint__keep=10)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
  """One finished 20-step sparse digits run (freeze at 6, logs every 3, checkpoints every 5)."""
  wd = tmp_path_factory.mktemp("finished")
  return wd, train_and_evaluate(_digits(20, **SHARED), str(wd))


def _copy(finished, tmp_path: Path) -> Path:
  wd = tmp_path / "wd"
  shutil.copytree(finished[0], wd)
  return wd


def _steps(wd: Path) -> list[int]:
  return sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())


def _digest(d: Path) -> dict[str, str]:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob("*")) if p.is_file()}


def _records(wd: Path) -> list[tuple]:
  """metrics.jsonl without timings: (step, split or event, values)."""
  out = []
  for r in progress.read_metrics(str(wd)):
    r = {k: v for k, v in r.items() if k != "steps_per_s"}
    out.append((r.pop("step"), r.pop("split", None) or r.pop("event"), r))
  return out


def _train_losses(workdir: str) -> np.ndarray:
  return np.array([r["loss"] for r in progress.read_metrics(workdir) if r.get("split") == "train"])


def test_pmap_four_devices_matches_one_device(tmp_path):
  assert jax.local_device_count() >= 4, "conftest forces 4 CPU devices"
  s1 = train_and_evaluate(_digits(num_devices=1), str(tmp_path / "d1"))
  s4 = train_and_evaluate(_digits(num_devices=4), str(tmp_path / "d4"))
  l1, l4 = _train_losses(str(tmp_path / "d1")), _train_losses(str(tmp_path / "d4"))
  assert len(l1) == len(l4) == 50
  np.testing.assert_allclose(l4, l1, rtol=0, atol=1e-4)
  assert abs(s1["test_accuracy"] - s4["test_accuracy"]) <= 1 / 360 + 1e-9
  assert s1["sparsity"] == s4["sparsity"] > 0.85
  assert s1["train_step_compiles"] == s4["train_step_compiles"] == 3  # 2 K_active levels + frozen
  events = [r["event"] for r in progress.read_metrics(str(tmp_path / "d4")) if "event" in r]
  assert events == ["freeze"]


def test_checkpoints_every_n_steps_and_no_initial_one(finished):
  assert _steps(finished[0]) == [5, 10, 15, 20]  # no step-1 checkpoint


def test_resume_refuses_a_checkpoint_of_another_config(finished, tmp_path):
  wd = _copy(finished, tmp_path)
  before = _digest(wd)
  for kw, want in [({"sparsity": 0.5}, "sparsity: 0.9 -> 0.5"),
                   ({"model__hidden": (48, 32)}, "model.hidden: [32, 32] -> [48, 32]"),
                   ({"optimizer__lr": 1e-3}, "optimizer.lr: 0.005 -> 0.001")]:
    with pytest.raises(CheckpointError) as e:
      train_and_evaluate(_digits(20, **SHARED, **kw), str(wd))
    msg = str(e.value)
    assert msg.startswith(f"The checkpoint at step 20 in '{wd / 'checkpoints'}' was written with "
                          "another config: ") and want in msg, msg
    assert "new --workdir" in msg and "\n" not in msg
  assert _digest(wd) == before  # nothing written
  # What may change on resume: length, logging, evaluation, checkpoints, devices, bar.
  s = train_and_evaluate(_digits(25, log_every=5, eval_every=25, checkpoint__every=7,
                                 checkpoint__keep=10, num_devices=2), str(wd))
  assert s["resumed_from"] == 20 and s["steps"] == 25


def test_config_diff_reads_fields_added_later_as_their_implied_value():
  """A checkpoint saved before a field existed resumes when the run keeps that field's old
  behaviour, and is refused when it does not."""
  now = digits_mlp.get_config()
  old = json.loads(checkpoint.config_json(now))
  for k in ("method", "static_patterns"):
    old.pop(k)
  old["recipe"].pop("block")  # before config.block existed (later config.recipe.block)
  now.recipe.experimental.hold = ()
  assert checkpoint.config_diff(json.dumps(old), now) == []
  now.recipe.block = 16
  assert checkpoint.config_diff(json.dumps(old), now) == ["recipe.block: 1 -> 16"]
  old["block"] = 16  # saved before block moved into the recipe (issue 22): read as recipe.block
  assert checkpoint.config_diff(json.dumps(old), now) == []


def _pre_recipe(config) -> dict:
  """`config` as a checkpoint saved before config.recipe stored it: old names, no gate field."""
  old = json.loads(checkpoint.config_json(config))
  old.pop("recipe")
  old["schedule"] = {"freeze_fraction": 0.3, "t_start": 5.0, "t_end": 0.05,
                     "k_start_fraction": 1.0, "num_levels": 5}
  old.update(l1=0.0, alpha_lr=1.0, select_every=1, select_after=0, alpha_update="adam",
             alpha_spread=1e-3, shadow_init="random", max_swaps=0, hold_alpha=[])
  return old


def test_a_checkpoint_from_before_the_recipe_resumes_or_is_refused_by_name():
  now = digits_mlp.get_config()
  old = _pre_recipe(now)  # no 'gate': it ran the paper's soft_topk
  now.recipe.name = "paper"
  assert checkpoint.config_diff(json.dumps(old), now) == []
  now.recipe.name = "default"
  assert checkpoint.config_diff(json.dumps(old), now) == [
      'recipe.gate: "soft_topk" -> "st_topk_shadow"']
  now.recipe.name, now.recipe.t_end = "paper", 0.5
  assert checkpoint.config_diff(json.dumps(old), now) == ["recipe.t_end: 0.05 -> 0.5"]
  now.recipe.t_end = None
  old["select_every"] = 4  # a removed knob, on: that run cannot be continued here
  assert checkpoint.config_diff(json.dumps(old), now) == ["select_every: 4 -> (absent)"]


def test_mismatched_checkpoint_message_reads_as_one_sentence(finished):
  ck = checkpoint.Checkpointer(str(finished[0] / "checkpoints"), every=5)
  try:
    with pytest.raises(CheckpointError) as e:
      ck.restore(20, lambda meta: {"params": np.zeros(3, np.float32)})  # another model
  finally:
    ck.close()
  msg = str(e.value)
  assert msg.startswith(f"The checkpoint at step 20 in '{ck.directory}' does not fit this run's "
                        "model or optimizer: "), msg
  assert msg.endswith(f"or give this run a new --workdir (not {finished[0]}).")
  assert "out of the way" not in msg  # advice for a corrupt checkpoint, not for another config


def test_resume_rewrites_metrics_exactly_once(finished, tmp_path):
  """Killed after step 5 (later checkpoints gone): records past 5 and the freeze at 6 are
  written once more, identical, the interval 4-6 averaged over the same steps; a rerun of
  the finished run adds only its restore event."""
  wd = _copy(finished, tmp_path)
  ref = _records(finished[0])
  for s in (10, 15, 20):
    shutil.rmtree(wd / "checkpoints" / str(s))
  s = train_and_evaluate(_digits(20, **SHARED), str(wd))
  assert s["resumed_from"] == 5
  got = _records(wd)
  assert [r for r in got if r[1] != "restore"] == ref
  assert [r[0] for r in got if r[1] == "freeze"] == [6]
  s = train_and_evaluate(_digits(20, **SHARED), str(wd))  # finished: evaluates, records once
  assert s["resumed_from"] == 20
  again = _records(wd)
  assert [r for r in again if r[1] != "restore"] == ref
  assert [r[0] for r in again if r[1] == "restore"] == [5, 20]


def test_divergence_stops_at_the_first_nonfinite_step(tmp_path):
  """lr ramps to 1e6: the loss goes non-finite within ~15 steps, logged or not."""
  kw = dict(optimizer__lr=1e6, optimizer__warmup_steps=100, total_steps=200,
            checkpoint__every=5, checkpoint__keep=10)
  stops = {}
  for log_every in (0, 1):
    wd = tmp_path / f"log{log_every}"
    with pytest.raises(guard.DivergenceError) as e:
      train_and_evaluate(_digits(200, **kw, log_every=log_every), str(wd))
    stops[log_every] = e.value.step
    steps = _steps(wd)
    assert steps and max(steps) < e.value.step
    assert f"the last good checkpoint is step {max(steps)}" in str(e.value)
    for s in steps:  # every checkpoint kept is finite
      assert guard.finite_state(checkpoint.load(str(wd / "checkpoints"), step=s)[0])
    assert not (wd / "summary.json").exists()
  train = [r["step"] for r in progress.read_metrics(str(tmp_path / "log1")) if "split" in r]
  assert stops[0] == stops[1] == train[-1] + 1  # the first bad step, with or without logging


def test_eval_loss_is_checked():
  guard.check_eval({"loss": 0.5}, 10)
  with pytest.raises(guard.DivergenceError, match="evaluation loss is nan at step 10"):
    guard.check_eval({"loss": float("nan")}, 10)


def test_bar_starts_after_the_first_step(tmp_path, capsys):
  """No empty 0/N bar, and after a resume the ETA does not count the compile."""
  rep = progress.Reporter(str(tmp_path), total=1000, start_step=500, bar=True)
  rep.message("Resumed")
  assert "/1000" not in capsys.readouterr().err
  time.sleep(0.5)  # the first step's compile
  rep.tick()
  assert rep.bar.n == 501 and rep.bar.format_dict["elapsed"] < 0.4
  rep.write(501, "train", {"loss": 1.0, "steps_per_s": 3.0}, postfix=True)
  assert "it/s" not in str(rep.bar.postfix)
  rep.close()
  err = capsys.readouterr().err
  assert "501/1000" in err and "500/1000" not in err


def test_summary_metrics_and_dense_baseline(tmp_path):
  s = train_and_evaluate(_digits(30, sparse=False, log_every=10), str(tmp_path))
  saved = json.loads((tmp_path / "summary.json").read_text())
  for k in ("test_accuracy", "sparsity", "stored_params", "dense_params", "steps", "wall_s"):
    assert k in saved, k
  assert saved["sparsity"] == 0.0 and saved["stored_params"] == saved["dense_params"]
  assert saved["steps"] == 30 and s["test_accuracy"] > 0.5
  recs = progress.read_metrics(str(tmp_path))
  train = [r for r in recs if r.get("split") == "train"]
  assert [r["step"] for r in train] == [10, 20, 30]
  assert {"loss", "accuracy", "lr", "steps_per_s", "active"} <= set(train[0])
  assert os.listdir(tmp_path / progress.TB_DIR), "TensorBoard event file"
  # Rerunning a finished run restores its last checkpoint and only evaluates.
  s2 = train_and_evaluate(_digits(30, sparse=False, log_every=10), str(tmp_path))
  assert s2["resumed_from"] == 30 and s2["test_accuracy"] == s["test_accuracy"]


def test_torn_checkpoint_is_a_clear_error(finished, tmp_path):
  wd = _copy(finished, tmp_path)
  meta = wd / "checkpoints" / "20" / "meta" / "metadata"
  meta.write_text(meta.read_text()[:40])  # a torn JSON file
  with pytest.raises(CheckpointError, match="metadata of the checkpoint at step 20") as e:
    train_and_evaluate(_digits(20, **SHARED), str(wd))
  assert str(e.value).endswith(f"To resume from step 15 instead, move {wd / 'checkpoints' / '20'} "
                               "out of the way.")
  assert meta.read_text()[:40] == meta.read_text()  # left as it was


def _loss_drops(workdir: str, k: int = 5):
  l = _train_losses(workdir)
  assert np.isfinite(l).all()
  assert l[-k:].mean() < l[:k].mean() - 0.25, l


@pytest.mark.slow
@pytest.mark.parametrize("module", [cifar10_vit_s, cifar10_mixer_s], ids=["vit_s", "mixer_s"])
def test_vision_configs_train_on_digits(module, tmp_path):
  c = _quiet(module.get_config(), 60)
  c.data.name = "digits"
  c.batch_size = 64
  c.optimizer.update(warmup_epochs=0.0, warmup_steps=5, lr=1e-2)
  c.recipe.update(freeze_fraction=0.5, k_start_fraction=0.0)  # one K_active level
  if c.model.name == "vit":
    c.model.update(patch_size=2, width=32, depth=1, num_heads=2, mlp_dim=64)
  else:
    c.model.update(patch_size=2, hidden=32, depth=1, token_mlp_dim=16, channel_mlp_dim=64)
  s = train_and_evaluate(c, str(tmp_path))
  print(_train_losses(str(tmp_path)))
  _loss_drops(str(tmp_path))
  assert s["test_accuracy"] > 0.3 and 0.8 < s["sparsity"] < 0.95


@pytest.mark.slow
def test_text_gpt2_tiny_trains_and_reports_perplexity(tmp_path):
  c = _quiet(text_gpt2_tiny.get_config(), 60)
  c.data.seq_len = 32
  c.batch_size = 16
  c.eval_batch_size = 256
  c.optimizer.update(warmup_steps=5, lr=3e-3)
  c.recipe.update(freeze_fraction=0.5, k_start_fraction=0.0)
  c.model.update(num_layers=1, width=64, num_heads=2, context=32)
  s = train_and_evaluate(c, str(tmp_path))
  _loss_drops(str(tmp_path))
  assert "perplexity" in s and 1.0 < s["perplexity"] < 257
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["perplexity"] == pytest.approx(s["perplexity"])


def test_config_diff_reads_a_nested_field_added_later():
  """model.split_qkv, absent from an older ViT checkpoint's config, reads as False."""
  now = mnist_vit_tiny.get_config()
  old = json.loads(checkpoint.config_json(now))
  del old["model"]["split_qkv"]
  assert checkpoint.config_diff(json.dumps(old), now) == []
  now.model.split_qkv = True
  assert checkpoint.config_diff(json.dumps(old), now) == ["model.split_qkv: false -> true"]
