"""Mixer-S/16 on ImageNet-1k at 90% sparsity, with the DeiT-style recipe of imagenet_vit_b.

AdamW lr 1e-3, batch 1024, 5 warmup epochs, cosine, weight decay 0.05, 300 epochs,
random-resized crop + flip, mixup 0.8 / cutmix 1.0, label smoothing 0.1.
Sparse: all four mixing linears of every block (head dense), compute-fraction allocation.
"""

from configs import common, imagenet_vit_b


def get_config():
  c = imagenet_vit_b.get_config()
  c.model = common.model("mixer", variant="S", patch_size=16, dropout=0.0)
  c.sparse_layers = ("token_mlp_in", "token_mlp_out", "channel_mlp_in", "channel_mlp_out")
  return c
