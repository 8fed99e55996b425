"""Batches from a source: deterministic order, per-host/per-device sharding, background prefetch.

The training batch at global step s is a pure function of (seed, s):
  global position g = s * global_batch + j, j in [0, global_batch)
  epoch = g // N, example = permutation(seed, epoch)[g % N]
  augmentation of position j: np.random.default_rng([seed, 1, s, j]);
  mixup/cutmix of pair (2k, 2k+1): np.random.default_rng([seed, 2, s, k]).
So the data position of a checkpoint is its step: resume with `batches(..., start_step=step)`.
Host p of P takes positions [p * B / P, (p + 1) * B / P) and splits them over its devices.

Batches are built by a grain pipeline: `grain.MapDataset.range(steps).map(step -> batch)`, with
`workers` processes (`mp_prefetch`, each `prefetch` batches ahead; elements come back in
order, so the stream is the same for any worker count), or, with workers = 0, in a thread of
this process. `raw=True` gives what the training loop sends to the devices: uint8 images,
int labels and the mixup/cutmix numbers (`mix_box`, `mix_weight`), which data.device applies
there together with the normalization; `raw=False` does the same on the host (float32).
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import grain
import jax
import numpy as np
from absl import flags

from dynadiag_jax.data import augment as aug

Batch = dict[str, np.ndarray]
_PERM, _AUG, _MIX = 0, 1, 2  # rng stream tags


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the n training examples in one epoch."""
  p = np.random.default_rng([seed, _PERM, epoch]).permutation(n)
  p.flags.writeable = False
  return p


def train_indices(seed: int, g: np.ndarray, n: int) -> np.ndarray:
  """Training example indices at global example counters g (= step * global_batch + position)."""
  g = np.asarray(g, np.int64)
  epochs, pos = g // n, g % n
  out = np.empty_like(g)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_permutation(seed, int(e), n)[pos[sel]]
  return out


def _host_slice(global_batch: int, process_index: int, process_count: int,
                num_devices: int) -> slice:
  """This host's positions within a global batch."""
  if global_batch % (process_count * num_devices):
    raise ValueError(f"global_batch {global_batch} is not divisible by process_count "
                     f"{process_count} x num_devices {num_devices}")
  b = global_batch // process_count
  return slice(process_index * b, (process_index + 1) * b)


