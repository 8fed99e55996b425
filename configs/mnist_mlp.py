"""784-256-256-10 MLP at 90% sparsity on MNIST-5k (offline default; a few minutes on 2 CPU cores).

ERK allocation over fc1, fc2 and head (global 90% over the three; ERK keeps the small head
nearly dense), AdamW lr 5e-3 with cosine decay, weight decay 1e-4 (not on alpha or biases),
3000 steps of batch 128 (96 epochs of the 4000 training images).
Dense baseline: --config.sparse=False.
"""

from configs import common


def get_config():
  c = common.base()
  c.data.name = "mnist5k"
  c.model = common.model("mlp", hidden=(256, 256))
  c.sparsity = 0.9
  c.sparse_layers = ("fc1", "fc2", "head")
  c.allocation = "erk"  # compute_fraction equals uniform on an MLP (same rows per layer)
  c.batch_size = 128
  c.total_steps = 3000
  c.optimizer.update(lr=5e-3, weight_decay=1e-4)
  c.eval_every = 500
  c.log_every = 50
  c.checkpoint.every = 500
  return c
