"""Every field a run reads, with defaults; each configs/<name>.py starts from `base()`.

Override any field on the command line: --config.sparsity=0.8 --config.model.depth=6.
"""

import ml_collections

from dynadiag_jax import data


def dtype() -> ml_collections.FieldReference:
  """A model's compute dtype field: None (float32), settable as --config.model.dtype=bfloat16."""
  return ml_collections.config_dict.placeholder(str)


def base() -> ml_collections.ConfigDict:
  """Defaults: a sparse (DiagDense) run, AdamW with cosine decay, checkpoints every 1000 steps."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, dropout and data order
  c.data = data.default_config()  # see dynadiag_jax.data.default_config
  c.model = ml_collections.ConfigDict({"name": "mlp"})  # fields of dynadiag_jax.models.build

  # Sparsity: which layers are DiagDense, how sparse, how the budget is spread.
  c.sparse = True  # False: the all-dense baseline (nn.Dense everywhere)
  c.sparsity = 0.9  # global share of zeros over the sparse layers
  c.sparse_layers = ()  # role names; () = the paper's default (models.sparse_roles)
  c.allocation = "compute_fraction"  # 'uniform' | 'erk' | 'compute_fraction'
  c.block = 1  # b x b block-diagonals; each layer takes the largest valid b up to this
  c.backend = "auto"  # diag_matmul backend: 'auto' | 'dense' | 'xla' | 'pallas'
  c.kernel = ml_collections.ConfigDict({  # backend settings (dynadiag_jax.ops.KernelConfig)
      "bcsr_block": 16,  # pallas: BCSR block of block-1 patterns (power of two >= 16)
      "batch_tile": 0,  # rows per kernel program; 0 = automatic
      "cluster": False,  # reorder rows / columns of frozen layouts for fuller blocks
  })
  c.method = "dynadiag"  # dense | dynadiag | static_diag | diagheur | diagrigl | rigl | set | gmp | nm
  c.masks = ml_collections.ConfigDict({  # mask methods (dynadiag_jax.methods)
      "every": 100,  # steps between mask updates
      "drop_fraction": 0.3,  # RigL / SET / N:M / diagheur: share replaced, cosine decay
      "end_fraction": 0.75,  # masks fixed from this share of training (GMP: target reached)
      "gmp_start_fraction": 0.0,  # GMP: pruning starts here
      "group": 0,  # nm: M consecutive inputs per group (0: all inputs, constant fan-in)
  })
  c.l1 = 0.0  # l1 penalty on alpha
  c.schedule = ml_collections.ConfigDict({
      "freeze_fraction": 0.3,  # exploration share of training, then freeze
      "t_start": 5.0, "t_end": 0.05,  # cosine temperature of the soft top-k
      "k_start_fraction": 1.0,  # K_active starts at this share of P (cosine down to K)
      "num_levels": 5,  # K_active levels (one compile each)
  })

  # Optimisation.
  c.batch_size = 128  # global: per-device x devices x hosts
  c.total_steps = 0  # > 0 wins over num_epochs
  c.num_epochs = 0.0
  c.label_smoothing = 0.0
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
      "weight_decay": 0.05,  # decoupled; not on alpha, biases or norms
      "schedule": "cosine",  # 'cosine' | 'linear' | 'constant' after warmup
      "warmup_steps": 0, "warmup_epochs": 0.0,  # added together
      "end_lr_fraction": 0.0,  # final lr = lr x this
      "grad_clip": 0.0,  # global-norm clip; 0 = off
  })

  # Running.
  c.num_devices = 0  # local devices for pmap; 0 = all
  c.distributed = False  # jax.distributed.initialize() for multi-host runs
  c.eval_batch_size = 500
  c.eval_every = 0  # steps; 0 = only at the end
  c.log_every = 50
  c.progress_bar = True
  c.fast_compile = False  # XLA's cheap CPU passes: ~2x faster compiles, slower steps
  c.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 3, "async_save": True})
  return c
