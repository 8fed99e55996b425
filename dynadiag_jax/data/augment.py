"""Host-side (numpy) image augmentation; every random choice comes from an explicit Generator.

Per-example transforms take one uint8 image x_HxWxC and a `np.random.Generator`; the batch
mixers (mixup, cutmix) take float images and integer labels and return soft labels. Given the
same generators, every function returns the same result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

CROPS = ("none", "pad_crop", "random_resized_crop")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation; the default does nothing."""

  crop: str = "none"  # one of CROPS
  pad: int = 4  # pad_crop: zero padding on each side
  scale: tuple[float, float] = (0.08, 1.0)  # random_resized_crop: area fraction
  ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random_resized_crop: aspect ratio w/h
  flip: bool = False  # random horizontal flip, p = 0.5
  mixup_alpha: float = 0.0  # > 0 enables mixup, lam ~ Beta(alpha, alpha)
  cutmix_alpha: float = 0.0  # > 0 enables cutmix
  switch_prob: float = 0.5  # both enabled: probability of cutmix for a pair
  mix_prob: float = 1.0  # probability that a pair is mixed at all

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")

  @property
  def mixes(self) -> bool:
    """Whether mixup or cutmix is on (labels become soft)."""
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _pil(x_HxWxC: np.ndarray) -> Image.Image:
  """uint8 (H, W, 1|3) -> PIL image."""
  return Image.fromarray(x_HxWxC[..., 0] if x_HxWxC.shape[-1] == 1 else x_HxWxC)


def _np(img: Image.Image, c: int) -> np.ndarray:
  """PIL image -> uint8 (H, W, c)."""
  x = np.asarray(img, dtype=np.uint8)
  return x[..., None] if c == 1 else x