def _shape(batch: Batch, num_devices: int, shard: bool) -> Batch:
  """(b, ...) -> (num_devices, b // num_devices, ...) when shard."""
  if not shard:
    return batch
  return {k: v.reshape(num_devices, v.shape[0] // num_devices, *v.shape[1:]) for k, v in batch.items()}


def _defaults(num_devices, process_index, process_count):
  return (jax.local_device_count() if num_devices is None else num_devices,
          jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def train_batch(source, step: int, *, global_batch: int, seed: int, process_index: int = 0,
                process_count: int = 1, num_devices: int = 1,
                augment: aug.AugmentConfig | None = None, shard: bool = True,
                raw: bool = False) -> Batch:
  """This host's part of the training batch at global step `step` (a pure function).

  raw: uint8 images with int labels and, when mixing, 'mix_box' / 'mix_weight'
  (augment.mix_params) for data.device; else normalized float32, mixed on the host.
  """
  if seed < 0 or step < 0:
    raise ValueError(f"seed and step must be >= 0, got {seed}, {step}")
  sl = _host_slice(global_batch, process_index, process_count, num_devices)
  j = np.arange(sl.start, sl.stop)
  idx = train_indices(seed, step * global_batch + j, source.num_train)
  if source.kind != "image":
    return _shape(source.get_batch(source.train_split, idx), num_devices, shard)
  augment = source.augment if augment is None else augment
  mixes = augment is not None and augment.mixes
  if mixes and len(j) % 2:
    raise ValueError(f"mixup/cutmix need an even batch per host, got {len(j)}")
  if mixes and raw and (len(j) // num_devices) % 2:
    raise ValueError(f"mixup/cutmix on the devices need an even batch per device, got "
                     f"{len(j) // num_devices}")
  rngs = None
  if augment is not None and (augment.crop != "none" or augment.flip):
    rngs = [np.random.default_rng([seed, _AUG, step, int(k)]) for k in j]
  batch = source.get_batch(source.train_split, idx, rngs, augment, raw=True)
  if mixes:
    pair_rngs = [np.random.default_rng([seed, _MIX, step, int(k) // 2]) for k in j[::2]]
    b, h, w = batch["image"].shape[:3]
    box, wt = aug.mix_params(pair_rngs, augment, b, h, w)
    if raw:
      batch["mix_box"], batch["mix_weight"] = box, wt
    else:
      batch["image"], batch["label"] = aug.apply_mix(
          source.normalize(batch["image"]), batch["label"], source.num_classes, box, wt)
  elif not raw:
    batch["image"] = source.normalize(batch["image"])
  return _shape(batch, num_devices, shard)


def num_eval_batches(source, global_batch: int, split: str | None = None) -> int:
  """Batches that cover the eval split once (the last one padded)."""
  n = source.num_examples(split or source.eval_split)
  return -(-n // global_batch)


def eval_batch(source, k: int, *, global_batch: int, split: str | None = None,
               process_index: int = 0, process_count: int = 1, num_devices: int = 1,
               shard: bool = True, raw: bool = False) -> Batch:
  """This host's part of eval batch k, in split order; padding has 'mask' 0 (float32)."""
  split = split or source.eval_split
  n = source.num_examples(split)
  sl = _host_slice(global_batch, process_index, process_count, num_devices)
  g = k * global_batch + np.arange(sl.start, sl.stop)
  mask = g < n
  idx = np.where(mask, g, 0)
  batch = source.get_batch(split, idx, raw=raw) if source.kind == "image" else \
      source.get_batch(split, idx)
  batch["mask"] = mask.astype(np.float32)
  return _shape(batch, num_devices, shard)


class _Raised:
  """An exception of the producer, carried to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _produce(it: Iterator[Any], q: queue.Queue, stop: threading.Event):
  """Thread body: fill q from it until exhausted, failed or stopped (no reference to Prefetch)."""
  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  try:
    for item in it:
      if not put(item):
        return
    put(_END)
  except BaseException as e:  # pylint: disable=broad-except
    put(_Raised(e))


class Prefetch(Iterator[Batch]):
  """Runs an iterator in a daemon thread, `size` items ahead; errors re-raise in the consumer.

  Close it (or use it as a context manager) to stop the thread; dropping it also stops it.
  """

  def __init__(self, it: Iterable[Any], size: int = 2):
    self._q, self._stop, self._done = queue.Queue(maxsize=max(size, 1)), threading.Event(), False
    self._thread = threading.Thread(target=_produce, args=(iter(it), self._q, self._stop),
                                    daemon=True, name="dynadiag-prefetch")
    self._thread.start()

  def __next__(self) -> Batch:
    if self._done:
      raise StopIteration
    item = self._q.get()
    if item is _END or isinstance(item, _Raised):
      self._done = True
      self._thread.join()
      if isinstance(item, _Raised):
        raise item.error
      raise StopIteration
    return item

  def close(self):
    """Stops the thread and drops what it had prefetched."""
    self._stop.set()
    self._done = True
    while True:
      try:
        self._q.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    self._stop.set()


class _Workers(Iterator[Batch]):
  """A grain pipeline over steps: `make(step)` in worker processes, results in step order."""

  def __init__(self, make: Callable[[int], Batch], steps: range, workers: int, prefetch: int):
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags (defaults outside an absl app)
      flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(steps.start, steps.stop).map(make)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    self._it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(prefetch, 1))))

  def __next__(self) -> Batch:
    if self._it is None:
      raise StopIteration
    shm = next(self._it)  # arrays in shared memory, freed when dropped
    return {k: np.array(v) for k, v in shm.items()}

  def close(self):
    """Stops the worker processes."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _stream(make: Callable[[int], Batch], steps: range, workers: int,
            prefetch: int) -> Iterator[Batch]:
  """make(s) for s in steps: in `workers` processes, else in a prefetch thread (or inline)."""
  if workers < 0:
    raise ValueError(f"workers must be >= 0, got {workers}")
  if workers > 0 and len(steps):
    return _Workers(make, steps, workers, prefetch)
  return Prefetch(map(make, steps), prefetch) if prefetch > 0 else iter(map(make, steps))


def default_workers(source) -> int:
  """Worker processes when the config leaves it open: 0 for sets in memory, else the CPU count."""
  import os  # pylint: disable=g-import-not-at-top
  if source.kind != "image" or not getattr(source, "encoded", False):
    return 0
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_ENDLESS = 2**40  # steps of an endless stream


def batches(source, global_batch: int, seed: int = 0, start_step: int = 0,
            num_devices: int | None = None, process_index: int | None = None,
            process_count: int | None = None, train: bool = True,
            augment: aug.AugmentConfig | None = None, shard: bool = True,
            num_steps: int | None = None, prefetch: int = 2,
            split: str | None = None, raw: bool = False,
            workers: int = 0) -> Iterator[Batch]:
  """Host-local numpy batches shaped (num_devices, per_device, ...) (or (per_host, ...) if not shard).

  train=True: the endless (or num_steps long) stream from start_step; 'image'/'label' or
  'inputs'/'targets'; with mixup/cutmix, 'label' is float32 (b, num_classes), else int32 (b,)
  (raw: uint8 images, int labels and the mix numbers; see train_batch).
  augment=None takes source.augment; pass aug.AugmentConfig() for none.
  train=False: eval_batches (the eval split once, with 'mask'); seed and start_step unused.
  workers: processes that build batches (0: a thread); prefetch: batches ahead per worker.
  """
  num_devices, process_index, process_count = _defaults(num_devices, process_index, process_count)
  if not train:
    return eval_batches(source, global_batch, num_devices=num_devices, process_index=process_index,
                        process_count=process_count, shard=shard, prefetch=prefetch, split=split,
                        raw=raw, workers=workers)
  if split not in (None, source.train_split):
    raise ValueError(f"training batches come from {source.train_split!r}, not {split!r}")
  make: Callable[[int], Batch] = functools.partial(
      train_batch, source, global_batch=global_batch, seed=seed, process_index=process_index,
      process_count=process_count, num_devices=num_devices, augment=augment, shard=shard, raw=raw)
  stop = start_step + (_ENDLESS if num_steps is None else num_steps)
  return _stream(make, range(start_step, stop), workers, prefetch)


def eval_batches(source, global_batch: int, num_devices: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 shard: bool = True, prefetch: int = 2, split: str | None = None,
                 raw: bool = False, workers: int = 0) -> Iterator[Batch]:
  """Every example of the eval split exactly once, in order, the last batch padded ('mask' 0)."""
  num_devices, process_index, process_count = _defaults(num_devices, process_index, process_count)
  make = functools.partial(eval_batch, source, global_batch=global_batch, split=split,
                           process_index=process_index, process_count=process_count,
                           num_devices=num_devices, shard=shard, raw=raw)
  return _stream(make, range(num_eval_batches(source, global_batch, split)), workers, prefetch)
