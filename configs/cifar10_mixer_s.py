"""Mixer-S/4 on CIFAR-10 at 90% sparsity (paper: dense 85.64, DynaDiag 85.55 at 90%).

Mixer-S (hidden 512, 8 blocks, token MLP 256, channel MLP 2048) with patch 4 on 32x32
images (64 tokens). Same recipe as cifar10_vit_s: AdamW lr 1e-3, 10 warmup epochs, cosine,
weight decay 0.05, batch 256, 300 epochs, label smoothing 0.1, crop + flip, clip 1.0.
Sparse: all four mixing linears of every block (the head stays dense), compute fraction.
"""

from configs import common


def get_config():
  c = common.base()
  c.data.name = "cifar10"
  c.model.update(name="mixer", variant="S", patch_size=4, dropout=0.0, dtype=common.dtype())
  c.sparsity = 0.9
  c.sparse_layers = ("token_mlp_in", "token_mlp_out", "channel_mlp_in", "channel_mlp_out")
  c.allocation = "compute_fraction"
  c.batch_size = 256
  c.num_epochs = 300.0
  c.label_smoothing = 0.1
  c.optimizer.update(lr=1e-3, weight_decay=0.05, warmup_epochs=10.0, end_lr_fraction=0.01,
                     grad_clip=1.0)
  c.eval_batch_size = 1000
  c.eval_every = 5000
  c.log_every = 100
  c.checkpoint.every = 2000
  return c
