"""ViT-B/16 on ImageNet-1k at 90% sparsity, DeiT-style (the paper's speed-up model).

Appendix C / DeiT: AdamW lr 1e-3 at batch 1024 (5e-4 x 1024 / 512), 5 warmup epochs,
cosine to 1e-5, weight decay 0.05, 300 epochs, 224x224 random-resized crop + flip, mixup
0.8 + cutmix 1.0 (switch 0.5), label smoothing 0.1. Not implemented here (DeiT also uses
them): RandAugment, random erasing, repeated augmentation, stochastic depth.
Sparse: attention output and MLP linears (qkv and head dense), compute-fraction allocation.
Data: tfds 'imagenet2012' as array_record (manual download; see dynadiag_jax.data).
"""

from configs import common


def get_config():
  c = common.base()
  c.data.update(name="imagenet2012", image_size=224, crop="random_resized_crop", flip=True,
                mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  c.model = common.model("vit", variant="B", patch_size=16, pool="tok", dropout=0.0)
  c.sparsity = 0.9
  c.sparse_layers = ("attn_out", "mlp_in", "mlp_out")
  c.allocation = "compute_fraction"
  c.batch_size = 1024
  c.num_epochs = 300.0
  c.label_smoothing = 0.1
  c.optimizer.update(lr=1e-3, weight_decay=0.05, warmup_epochs=5.0, end_lr_fraction=0.01)
  c.eval_batch_size = 1024
  c.eval_every = 12510  # ~10 epochs
  c.log_every = 100
  c.checkpoint.every = 2500
  return c
