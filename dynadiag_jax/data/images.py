"""Image data sets read through tfds' array_record data sources (no TensorFlow needed to read).

'mnist5k' and 'digits' are prepared on first use from packages (see builders.py); 'mnist',
'cifar10', 'cifar100' and 'imagenet2012' must already be prepared in data_dir as array_record
(imagenet2012: `python -m dynadiag_jax.data.prepare`). Small sets are decoded once and held in
memory; large ones (imagenet2012) are read as encoded bytes and decoded, cropped and resized per
example (jpeg.py), in worker processes when the pipeline has them. Batches are uint8 (`raw`)
or normalized float32.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import json
import os
import threading
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from dynadiag_jax.data import augment as aug
from dynadiag_jax.data import builders, jpeg
from dynadiag_jax.data.errors import DataNotFoundError
from dynadiag_jax.data.source import Source


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What the pipeline needs to know of one image data set."""

  size: int  # native side (imagenet: the default output side)
  channels: int
  num_classes: int
  mean: tuple[float, ...]  # per channel, on the [0, 1] scale
  std: tuple[float, ...]
  eval_split: str = "test"
  crop_frac: float = 1.0  # eval: central crop of this fraction of the short side
  augment: aug.AugmentConfig = aug.AugmentConfig()  # training default
  cache: bool = True  # small enough to hold decoded in memory


_FLIP_PAD = aug.AugmentConfig(crop="pad_crop", pad=4, flip=True)
INFO = {
    "mnist5k": ImageInfo(28, 1, 10, (0.1313,), (0.3086,)),
    "digits": ImageInfo(8, 1, 10, (0.3053,), (0.3759,)),
    "mnist": ImageInfo(28, 1, 10, (0.1307,), (0.3081,)),
    "cifar10": ImageInfo(32, 3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                         augment=_FLIP_PAD),
    "cifar100": ImageInfo(32, 3, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                          augment=_FLIP_PAD),
    "imagenet2012": ImageInfo(224, 3, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                              eval_split="validation", crop_frac=0.875,
                              augment=aug.AugmentConfig(crop="random_resized_crop", flip=True),
                              cache=False),
}


def _prepare_help(name: str, data_dir: str) -> str:
  """The exact steps that put `name` into data_dir as array_record."""
  build = f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
  pip = "pip install tensorflow tensorflow-datasets==4.9.10 importlib_resources"  # tfds#11212
  if name == "imagenet2012":
    manual = os.path.join(data_dir, "downloads", "manual")
    return (f"ImageNet needs a manual download: register at https://image-net.org/download-images, "
            f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into {manual}/, then run "
            f"(no TensorFlow needed): python -m dynadiag_jax.data.prepare imagenet2012 "
            f"--manual_dir={manual} --data_dir={data_dir} (or, with TensorFlow: {build})")
  return (f"On a machine with internet access and TensorFlow ({pip}) run: {build} ; "
          f"then copy {os.path.join(data_dir, name)} to this machine (same path, or point "
          f"cfg.data_dir / DYNADIAG_DATA_DIR at it).")


def _damaged(name: str, data_dir: str, err: Exception) -> DataNotFoundError:
  """The error for a data set folder tfds cannot read, naming its unreadable JSON files."""
  folder = os.path.join(data_dir, name)
  bad = []
  for root, _, files in os.walk(folder):
    for f in sorted(files):
      if f.endswith(".json"):
        try:
          with open(os.path.join(root, f)) as fh:
            json.load(fh)
        except (OSError, ValueError):
          bad.append(os.path.join(root, f))
  what = f"{', '.join(bad)} cannot be read as JSON" if bad else \
      " ".join(f"{type(err).__name__}: {err}".split())[:300]
  again = (f" Remove {folder} to prepare it again (it is made offline)." if name in
           builders.OFFLINE else f" {_prepare_help(name, data_dir)}")
  return DataNotFoundError(f"Data set {name!r} in {folder} is damaged: {what}.{again}")


