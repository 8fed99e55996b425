"""GPT-2 of width 256 (4 layers, 4 heads, MLP 1024) on CPython's pydoc text, byte tokens (offline).

The wide twin of text_gpt2_tiny, for block patterns: its sparse layers (qkv 256x768,
attn_out 256x256, mlp_in 256x1024, mlp_out 1024x256) have the shapes of mnist_vit_wide,
so the P / D / K table in configs/mnist_vit_wide.py holds here too (attn_out keeps
P >= 12 block-diagonals only up to b = 16). 90% sparse (compute fraction), context 64,
batch 16 x 64 tokens (as many rows per step as mnist_vit_wide's 64 x 17), AdamW lr 1e-3,
betas (0.9, 0.95), weight decay 0.1, clip 1.0, 30 warmup steps then cosine to 1e-4,
600 steps (0.6M tokens, about one pass over the training text). Not tuned; see
docs/RESULTS.md (the wide tasks) for its cost. Longer runs: --config.total_steps.
"""

from configs import text_gpt2_tiny


def get_config():
  c = text_gpt2_tiny.get_config()  # same data, sparse layers, allocation, optimizer shape
  c.data.seq_len = 64
  c.model.update(width=256, num_layers=4, num_heads=4, context=64)
  c.optimizer.lr = 1e-3
  c.eval_every = 0
  c.log_every = 50
  return c
