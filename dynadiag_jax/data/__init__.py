"""Input pipeline: tfds array_record image sets, local text corpora, deterministic sharded batches.

    cfg = data.default_config(); cfg.name = 'cifar10'
    source = data.build(cfg)
    for batch in data.batches(source, global_batch=128, seed=0, start_step=step): ...
    for batch in data.eval_batches(source, global_batch=256): ...  # has 'mask'

Training sends raw batches (uint8, `raw=True`, built by `workers` processes) and finishes them
on the devices with `device.preprocess(source)` (normalization, mixup / cutmix).

Sources expose kind ('image' | 'text'), num_classes or vocab_size, input_shape, num_train,
num_test, train_split, eval_split and get_batch(split, idx, rngs, augment).
"""

from __future__ import annotations

import dataclasses
import glob
import os

import ml_collections
import numpy as np

from dynadiag_jax.data import augment, builders, device, images, jpeg, pipeline, text
from dynadiag_jax.data.augment import AugmentConfig
from dynadiag_jax.data.errors import DataNotFoundError
from dynadiag_jax.data.images import ImageSource
from dynadiag_jax.data.pipeline import (Prefetch, batches, default_workers, eval_batch, eval_batches,
                                        train_batch)
from dynadiag_jax.data.text import ByteTokenizer, GPT2Tokenizer, TextSource, get_tokenizer

IMAGE_SETS = tuple(images.INFO)
TEXT_SETS = ("pydoc", "wikitext103")
_AUG_FIELDS = tuple(f.name for f in dataclasses.fields(AugmentConfig))


def default_data_dir() -> str:
  """$DYNADIAG_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("DYNADIAG_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def default_config() -> ml_collections.ConfigDict:
  """Every data option; None means 'the data set's default'."""
  return ml_collections.ConfigDict({
      "name": "mnist5k",  # one of IMAGE_SETS + TEXT_SETS
      "data_dir": None,  # tfds data_dir; None -> default_data_dir()
      # images
      "image_size": None,  # output side; None -> native (imagenet2012: 224)
      "crop": None,  # 'none' | 'pad_crop' | 'random_resized_crop'; None -> data set default
      "pad": None, "flip": None, "scale": None, "ratio": None,
      "mixup_alpha": None, "cutmix_alpha": None, "switch_prob": None, "mix_prob": None,
      # text
      "seq_len": 256,
      "tokenizer": "auto",  # 'auto' (GPT-2 if vocab_dir holds its files) | 'bytes' | 'gpt2'
      "vocab_dir": None,  # None -> <data_dir>/gpt2
      "text_dir": None,  # wikitext103 raw files; None -> <data_dir>/wikitext-103-raw
      "eval_split": None,  # None -> 'test' (imagenet2012: 'validation', pydoc: 'validation')
      # loading
      "workers": ml_collections.config_dict.placeholder(int),  # processes decoding batches;
      # None -> 0 (a thread) for sets held in memory, else one per CPU core
      "prefetch": 2,  # batches ahead, per worker (or in the thread)
  })


def augment_config(cfg: ml_collections.ConfigDict, base: AugmentConfig) -> AugmentConfig:
  """base with the augmentation fields that cfg sets (non-None)."""
  over = {k: cfg.get(k) for k in _AUG_FIELDS if cfg.get(k) is not None}
  over = {k: tuple(v) if k in ("scale", "ratio") else v for k, v in over.items()}
  return dataclasses.replace(base, **over)


def num_workers(cfg: ml_collections.ConfigDict, source) -> int:
  """cfg.workers, or pipeline.default_workers(source) when unset."""
  w = cfg.get("workers")
  return default_workers(source) if w is None else int(w)


def check_splits(source) -> None:
  """Reads the first and last example of the train and eval splits; DataNotFoundError naming the
  split and its files when one is missing, empty or unreadable (before the first step)."""
  where = getattr(getattr(source, "builder", None), "data_path", None) or getattr(
      source, "where", source.name)
  for split in dict.fromkeys((source.train_split, source.eval_split)):
    try:
      n = source.num_examples(split)
    except (KeyError, ValueError) as e:
      raise DataNotFoundError(f"{source.name} has no split {split!r} in {where} ({e})") from None
    if n < 1:
      raise DataNotFoundError(f"split {split!r} of {source.name} in {where} is empty")
    try:
      source.get_batch(split, np.asarray(sorted({0, n - 1})))
    except DataNotFoundError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      err = " ".join(f"{type(e).__name__}: {e}".split())[:300]
      files = sorted(glob.glob(os.path.join(str(where), f"*-{split}.*")))
      named = f" ({', '.join(files)})" if files else ""
      raise DataNotFoundError(f"cannot read split {split!r} of {source.name} in {where}{named}: "
                              f"{err}") from None


def build(cfg: ml_collections.ConfigDict) -> ImageSource | TextSource:
  """The source named by cfg.name (offline sets are prepared into data_dir on first use)."""
  name = cfg.name
  data_dir = os.path.expanduser(cfg.get("data_dir") or default_data_dir())
  if name in IMAGE_SETS:
    src = ImageSource(name, data_dir, image_size=cfg.get("image_size"))
    src.augment = augment_config(cfg, images.INFO[name].augment)
    if cfg.get("eval_split"):
      src.eval_split = cfg.eval_split
    return src
  if name not in TEXT_SETS:
    raise ValueError(f"unknown data set {name!r}; known: {IMAGE_SETS + TEXT_SETS}")
  tok = get_tokenizer(cfg.get("tokenizer", "auto"),
                      cfg.get("vocab_dir") or os.path.join(data_dir, "gpt2"))
  seq_len = cfg.get("seq_len", 256)
  if name == "pydoc":
    return text.pydoc_source(seq_len, tok)
  text_dir = os.path.expanduser(cfg.get("text_dir") or os.path.join(data_dir, "wikitext-103-raw"))
  return text.wikitext103_source(text_dir, seq_len, tok,
                                 cache_dir=os.path.join(data_dir, "dynadiag_tokens"),
                                 eval_split=cfg.get("eval_split") or "test")


__all__ = [
    "AugmentConfig", "ByteTokenizer", "DataNotFoundError", "check_splits", "GPT2Tokenizer", "ImageSource",
    "Prefetch", "TextSource", "augment", "augment_config", "batches", "build", "builders",
    "default_config", "default_data_dir", "default_workers", "device", "eval_batch", "eval_batches",
    "get_tokenizer", "images", "jpeg", "num_workers", "pipeline", "text", "train_batch",
]