def load_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of `name`; offline ones are prepared here, others must exist.

  A folder tfds cannot read (a broken dataset_info.json) is a DataNotFoundError naming the file.
  """
  try:
    return _load_builder(name, data_dir)
  except OSError as e:  # a read-only or full data_dir while preparing, a file it cannot open
    words = {errno.EROFS: "read-only file system", errno.ENOSPC: "disk full",
             errno.EACCES: "permission denied"}.get(e.errno, type(e).__name__)
    where = e.filename or data_dir
    raise DataNotFoundError(
        f"Data set {name!r} cannot be " + ("prepared" if name in builders.OFFLINE else "read")
        + f" in {data_dir}: {words} ({e.strerror or e}: {where}). Point cfg.data_dir or "
        "DYNADIAG_DATA_DIR at a folder it can use.") from None
  except (DataNotFoundError, ValueError) as e:
    if isinstance(e, DataNotFoundError) or str(e).startswith("unknown image data set"):
      raise
    raise _damaged(name, data_dir, e) from None
  except Exception as e:  # pylint: disable=broad-except  (protobuf's ParseError, OSError, ...)
    raise _damaged(name, data_dir, e) from None


def _load_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if name in builders.OFFLINE:
    return builders.prepare(name, data_dir)
  if name not in INFO:
    raise ValueError(f"unknown image data set {name!r}; known: {sorted(INFO)}")
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise DataNotFoundError(
        f"Data set {name!r} is not prepared in data_dir {data_dir!r} (looked for "
        f"{builder.data_path}). {_prepare_help(name, data_dir)}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataNotFoundError(
        f"Data set {name!r} in {builder.data_path} is in {builder.info.file_format.value} format; "
        f"random access needs array_record. {_prepare_help(name, data_dir)}")
  return builder


class ImageSource(Source):
  """Random access to one image data set: uint8 examples in, uint8 or normalized float32 batches out.

  decoder: 'fast' reads encoded bytes and decodes + crops them in one pass (jpeg.example;
  the default for sets not held in memory); 'pil' lets tfds decode with PIL and crops with
  augment.train_transform (the original path, kept for comparison). threads: decoding threads
  within this process for sets not held in memory (0: none).
  """

  kind = "image"

  def __init__(self, name: str, data_dir: str, image_size: int | None = None,
               augment: aug.AugmentConfig | None = None, cache: bool | None = None,
               num_workers: int = 8, decoder: str = "fast"):
    if decoder not in ("fast", "pil"):
      raise ValueError(f"decoder must be 'fast' or 'pil', got {decoder!r}")
    self.name, self.data_dir = name, data_dir
    self.info = INFO[name]
    self.builder = load_builder(name, data_dir)
    self.image_size = image_size or self.info.size
    self.augment = augment if augment is not None else self.info.augment  # training default
    self.cache = self.info.cache if cache is None else cache
    self.decoder, self.threads = decoder, num_workers
    self.train_split, self.eval_split = "train", self.info.eval_split
    self.mean = np.asarray(self.info.mean, np.float32) * 255.0
    self.std = np.asarray(self.info.std, np.float32) * 255.0
    self._init_local()

  def _init_local(self):
    """What a process holds for itself: readers, decoded arrays, its thread pool."""
    self._sources, self._arrays, self._lock = {}, {}, threading.Lock()
    self._pool = None if self.cache or not self.threads else \
        concurrent.futures.ThreadPoolExecutor(self.threads)

  def __getstate__(self) -> dict:
    """Picklable for worker processes: readers and pools are reopened there (no threads)."""
    state = {k: v for k, v in self.__dict__.items()
             if k not in ("_sources", "_arrays", "_lock", "_pool", "builder")}
    state["threads"] = 0
    return state

  def __setstate__(self, state: dict):
    self.__dict__.update(state)
    self.builder = load_builder(self.name, self.data_dir)
    self._init_local()

  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """Shape of one output image (H, W, C)."""
    return (self.image_size, self.image_size, self.info.channels)

  @property
  def encoded(self) -> bool:
    """Whether examples are read as encoded bytes and decoded per example (jpeg.py)."""
    return not self.cache and self.decoder == "fast"

  def num_examples(self, split: str) -> int:
    """Examples in one split."""
    return self.builder.info.splits[split].num_examples

  def data_source(self, split: str):
    """The tfds random-access data source of one split (array_record); bytes if `encoded`."""
    with self._lock:
      if split not in self._sources:
        dec = {"image": tfds.decode.SkipDecoding()} if self.encoded else None
        self._sources[split] = self.builder.as_data_source(split=split, decoders=dec)
      return self._sources[split]

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split decoded: images (N, H, W, C) uint8 and labels (N,) int32 (cached)."""
    with self._lock:
      if split in self._arrays:
        return self._arrays[split]
    ds = self.builder.as_data_source(split=split)
    exs = ds.__getitems__(list(range(len(ds))))
    out = (np.stack([e["image"] for e in exs]), np.asarray([e["label"] for e in exs], np.int32))
    with self._lock:
      self._arrays[split] = out
    return out

  def _example(self, split: str, i: int) -> tuple[np.ndarray, int]:
    if self.cache:
      x, y = self.arrays(split)
      return x[i], int(y[i])
    e = self.data_source(split)[int(i)]
    return e["image"], int(e["label"])

  def transform(self, x_HxWxC: np.ndarray, rng: np.random.Generator | None,
                augment: aug.AugmentConfig | None) -> np.ndarray:
    """One example to uint8 (S, S, C): augmented when rng and augment are given, else eval crop."""
    if self.encoded:  # x is the encoded image
      return jpeg.example(x_HxWxC, self.image_size, rng, augment, self.info.crop_frac)
    if rng is None or augment is None:
      return aug.center_crop_resize(x_HxWxC, self.image_size, self.info.crop_frac)
    return aug.train_transform(x_HxWxC, rng, augment, self.image_size, self.info.crop_frac)

  def normalize(self, x_BxHxWxC: np.ndarray) -> np.ndarray:
    """uint8 -> float32 (x - mean) / std per channel."""
    return ((x_BxHxWxC.astype(np.float32) - self.mean) / self.std).astype(np.float32)

  def get_batch(self, split: str, idx: np.ndarray,
                rngs: Sequence[np.random.Generator] | None = None,
                augment: aug.AugmentConfig | None = None,
                raw: bool = False) -> dict[str, np.ndarray]:
    """Examples idx of split: {'image': (b, S, S, C), 'label': int32 (b,)}; uint8 if raw, else normalized."""
    def one(k):
      x, y = self._example(split, idx[k])
      return self.transform(x, None if rngs is None else rngs[k], augment), y

    finish = (lambda x: x) if raw else self.normalize
    if self._pool is not None and len(idx) > 1:
      out = list(self._pool.map(one, range(len(idx))))
    elif self.cache and (rngs is None or augment is None) and self.info.crop_frac >= 1.0 \
        and self.image_size == self.info.size:
      x, y = self.arrays(split)  # fast path: no per-example work
      return {"image": finish(x[idx]), "label": y[idx]}
    else:
      out = [one(k) for k in range(len(idx))]
    x = np.stack([o[0] for o in out]) if out else np.zeros((0, *self.input_shape), np.uint8)
    return {"image": finish(x), "label": np.asarray([o[1] for o in out], np.int32)}

  def close(self):
    """Stops the decoding threads (if any)."""
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
