"""ViT-S/4 on CIFAR-10 at 90% sparsity (paper: dense 89.67, DynaDiag 87.09 at 90%).

Appendix C recipe for ViT on CIFAR: AdamW lr 1e-3, 10 warmup epochs then cosine to 1e-5,
weight decay 0.05, batch 256, 300 epochs, patch 4 on 32x32 images (64 tokens + class
token), label smoothing 0.1, pad-4 random crop + horizontal flip, grad-norm clip 1.0.
Sparse: attention output and both MLP linears of every block (qkv and head stay dense),
per-layer sparsity by compute fraction (the paper's best allocation).
Data: tfds 'cifar10' prepared as array_record in data_dir (see dynadiag_jax.data).
"""

from configs import common


def get_config():
  c = common.base()
  c.data.name = "cifar10"
  c.model = common.model("vit", variant="S", patch_size=4, pool="tok", dropout=0.0)
  c.sparsity = 0.9
  c.sparse_layers = ("attn_out", "mlp_in", "mlp_out")
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
