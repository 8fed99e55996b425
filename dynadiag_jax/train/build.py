"""From a config to the pieces of a run: data spec, model, schedule, optimizer, step counts."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import ml_collections
import numpy as np
import optax

import dynadiag_jax as dd
from dynadiag_jax import methods, models


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the model and the step need to know of the data (no data needed to build it)."""
  kind: str  # 'image' | 'text'
  input_shape: tuple[int, ...]  # one example: (H, W, C) or (seq_len,)
  num_outputs: int  # classes or vocabulary size
  num_train: int = 0
  num_test: int = 0

  def __post_init__(self):
    if self.kind not in ("image", "text"):
      raise ValueError(f"data kind must be 'image' or 'text', got {self.kind!r}")

  @classmethod
  def of(cls, source) -> "DataSpec":
    """The spec of a `dynadiag_jax.data` source."""
    n = source.num_classes if source.kind == "image" else source.vocab_size
    return cls(source.kind, tuple(source.input_shape), int(n), int(source.num_train),
               int(source.num_test))

  def dummy_input(self, batch: int = 1) -> np.ndarray:
    """Zeros shaped like `batch` model inputs (float32 images or int32 tokens)."""
    dtype = np.float32 if self.kind == "image" else np.int32
    return np.zeros((batch, *self.input_shape), dtype)


def model_config(config: ml_collections.ConfigDict, spec: DataSpec) -> ml_collections.ConfigDict:
  """config.model with its output size (num_classes or vocab_size) taken from the data."""
  cfg = ml_collections.ConfigDict(config.model.to_dict())
  key = "vocab_size" if cfg.name == "gpt2" else "num_classes"
  if (spec.kind == "text") != (cfg.name == "gpt2"):
    raise ValueError(f"model {cfg.name!r} does not fit {spec.kind} data; "
                     "gpt2 takes text, mlp/vit/mixer take images")
  have = cfg.get(key)
  if have is not None and int(have) != spec.num_outputs:
    raise ValueError(f"config.model.{key} = {have} but the data has {spec.num_outputs}; "
                     f"leave config.model.{key} unset to take it from the data")
  cfg[key] = spec.num_outputs
  return cfg


def sparse_layers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Layer roles made DiagDense: config.sparse_layers, or the paper's default when empty."""
  if not config.sparse or methods.name(config) == "dense":
    return ()
  names = tuple(config.get("sparse_layers") or ())
  return models.split_roles(config.model, names) or tuple(models.sparse_roles(config.model))


def layer_sparsity(config: ml_collections.ConfigDict, spec: DataSpec) -> dict[str, float]:
  """{role: sparsity} from the global config.sparsity and config.allocation."""
  names = sparse_layers(config)
  if not names:
    return {}
  dense = models.build(model_config(config, spec), dd.LayerFactory())
  calls = dd.linear_calls(dense, None, spec.dummy_input())
  return dd.allocation.allocate(calls, config.sparsity, names, config.allocation)


def kernel_config(config: ml_collections.ConfigDict) -> dd.ops.KernelConfig:
  """config.kernel as the static settings value the backends take."""
  k = config.kernel
  return dd.ops.KernelConfig(bcsr_block=int(k.bcsr_block), batch_tile=int(k.batch_tile) or None,
                             cluster=bool(k.cluster))


def configure_backend(config: ml_collections.ConfigDict) -> str:
  """Checks config.backend and config.kernel; returns the backend name ('auto' stays 'auto')."""
  kernel_config(config)
  return dd.ops.check_backend_name(config.backend)


