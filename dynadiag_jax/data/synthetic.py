"""A stand-in for ImageNet's manual download: synthetic photo-like JPEGs in ILSVRC2012's tar layout.

`write_imagenet_tars(manual_dir, num_train, num_val)` writes ILSVRC2012_img_train.tar (one inner
tar per synset, files `<synset>_<k>.JPEG`) and ILSVRC2012_img_val.tar (`ILSVRC2012_val_<k>.JPEG`,
labelled by tfds' validation_labels.txt in sorted-name order), as image-net.org ships them.
Images are 1/f ("pink") noise, whose spectrum is that of natural photos, at ImageNet's typical
sizes (~400 x 350) and JPEG quality 90, so decoding costs about what it costs on the real files.
A few train files reproduce ImageNet's oddities: CMYK JPEGs and one PNG named .JPEG.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

CMYK_NAME = "n01739381_1309.JPEG"  # names tfds lists as CMYK / PNG in the real archive
PNG_NAME = "n02105855_2933.JPEG"


def pink_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """float32 (h, w, 3) standardized noise with a 1/f amplitude spectrum (photo-like statistics)."""
  fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
  amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w)) ** 1.1
  shape = (h, w // 2 + 1, 3)
  spec = amp[..., None] * (rng.normal(size=shape) + 1j * rng.normal(size=shape))
  x = np.fft.irfft2(spec, s=(h, w), axes=(0, 1))
  return ((x - x.mean()) / (x.std() + 1e-9)).astype(np.float32)


class PinkImages:
  """Random windows of a few large 1/f fields, recoloured: photo-like images, fast to make."""

  def __init__(self, rng: np.random.Generator, side: int = 1024, fields: int = 4):
    self.rng = rng
    self.fields = [pink_field(rng, side, side) for _ in range(fields)]

  def __call__(self, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3)."""
    r = self.rng
    f = self.fields[int(r.integers(len(self.fields)))]
    top, left = int(r.integers(0, f.shape[0] - h + 1)), int(r.integers(0, f.shape[1] - w + 1))
    x = f[top:top + h, left:left + w] @ r.uniform(0.2, 1.0, (3, 3)).astype(np.float32)
    x = (x - x.mean()) / (x.std() + 1e-9)
    return np.clip(r.uniform(90, 170) + 48 * x, 0, 255).astype(np.uint8)


def encode(x_HxWx3: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
  """Image bytes: 'jpeg' (RGB), 'cmyk' (a CMYK JPEG) or 'png'."""
  img = Image.fromarray(x_HxWx3)
  buf = io.BytesIO()
  if fmt == "cmyk":
    img.convert("CMYK").save(buf, format="jpeg", quality=quality)
  elif fmt == "png":
    img.save(buf, format="png")
  else:
    img.save(buf, format="jpeg", quality=quality)
  return buf.getvalue()


def random_size(rng: np.random.Generator) -> tuple[int, int]:
  """(h, w) around ImageNet's typical 350 x 400 (mostly landscape, some portrait)."""
  h, w = int(rng.integers(250, 450)), int(rng.integers(300, 500))
  return (w, h) if rng.random() < 0.25 else (h, w)


def _add(tar: tarfile.TarFile, name: str, payload: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def synsets() -> list[str]:
  """ImageNet's 1000 synset ids in tfds' label order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
  return path.read_text().split()


def val_labels() -> list[str]:
  """tfds' validation labels: synset of ILSVRC2012_val_<k>.JPEG in sorted-name order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
  return path.read_text().split()


def write_imagenet_tars(manual_dir: str, num_train: int, num_val: int, num_classes: int = 10,
                        seed: int = 0, oddities: bool = True) -> dict[str, list]:
  """Writes the two ILSVRC2012 tars into manual_dir; returns {split: [(file_name, synset)]}.

  Train images spread over the first num_classes synsets; with `oddities`, one CMYK JPEG and
  one PNG (named .JPEG) are among them under the names tfds knows them by.
  """
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  pink = PinkImages(rng)
  names = synsets()[:num_classes]
  files: dict[str, list] = {"train": [], "validation": []}
  per = {s: [] for s in names}
  for k in range(num_train):
    s = names[k % num_classes]
    per[s].append(f"{s}_{k}.JPEG")
  if oddities and num_train >= 2:
    for odd in (CMYK_NAME, PNG_NAME):
      s = odd.split("_")[0]
      if s not in per:  # put it in place of a regular file of the first synset
        per[names[0]].pop()
        per[s] = []
      per[s].append(odd)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for s, fnames in per.items():
      if not fnames:
        continue
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for f in fnames:
          fmt = "cmyk" if f == CMYK_NAME else "png" if f == PNG_NAME else "jpeg"
          _add(inner, f, encode(pink(*random_size(rng)), fmt))
          files["train"].append((f, s))
      _add(outer, f"{s}.tar", inner_buf.getvalue())
  labels = val_labels()
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
    for k in range(1, num_val + 1):
      f = f"ILSVRC2012_val_{k:08d}.JPEG"
      _add(tar, f, encode(pink(*random_size(rng))))
      files["validation"].append((f, labels[k - 1]))
  return files
