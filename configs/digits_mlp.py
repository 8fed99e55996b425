"""64-128-128-10 MLP at 90% sparsity on scikit-learn's 8x8 digits (offline, seconds on a CPU).

The smallest real run: tests use it for resume and checkpoint checks. ERK over fc1, fc2
and head, AdamW lr 5e-3 cosine, 600 steps of batch 64 (27 epochs of 1437 images).
"""

from configs import common


def get_config():
  c = common.base()
  c.data.name = "digits"
  c.model = common.model("mlp", hidden=(128, 128))
  c.sparsity = 0.9
  c.sparse_layers = ("fc1", "fc2", "head")
  c.allocation = "erk"
  c.batch_size = 64
  c.total_steps = 600
  c.optimizer.update(lr=5e-3, weight_decay=1e-4)
  c.eval_batch_size = 360
  c.eval_every = 200
  c.log_every = 20
  c.checkpoint.every = 100
  return c
