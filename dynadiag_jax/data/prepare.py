"""Prepares data sets as tfds array_record without TensorFlow.

    python -m dynadiag_jax.data.prepare imagenet2012 --manual_dir DIR --data_dir DIR

DIR of --manual_dir holds ImageNet's ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (and
optionally ILSVRC2012_img_test.tar) as downloaded from image-net.org. The result is tfds'
`imagenet2012` (5.1.0: same features.json, splits and keys as `tfds build imagenet2012`),
readable with `tfds.data_source`. tfds' own builder needs TensorFlow for tf.io.gfile and for
re-encoding the CMYK JPEGs and the PNG file of the archive; `Imagenet2012` below reads the tars
with `tarfile` and re-encodes with PIL (any non-JPEG or non-RGB/greyscale file, at quality
100 as tfds does). `mnist5k` and `digits` are prepared from installed packages.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tarfile
from typing import Iterator

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from dynadiag_jax.data import builders

TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar",
        "test": "ILSVRC2012_img_test.tar"}
NAMES = ("imagenet2012",) + builders.OFFLINE


def fix_image(data: bytes) -> bytes:
  """JPEG bytes as they are; CMYK JPEGs and other formats (ImageNet's one PNG) -> RGB JPEG q100."""
  with Image.open(io.BytesIO(data)) as img:
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
      return data
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="jpeg", quality=100)
    return buf.getvalue()


def _members(fobj) -> Iterator[tuple[str, bytes]]:
  """(name, bytes) of every file of a tar read as a stream."""
  with tarfile.open(fileobj=fobj, mode="r|") as tar:
    for m in tar:
      if m.isfile():
        yield os.path.basename(m.name), tar.extractfile(m).read()


def _validation_labels(path: str) -> dict[str, str]:
  """File name -> synset: tfds' label list in sorted order of the tar's names."""
  labels = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
  with tarfile.open(path, mode="r:") as tar:
    names = sorted(os.path.basename(n) for n in tar.getnames())
  if len(names) > len(labels):
    raise ValueError(f"{path} holds {len(names)} files; ImageNet validation has {len(labels)}")
  return dict(zip(names, labels))


class Imagenet2012(tfds.builder_cls("imagenet2012"), skip_registration=True):
  """tfds' imagenet2012 (same info and version) with os / tarfile / PIL in place of TensorFlow."""

  name = "imagenet2012"
  url_infos = None  # tfds' lookup of checksums needs importlib_resources (tfds#11212)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The registered builder's file (its labels and metadata live next to it)."""
    return tfds.core.tfds_path("datasets/imagenet2012/imagenet2012_dataset_builder.py")

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    paths = {s: os.path.join(manual, f) for s, f in TARS.items()}
    found = {s: p for s, p in paths.items() if os.path.isfile(p)}
    if not {"train", "validation"} & set(found):
      raise FileNotFoundError(
          f'ImageNet needs a manual download: put {TARS["train"]} and {TARS["validation"]} '
          f'(from https://image-net.org/download-images) into {manual}')
    for s in set(paths) - set(found) - {"test"}:
      logging.warning("imagenet2012: no %s split (%s not found)", s, paths[s])
    return {s: self._generate_examples(p, s) for s, p in found.items()}

  def _generate_examples(self, path: str, split: str):
    """(file name, example) for every image of one split's tar."""
    if split == "train":  # one inner tar per synset: n01440764.tar holds n01440764_*.JPEG
      with open(path, "rb") as f:
        for inner, payload in _members(f):
          synset = inner[:-len(".tar")]
          for name, data in _members(io.BytesIO(payload)):
            yield name, {"file_name": name, "image": fix_image(data), "label": synset}
      return
    labels = _validation_labels(path) if split == "validation" else None
    with open(path, "rb") as f:
      for name, data in _members(f):
        yield name, {"file_name": name, "image": fix_image(data),
                     "label": labels[name] if labels else -1}


def prepare_imagenet(manual_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds data_dir/imagenet2012/5.1.0 as array_record from the tars in manual_dir."""
  b = Imagenet2012(data_dir=data_dir, file_format="array_record")
  if b.is_prepared():
    logging.info("imagenet2012 is already prepared in %s", b.data_dir)
  else:
    b.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return tfds.builder("imagenet2012", data_dir=data_dir)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dynadiag_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", choices=NAMES)
  p.add_argument("--data_dir", default=None,
                 help="tfds data_dir to write into (default: $DYNADIAG_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--manual_dir", default=None,
                 help="imagenet2012: folder with the ILSVRC2012 tars (default: <data_dir>/downloads/manual)")
  a = p.parse_args(argv)
  from dynadiag_jax.data import default_data_dir  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(a.data_dir or default_data_dir())
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  if a.name == "imagenet2012":
    manual = os.path.expanduser(a.manual_dir or os.path.join(data_dir, "downloads", "manual"))
    try:
      b = prepare_imagenet(manual, data_dir)
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  else:
    b = builders.prepare(a.name, data_dir)
  splits = ", ".join(f"{k} {v.num_examples:,}" for k, v in b.info.splits.items())
  print(f"{a.name} prepared in {b.data_dir} ({splits})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
