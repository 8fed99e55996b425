"""Every field a run reads, with defaults; each configs/<name>.py starts from `base()`.

Override any field on the command line: --config.sparsity=0.8 --config.model.depth=6
--config.data.data_dir=/data. Every field has a type, also those left unset (None, typed
placeholders), so every field can be overridden (tests/test_configs.py checks all of them).
"""

import dataclasses
import typing
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from dynadiag_jax import data, models
from dynadiag_jax import recipe as recipe_lib

# Types of fields whose default is None ('the data set's / model's default').
TYPES = {
    "data_dir": str, "image_size": int, "crop": str, "pad": int, "flip": bool, "scale": tuple,
    "ratio": tuple, "mixup_alpha": float, "cutmix_alpha": float, "switch_prob": float,
    "mix_prob": float, "vocab_dir": str, "text_dir": str, "eval_split": str, "workers": int,
    "dtype": str, "num_classes": int, "vocab_size": int,
}
OUTPUTS = ("num_classes", "vocab_size")  # taken from the data unless set


def typed(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """c with every None field a typed placeholder (TYPES; unknown names take any literal)."""
  for k in list(c.keys()):
    v = c[k]
    if isinstance(v, ml_collections.ConfigDict):
      typed(v)
    elif v is None and not isinstance(c._fields[k], ml_collections.FieldReference):  # pylint: disable=protected-access
      c[k] = placeholder(TYPES.get(k, object))
  return c


def _hint_type(hint: Any) -> type:
  """int for `int | None`, str for `Any` (dtype names), tuple for Sequence[int]."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  t = args[0] if args else hint
  if t is Any:
    return str
  return typing.get_origin(t) or t


def model(name: str, **fields) -> ml_collections.ConfigDict:
  """Config of models.build(name): every field of the model, its default, `fields` set.

  Fields left None (sizes from `variant` / `size`, dtype, the output size from the data)
  are typed placeholders, so e.g. --config.model.width=64 works for every config.
  """
  cls = models.MODELS[name]
  hints = typing.get_type_hints(cls)
  c = ml_collections.ConfigDict({"name": name})
  for f in dataclasses.fields(cls):
    if f.name in ("parent", "name", "linear"):
      continue
    default = None if f.name in OUTPUTS else f.default
    if default is None:
      t = _hint_type(hints[f.name])
      c[f.name] = placeholder(tuple if t in (list, typing.Sequence) else t)
    else:
      c[f.name] = tuple(default) if isinstance(default, list) else default
  for k, v in fields.items():
    if k not in c:
      raise ValueError(f"model {name!r} has no field {k!r}; fields: {sorted(c)}")
    c[k] = v
  return c


def recipe(name: str = "default") -> ml_collections.ConfigDict:
  """config.recipe: a named recipe (`recipe_lib.RECIPES`) and each of its fields, unset (None:
  the named recipe's value) or set to override it: --config.recipe.name=paper,
  --config.recipe.t_end=0.5. Fields come from `Recipe` itself, so a new knob needs no edit here.
  """
  hints = typing.get_type_hints(recipe_lib.Recipe)
  c = ml_collections.ConfigDict({"name": name})
  for f in recipe_lib.fields():
    c[f] = placeholder(_hint_type(hints[f]))
  ehints = typing.get_type_hints(recipe_lib.Experimental)
  c.experimental = ml_collections.ConfigDict(  # research options, off by default
      {f.name: placeholder(typing.get_origin(ehints[f.name]) or ehints[f.name])
       for f in dataclasses.fields(recipe_lib.Experimental)})
  return c


def dtype() -> ml_collections.FieldReference:
  """A model's compute dtype field: None (float32), settable as --config.model.dtype=bfloat16."""
  return placeholder(str)


def base() -> ml_collections.ConfigDict:
  """Defaults: a sparse (DiagDense) run, AdamW with cosine decay, checkpoints every 1000 steps."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, dropout and data order
  c.data = typed(data.default_config())  # see dynadiag_jax.data.default_config
  c.model = ml_collections.ConfigDict({"name": "mlp"})  # configs set c.model = model(name, ...)

  # Sparsity: which layers are DiagDense, how sparse, how the budget is spread.
  c.sparse = True  # False: the all-dense baseline (nn.Dense everywhere)
  c.sparsity = 0.9  # global share of zeros over the sparse layers
  c.sparse_layers = ()  # role names; () = the paper's default (models.sparse_roles)
  c.allocation = "compute_fraction"  # 'uniform' | 'erk' | 'compute_fraction'
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
  c.static_patterns = ""  # static_diag: a run's patterns.json to freeze on (else random K)
  c.recipe = recipe()  # how DynaDiag learns its diagonals (dynadiag_jax.recipe)

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
  c.num_devices = 0  # local devices to use; 0 = all
  c.parallel = "pmap"  # 'pmap' | 'mesh': jax.jit over a (data, fsdp) mesh (docs/SHARDING.md)
  c.mesh = ml_collections.ConfigDict({  # parallel='mesh' only
      "data": -1,  # batch-only axis size; -1 = all the devices fsdp leaves
      "fsdp": 1,  # params / optimizer state split along this axis (the batch too)
      "fsdp_min_size": 2**14,  # smaller leaves (and vectors) stay replicated
  })
  c.distributed = False  # multi-host: jax.distributed.initialize (dynadiag_jax.train.distributed)
  c.cluster = ml_collections.ConfigDict({  # used when distributed; unset -> DYNADIAG_* env vars
      "coordinator_address": "",  # process 0's host:port; '' and no env: jax's cluster detection
      "num_processes": 0,  # 0: $DYNADIAG_NUM_PROCESSES
      "process_id": -1,  # -1: $DYNADIAG_PROCESS_ID
      "heartbeat_timeout_s": 100,  # jax aborts after this; our watchdog says why at half of it
      "initialization_timeout_s": 300,
  })
  c.eval_batch_size = 500
  c.eval_every = 0  # steps; 0 = only at the end
  c.log_every = 50
  c.progress_bar = True
  c.fast_compile = False  # XLA's cheap CPU passes: ~2x faster compiles, slower steps (single-process runs)
  c.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 3, "async_save": True})
  return c
