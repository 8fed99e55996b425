"""Tiny GPT-2 (4 layers, width 128) on CPython's pydoc text, byte tokens (offline; perplexity).

90% sparse qkv / attention output / MLP linears (compute fraction), context 128, batch
16 x 128 tokens, AdamW lr 2e-3 (small model), betas (0.9, 0.95), weight decay 0.1,
clip 1.0, 30 warmup steps then cosine to 2e-4, 600 steps (1.2M tokens, ~2 passes over the
0.6 MB training text): a few minutes on 2 CPU cores. Longer runs: --config.total_steps.
"""

from configs import common


def get_config():
  c = common.base()
  c.data.update(name="pydoc", tokenizer="bytes", seq_len=128)
  c.model = common.model("gpt2", size="tiny", dropout=0.0)
  c.sparsity = 0.9
  c.sparse_layers = ("qkv", "attn_out", "mlp_in", "mlp_out")
  c.allocation = "compute_fraction"
  c.batch_size = 16
  c.total_steps = 600
  c.optimizer.update(lr=2e-3, b2=0.95, weight_decay=0.1, warmup_steps=30, end_lr_fraction=0.1,
                     grad_clip=1.0)
  c.eval_batch_size = 64
  c.eval_every = 200
  c.log_every = 20
  c.checkpoint.every = 200
  return c
