"""On the accelerator: uint8 batches -> normalized float32, mixup / cutmix applied (jittable).

The host sends uint8 images (a quarter of float32's bytes), int labels and, when mixing, the
numbers `augment.mix_params` drew for each pair (`mix_box`, `mix_weight`); `preprocess` does
the per-pixel work inside jit / pmap. `augment.apply_mix` is the same arithmetic in numpy.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

Batch = dict


def normalize(x_BxHxWxC: jnp.ndarray, mean: np.ndarray, std: np.ndarray) -> jnp.ndarray:
  """uint8 -> float32 (x - mean) / std, per channel (mean, std on the 0..255 scale)."""
  return (x_BxHxWxC.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32)


def partner(b: int) -> np.ndarray:
  """Each example's pair partner: 1, 0, 3, 2, ... (an odd last example: itself)."""
  p = np.arange(b) ^ 1
  return np.where(p < b, p, np.arange(b))


def mix(x_BxHxWxC: jnp.ndarray, y_B: jnp.ndarray, num_classes: int, box_Bx4: jnp.ndarray,
        weight_Bx2: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Pairs (0, 1), (2, 3), ... mixed: m * x + (1 - m) * x[partner], m = weight[:, 0] in the box, 1 out."""
  b, h, w = x_BxHxWxC.shape[:3]
  p = partner(b)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  t, bt, l, r = (box_Bx4[:, i, None, None] for i in range(4))
  inside = (rows >= t) & (rows < bt) & (cols >= l) & (cols < r)
  m = jnp.where(inside, weight_Bx2[:, 0, None, None], 1.0)[..., None].astype(x_BxHxWxC.dtype)
  x = m * x_BxHxWxC + (1 - m) * x_BxHxWxC[p]
  y = jnp.eye(num_classes, dtype=jnp.float32)[y_B]
  lam = weight_Bx2[:, 1, None]
  return x, lam * y + (1 - lam) * y[p]


def preprocess(source) -> Callable[[Batch], Batch]:
  """fn(batch) -> batch for one device's (b, ...) part of a raw batch: identity for text."""
  if getattr(source, "kind", None) != "image":
    return lambda batch: batch
  mean, std, c = np.asarray(source.mean), np.asarray(source.std), source.num_classes

  def fn(batch: Batch) -> Batch:
    out = dict(batch)
    x = batch["image"]
    if x.dtype == jnp.uint8:
      x = normalize(x, mean, std)
    out["image"] = x
    if "mix_box" in batch:
      out["image"], out["label"] = mix(x, batch["label"], c, out.pop("mix_box"),
                                       out.pop("mix_weight"))
    return out

  return fn