def resize(x_HxWxC: np.ndarray, size: tuple[int, int],
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Bilinear (antialiased) resize of x, or of its box (left, top, right, bottom), to size (h, w)."""
  h, w = size
  if box is None and x_HxWxC.shape[:2] == (h, w):
    return x_HxWxC
  img = _pil(x_HxWxC).resize((w, h), Image.BILINEAR, box=box)
  return _np(img, x_HxWxC.shape[-1])


def center_crop_resize(x_HxWxC: np.ndarray, size: int, crop_frac: float = 1.0) -> np.ndarray:
  """Eval transform: the central square of side crop_frac * min(H, W), resized to (size, size)."""
  h, w = x_HxWxC.shape[:2]
  if crop_frac >= 1.0 and h == w:
    return resize(x_HxWxC, (size, size))
  return resize(x_HxWxC, (size, size), box=center_box(h, w, crop_frac))


def center_box(h: int, w: int, crop_frac: float = 1.0) -> tuple[float, float, float, float]:
  """(left, top, right, bottom) of the central square of side crop_frac * min(h, w)."""
  s = crop_frac * min(h, w)
  top, left = (h - s) / 2, (w - s) / 2
  return (left, top, left + s, top + s)


def rrc_box(rng: np.random.Generator, h: int, w: int, scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Inception-style crop box (left, top, right, bottom): torchvision's 10 tries, then central."""
  area = h * w
  log_r = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    r = math.exp(rng.uniform(*log_r))
    cw, ch = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      return (left, top, left + cw, top + ch)
  r_in = w / h  # fallback: the whole image, clipped to the ratio range
  if r_in < min(ratio):
    cw, ch = w, int(round(w / min(ratio)))
  elif r_in > max(ratio):
    cw, ch = int(round(h * max(ratio))), h
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return (left, top, left + cw, top + ch)


def random_resized_crop(x_HxWxC: np.ndarray, rng: np.random.Generator, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop (`rrc_box`), resized to (size, size)."""
  h, w = x_HxWxC.shape[:2]
  return resize(x_HxWxC, (size, size), box=rrc_box(rng, h, w, scale, ratio))


def pad_crop(x_HxWxC: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Zero-pad by `pad` on each side, then crop a random window of the original size."""
  if pad <= 0:
    return x_HxWxC
  h, w = x_HxWxC.shape[:2]
  xp = np.pad(x_HxWxC, ((pad, pad), (pad, pad), (0, 0)))
  top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
  return xp[top:top + h, left:left + w]


def flip(x_HxWxC: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Horizontal flip with probability p."""
  return x_HxWxC[:, ::-1] if rng.random() < p else x_HxWxC


def train_transform(x_HxWxC: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
                    size: int, crop_frac: float = 1.0) -> np.ndarray:
  """One training example: crop per cfg (to size x size), then maybe flip; uint8 out."""
  if cfg.crop == "random_resized_crop":
    x = random_resized_crop(x_HxWxC, rng, size, cfg.scale, cfg.ratio)
  else:
    x = center_crop_resize(x_HxWxC, size, crop_frac)
    if cfg.crop == "pad_crop":
      x = pad_crop(x, rng, cfg.pad)
  if cfg.flip:
    x = flip(x, rng)
  return np.ascontiguousarray(x)


def one_hot(y_B: np.ndarray, num_classes: int) -> np.ndarray:
  """Integer labels -> float32 (B, num_classes)."""
  return np.eye(num_classes, dtype=np.float32)[y_B]


def _cut_box(rng: np.random.Generator, h: int, w: int, lam: float) -> tuple[int, int, int, int]:
  """CutMix box (top, bottom, left, right) of area ~ (1 - lam) * h * w at a random center."""
  cut = math.sqrt(1.0 - lam)
  ch, cw = int(h * cut), int(w * cut)
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


def mix_params(rngs: Sequence[np.random.Generator], cfg: AugmentConfig, b: int, h: int,
               w: int) -> tuple[np.ndarray, np.ndarray]:
  """Mixup / CutMix of pairs (0, 1), (2, 3), ... as numbers: box int32 (b, 4), weight float32 (b, 2).

  Example a becomes `m * x[a] + (1 - m) * x[partner]` with m = weight[a, 0] inside its box
  (top, bottom, left, right) and 1 outside, and its label `weight[a, 1] * y[a] + (1 -
  weight[a, 1]) * y[partner]`: mixup is the whole image with m = lam, cutmix a box with m = 0
  (label weight: the share of pixels kept), an unmixed pair an empty box with weight 1. One
  Generator per pair; an odd last example stays unmixed.
  """
  box = np.zeros((b, 4), np.int32)
  wt = np.ones((b, 2), np.float32)
  for k in range(b // 2):
    rng = rngs[k]
    if rng.random() >= cfg.mix_prob:
      continue
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.switch_prob)
    if use_cutmix:
      lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
      t, bt, l, r = _cut_box(rng, h, w, lam)
      box[2 * k:2 * k + 2] = (t, bt, l, r)
      wt[2 * k:2 * k + 2] = (0.0, 1.0 - (bt - t) * (r - l) / (h * w))  # the area actually kept
    else:
      lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
      box[2 * k:2 * k + 2] = (0, h, 0, w)
      wt[2 * k:2 * k + 2] = (lam, lam)
  return box, wt


def apply_mix(x_BxHxWxC: np.ndarray, y_B: np.ndarray, num_classes: int, box: np.ndarray,
              wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`mix_params` applied on the host (float32 images, soft labels); the reference of data.device."""
  x = np.asarray(x_BxHxWxC, np.float32)
  y = one_hot(np.asarray(y_B), num_classes)
  b, h, w = x.shape[:3]
  p = np.where((np.arange(b) ^ 1) < b, np.arange(b) ^ 1, np.arange(b))  # pair partner
  rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
  inside = ((rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None])
            & (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None]))
  m = np.where(inside, wt[:, 0, None, None], np.float32(1.0))[..., None].astype(np.float32)
  lam = wt[:, 1, None]
  return m * x + (1 - m) * x[p], lam * y + (1 - lam) * y[p]


def mix_pairs(x_BxHxWxC: np.ndarray, y_B: np.ndarray, num_classes: int,
              rngs: Sequence[np.random.Generator],
              cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
  """Mixup / CutMix within pairs (0, 1), (2, 3), ...: one Generator per pair; soft labels out.

  Pairing neighbours (rather than the whole batch with its reverse) keeps the result of an
  example independent of how the global batch is split over hosts and devices, as long as
  every slice has even length. With an odd batch the last example stays unmixed.
  """
  b, h, w = np.shape(x_BxHxWxC)[:3]
  box, wt = mix_params(rngs, cfg, b, h, w)
  return apply_mix(x_BxHxWxC, y_B, num_classes, box, wt)
