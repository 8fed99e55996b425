"""Training loop: 4-way pmap equals 1 device; short real runs of MLP, ViT, Mixer, GPT-2; summary."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import cifar10_mixer_s, cifar10_vit_s, digits_mlp, text_gpt2_tiny
from dynadiag_jax.train import CheckpointError, progress, train_and_evaluate


def _quiet(c, steps: int):
  """Few steps, no bar, one checkpoint at the end, 2 K_active levels."""
  c.total_steps = steps
  c.progress_bar = False
  c.eval_every = 0
  c.log_every = 1
  c.checkpoint.every = 10_000
  c.schedule.num_levels = 2
  c.num_devices = 1
  c.fast_compile = True
  return c


def _digits(steps: int = 50, **kw):
  c = _quiet(digits_mlp.get_config(), steps)
  c.model.hidden = (32, 32)
  for k, v in kw.items():
    c[k] = v
  return c


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


def test_incompatible_or_torn_checkpoint_is_a_clear_error(tmp_path):
  train_and_evaluate(_digits(12, log_every=0, sparse=False), str(tmp_path))
  with pytest.raises(CheckpointError, match="does not fit") as e:
    train_and_evaluate(_digits(12, log_every=0, sparse=False,
                               model=dict(name="mlp", hidden=(48, 32))), str(tmp_path))
  assert str(tmp_path / "checkpoints") in str(e.value)
  meta = tmp_path / "checkpoints" / "12" / "meta" / "metadata"
  meta.write_text(meta.read_text()[:40])  # a torn JSON file
  with pytest.raises(CheckpointError, match="metadata of the checkpoint at step 12"):
    train_and_evaluate(_digits(12, log_every=0, sparse=False), str(tmp_path))
  assert meta.read_text()[:40] == meta.read_text()  # left as it was


def _loss_drops(workdir: str, k: int = 5):
  l = _train_losses(workdir)
  assert np.isfinite(l).all()
  assert l[-k:].mean() < l[:k].mean() - 0.25, l


@pytest.mark.parametrize("module", [cifar10_vit_s, cifar10_mixer_s], ids=["vit_s", "mixer_s"])
def test_vision_configs_train_on_digits(module, tmp_path):
  c = _quiet(module.get_config(), 60)
  c.data.name = "digits"
  c.batch_size = 64
  c.optimizer.update(warmup_epochs=0.0, warmup_steps=5, lr=1e-2)
  c.schedule.update(freeze_fraction=0.5, k_start_fraction=0.0)  # one K_active level
  if c.model.name == "vit":
    c.model.update(patch_size=2, width=32, depth=1, num_heads=2, mlp_dim=64)
  else:
    c.model.update(patch_size=2, hidden=32, depth=1, token_mlp_dim=16, channel_mlp_dim=64)
  s = train_and_evaluate(c, str(tmp_path))
  print(_train_losses(str(tmp_path)))
  _loss_drops(str(tmp_path))
  assert s["test_accuracy"] > 0.3 and 0.8 < s["sparsity"] < 0.95


def test_text_gpt2_tiny_trains_and_reports_perplexity(tmp_path):
  c = _quiet(text_gpt2_tiny.get_config(), 60)
  c.data.seq_len = 32
  c.batch_size = 16
  c.eval_batch_size = 256
  c.optimizer.update(warmup_steps=5, lr=3e-3)
  c.schedule.update(freeze_fraction=0.5, k_start_fraction=0.0)
  c.model.update(num_layers=1, width=64, num_heads=2, context=32)
  s = train_and_evaluate(c, str(tmp_path))
  _loss_drops(str(tmp_path))
  assert "perplexity" in s and 1.0 < s["perplexity"] < 257
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["perplexity"] == pytest.approx(s["perplexity"])