def build_recipe(config: ml_collections.ConfigDict) -> dd.Recipe:
  """config.recipe as a `Recipe`: the named one with every field that is set overriding it."""
  rc = config.recipe
  base = dd.recipe.get(rc.name)
  kw = {f: rc[f] for f in dd.recipe.fields() if rc.get(f) is not None}
  ex = {k: v for k, v in rc.get("experimental", {}).items() if v is not None}
  hold = tuple(ex.get("hold", base.experimental.hold))
  unknown = sorted(set(hold) - set(sparse_layers(config)))
  if unknown:
    raise ValueError(f"config.recipe.experimental.hold names {unknown}, which are not sparse "
                     f"layers of this run; its sparse layers are {list(sparse_layers(config))}")
  exp = dataclasses.replace(base.experimental, **{**ex, "hold": hold})
  return base.replace(**kw, experimental=exp)


def build_model(config: ml_collections.ConfigDict,
                spec: DataSpec) -> tuple[nn.Module, dict[str, float]]:
  """(model, {role: sparsity}): config.model with its sparse layers as DiagDense."""
  configure_backend(config)
  sp = layer_sparsity(config, spec)
  diag = sp if methods.diag_dense(config) else {}  # mask methods: nn.Dense, masked by tx
  factory = dd.LayerFactory.from_dict(diag, backend=config.backend,
                                      kernel_config=kernel_config(config),
                                      recipe=build_recipe(config))
  return models.build(model_config(config, spec), factory), sp


def steps_per_epoch(config: ml_collections.ConfigDict, spec: DataSpec) -> float:
  """Training examples over the global batch (0 when the data size is unknown)."""
  return spec.num_train / config.batch_size if spec.num_train else 0.0


def total_steps(config: ml_collections.ConfigDict, spec: DataSpec) -> int:
  """config.total_steps if > 0, else ceil(config.num_epochs x steps per epoch)."""
  if config.total_steps > 0:
    return int(config.total_steps)
  spe = steps_per_epoch(config, spec)
  if config.num_epochs <= 0 or spe <= 0:
    raise ValueError("set config.total_steps > 0, or config.num_epochs > 0 with known data size; "
                     f"got total_steps={config.total_steps}, num_epochs={config.num_epochs}")
  return int(math.ceil(config.num_epochs * spe))


def build_schedule(config: ml_collections.ConfigDict, steps: int) -> dd.Schedule:
  """The recipe's temperature / K_active / freeze schedule over `steps` steps."""
  return build_recipe(config).schedule(steps)


def learning_rate(config: ml_collections.ConfigDict, steps: int,
                  spe: float = 0.0) -> optax.Schedule:
  """Linear warmup (warmup_steps + warmup_epochs x spe) then cosine / linear / constant."""
  o = config.optimizer
  warm = int(o.warmup_steps + round(o.warmup_epochs * spe))
  if warm >= steps:
    raise ValueError(
        f"{warm} warmup steps (config.optimizer.warmup_steps {o.warmup_steps} + warmup_epochs "
        f"{o.warmup_epochs} x {spe:.1f} steps per epoch) do not fit in {steps} training steps; "
        "lower them or raise config.total_steps")
  end = o.lr * o.end_lr_fraction
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(o.lr, steps - warm, alpha=o.end_lr_fraction)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(o.lr, end, steps - warm)
  elif o.schedule == "constant":
    decay = optax.constant_schedule(o.lr)
  else:
    raise ValueError(f"unknown optimizer.schedule {o.schedule!r}; 'cosine' | 'linear' | 'constant'")
  if not warm:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), decay], [warm])


def build_optimizer(config: ml_collections.ConfigDict, steps: int, sched: dd.Schedule | None,
                    spe: float = 0.0) -> optax.GradientTransformation:
  """AdamW (decay off alpha, biases and norms) with clipping, and the recipe's alpha terms."""
  o = config.optimizer
  if o.name != "adamw":
    raise ValueError(f"unknown optimizer {o.name!r}; only 'adamw'")
  lr = learning_rate(config, steps, spe)
  tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   mask=dd.optim.decay_mask)
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  if sched is None:
    return tx
  return dd.optim.wrap(tx, build_recipe(config))


def input_key(spec: DataSpec) -> tuple[str, str]:
  """(input, target) keys of a batch of this kind of data."""
  return ("image", "label") if spec.kind == "image" else ("inputs", "targets")
