"""ViT on MNIST-5k (offline): patch 7 (16 tokens + class token), width 64, 2 blocks, 2 heads.

90% sparse attention (qkv, attn_out) and MLP-block (mlp_in, mlp_out) linears (compute
fraction), embedding and head dense. AdamW lr 2e-3, 50 warmup steps then cosine, weight
decay 0.05, 1000 steps of batch 128 (32 epochs of the 4000 training images): about a
minute on 2 free CPU cores.
"""

from configs import common


def get_config():
  c = common.base()
  c.data.name = "mnist5k"
  c.model = common.model("vit", variant="Ti", patch_size=7, pool="tok", width=64, depth=2,
                         num_heads=2, mlp_dim=128, dropout=0.0)
  c.sparsity = 0.9
  c.sparse_layers = ("qkv", "attn_out", "mlp_in", "mlp_out")
  c.allocation = "compute_fraction"
  c.batch_size = 128
  c.total_steps = 1000
  c.optimizer.update(lr=2e-3, weight_decay=0.05, warmup_steps=50, grad_clip=1.0)
  c.eval_every = 0
  c.log_every = 50
  c.checkpoint.every = 500
  return c
