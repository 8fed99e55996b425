"""Mixer-S/4 on CIFAR-10 at 90% sparsity (paper: dense 85.64, DynaDiag 85.55 at 90%).

Mixer-S (hidden 512, 8 blocks, token MLP 256, channel MLP 2048) with patch 4 on 32x32
images (64 tokens). Same recipe as cifar10_vit_s: AdamW lr 1e-3, 10 warmup epochs, cosine,
weight decay 0.05, batch 256, 300 epochs, label smoothing 0.1, crop + flip, clip 1.0.
Sparse: all four mixing linears of every block (the head stays dense), compute fraction.
"""

from configs import cifar10_vit_s, common


def get_config():
  c = cifar10_vit_s.get_config()  # same data, recipe and schedules
  c.model = common.model("mixer", variant="S", patch_size=4, dropout=0.0)
  c.sparse_layers = ("token_mlp_in", "token_mlp_out", "channel_mlp_in", "channel_mlp_out")
  return c
