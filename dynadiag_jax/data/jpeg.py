"""Encoded image -> cropped uint8 example, in one pass: the per-example work of ImageNet loading.

Decoding is libjpeg-turbo through `simplejpeg` (PIL for anything it refuses: PNG, CMYK, broken
files); the crop is a slice of the decoded array, resized with OpenCV's bilinear (INTER_LINEAR,
as TF's default tf.image.resize in ImageNet pipelines) or, when shrinking by more than 2x, where
bilinear would skip pixels, INTER_AREA. Both release the GIL. The crop boxes come from
`augment.rrc_box` / `augment.center_box`, so the random choices equal those of the numpy path
(`augment.train_transform`) for the same Generator.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from dynadiag_jax.data import augment as aug

cv2.setNumThreads(1)  # parallelism comes from worker processes, not OpenCV's own threads


def size(data: bytes) -> tuple[int, int]:
  """(height, width) from the header, without decoding."""
  try:
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    return h, w
  except ValueError:
    with Image.open(io.BytesIO(data)) as img:
      return img.height, img.width


def decode(data: bytes) -> np.ndarray:
  """uint8 (H, W, 3) RGB."""
  try:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")
  except ValueError:  # not a baseline/progressive RGB or greyscale JPEG
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert("RGB"))


def crop_resize(x_HxWxC: np.ndarray, box: tuple[float, float, float, float],
                out: int) -> np.ndarray:
  """The box (left, top, right, bottom), rounded to whole pixels, resized to (out, out)."""
  h, w = x_HxWxC.shape[:2]
  l, t, r, b = (int(round(v)) for v in box)
  l, t = min(max(l, 0), w - 1), min(max(t, 0), h - 1)
  r, b = max(min(r, w), l + 1), max(min(b, h), t + 1)
  c = x_HxWxC[t:b, l:r]
  if c.shape[:2] == (out, out):
    return np.ascontiguousarray(c)
  shrink = min(c.shape[0], c.shape[1]) / out
  interp = cv2.INTER_AREA if shrink > 2.0 else cv2.INTER_LINEAR
  y = cv2.resize(c, (out, out), interpolation=interp)
  return y if y.ndim == 3 else y[..., None]


def example(data: bytes, out: int, rng: np.random.Generator | None = None,
            cfg: aug.AugmentConfig | None = None, crop_frac: float = 1.0) -> np.ndarray:
  """One encoded image -> uint8 (out, out, 3): training crop + flip with rng, else central crop.

  Training supports cfg.crop 'random_resized_crop' (rrc_box) and 'none' (the central crop);
  pad_crop is for small in-memory sets (augment.train_transform).
  """
  x = decode(data)
  h, w = x.shape[:2]
  if rng is None or cfg is None:
    return crop_resize(x, aug.center_box(h, w, crop_frac), out)
  if cfg.crop == "random_resized_crop":
    y = crop_resize(x, aug.rrc_box(rng, h, w, cfg.scale, cfg.ratio), out)
  elif cfg.crop == "none":
    y = crop_resize(x, aug.center_box(h, w, crop_frac), out)
  else:
    raise ValueError(f"crop {cfg.crop!r} is not supported on encoded images; use "
                     "'random_resized_crop' or 'none'")
  if cfg.flip and rng.random() < 0.5:
    y = y[:, ::-1]
  return np.ascontiguousarray(y)
