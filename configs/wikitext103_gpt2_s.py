"""GPT-2 small (124M) on WikiText-103 at 90% sparsity (paper: dense ppl 22.21, DynaDiag 56.33).

Appendix C: AdamW lr 6e-4, batch 512 x 1024 tokens. The rest follows the GPT-2 /
nanoGPT recipe that sparse-GPT-2-on-WikiText work uses: betas (0.9, 0.95), weight decay
0.1, grad-norm clip 1.0, 1 warmup epoch (~220 steps) then cosine to 6e-5, 100 epochs
(~22k steps of 0.5M tokens), GPT-2 BPE tokenizer (vocab 50257), dropout 0.1.
Sparse: qkv, attention output and both MLP linears (embeddings / tied head dense),
compute-fraction allocation.
Data: the raw WikiText-103 files and GPT-2's vocab.json / merges.txt (see dynadiag_jax.data).
"""

from configs import common


def get_config():
  c = common.base()
  c.data.update(name="wikitext103", tokenizer="gpt2", seq_len=1024)
  c.model = common.model("gpt2", size="small", dropout=0.1)
  c.sparsity = 0.9
  c.sparse_layers = ("qkv", "attn_out", "mlp_in", "mlp_out")
  c.allocation = "compute_fraction"
  c.batch_size = 512
  c.num_epochs = 100.0
  c.optimizer.update(lr=6e-4, b2=0.95, weight_decay=0.1, warmup_epochs=1.0, end_lr_fraction=0.1,
                     grad_clip=1.0)
  c.eval_batch_size = 64
  c.eval_every = 2000
  c.log_every = 50
  c.checkpoint.every = 1000
  return c
