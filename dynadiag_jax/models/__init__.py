"""Models (MLP, ViT, MLP-Mixer, GPT-2), every linear layer built by a `LayerFactory`."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.models.attention import SPLIT_ROLES
from dynadiag_jax.models.gpt2 import GPT2
from dynadiag_jax.models.mixer import Mixer
from dynadiag_jax.models.mlp import MLP, hidden_roles
from dynadiag_jax.models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "vit": ViT, "mixer": Mixer, "gpt2": GPT2}

# Every linear role of each model (MLP: its 'fc*' roles depend on depth, see `linear_roles`).
LINEAR_ROLES: dict[str, tuple[str, ...]] = {
    "vit": ("qkv", "attn_out", "mlp_in", "mlp_out", "head"),
    "mixer": ("token_mlp_in", "token_mlp_out", "channel_mlp_in", "channel_mlp_out", "head"),
    "gpt2": ("qkv", "attn_out", "mlp_in", "mlp_out"),  # LM head is the tied embedding
}

# The paper's default sparse roles: ViT all linears but qkv and head; Mixer all mixing
# layers; GPT-2 attention and MLP. MLP: all hidden layers (see `sparse_roles`).
SPARSE_ROLES: dict[str, tuple[str, ...]] = {
    "vit": ("attn_out", "mlp_in", "mlp_out"),
    "mixer": ("token_mlp_in", "token_mlp_out", "channel_mlp_in", "channel_mlp_out"),
    "gpt2": ("qkv", "attn_out", "mlp_in", "mlp_out"),
}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  return cfg[key] if key in cfg else default


def _mlp_hidden(cfg: Any) -> tuple[int, ...]:
  return tuple(_get(cfg, "hidden", MLP.hidden))


def linear_roles(cfg: Any) -> tuple[str, ...]:
  """Every role name a model of `cfg` passes to its factory."""
  if cfg["name"] == "mlp":
    return hidden_roles(_mlp_hidden(cfg)) + ("head",)
  return split_roles(cfg, LINEAR_ROLES[cfg["name"]])


def split_roles(cfg: Any, roles: tuple[str, ...]) -> tuple[str, ...]:
  """`roles` with 'qkv' read as 'q', 'k', 'v' when the model of `cfg` splits the projections."""
  if not _get(cfg, "split_qkv", False):
    return tuple(roles)
  return tuple(r for role in roles for r in (SPLIT_ROLES if role == "qkv" else (role,)))


def sparse_roles(cfg: Any) -> tuple[str, ...]:
  """The roles the paper makes sparse for the model of `cfg` (a ConfigDict or mapping with 'name')."""
  name = cfg["name"]
  if name == "mlp":
    return hidden_roles(_mlp_hidden(cfg))
  if name not in SPARSE_ROLES:
    raise ValueError(f"unknown model {name!r}; one of {sorted(MODELS)}")
  return split_roles(cfg, SPARSE_ROLES[name])


def _field(key: str, v: Any) -> Any:
  if key == "dtype" and isinstance(v, str):
    return jnp.dtype(v)
  return tuple(v) if isinstance(v, list) else v


def build(cfg: Any, linear: LayerFactory = LayerFactory()) -> nn.Module:
  """The model `cfg.name` with the other fields of `cfg` as its attributes, linears from `linear`."""
  kw = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
  name = kw.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; one of {sorted(MODELS)}")
  cls = MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "linear"}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"{name}: unknown fields {unknown}; allowed {sorted(fields)}")
  return cls(linear=linear, **{k: _field(k, v) for k, v in kw.items()})


__all__ = ["GPT2", "MLP", "MODELS", "Mixer", "SPARSE_ROLES", "LINEAR_ROLES", "ViT", "build",
           "linear_roles", "sparse_roles", "split_roles"]
