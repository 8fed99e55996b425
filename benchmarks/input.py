"""Input pipeline speed at 224 px with the ImageNet augmentations, on a generated stand-in.

    python -m benchmarks.input [--images 1000] [--batch 128] [--batches 12] [--workers 0,1,2,3,4]

Writes `--images` synthetic photo-like JPEGs (~400 x 350, dynadiag_jax.data.synthetic) as
ILSVRC2012 tars into a temp dir, prepares them with `python -m dynadiag_jax.data.prepare`
(no TensorFlow), then measures
1. per stage, one process: read (encoded bytes from array_record), decode, crop/augment
   (random-resized crop + flip to 224), the host finish of the old path (float32 + mixup /
   cutmix on the host) and the device step of the new one (uint8 to the device, normalize +
   mixup / cutmix jitted): CPU ms per image and images/s of one core;
2. end to end, as train.py gets it: images/s of `data.batches` for each worker count (0: a
   thread in this process), against the original path (tfds's PIL decode + PIL crop in 8
   threads, float32 normalization and mixup in the producer thread). Configurations take turns
   (`--rounds`), each timed after its workers are up; medians. Also the CPU time all
   processes spent per image, and from it the rate on idle cores for worker counts that
   can use them all (the pipeline's workers are independent, so it scales with processes
   until the cores run out).
Prints the machine's load before and after: other work on the cores lowers the measured
images/s (not the CPU ms per image, which is what the idle-core column is made from).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np



def _prepare(root: str, n: int) -> str:
  from dynadiag_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  manual, data_dir = os.path.join(root, "manual"), os.path.join(root, "data")
  files = synthetic.write_imagenet_tars(manual, n, 16, num_classes=100)
  subprocess.run([sys.executable, "-m", "dynadiag_jax.data.prepare", "imagenet2012",
                  f"--manual_dir={manual}", f"--data_dir={data_dir}"], check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  size = sum(os.path.getsize(os.path.join(data_dir, "imagenet2012", "5.1.0", f))
             for f in os.listdir(os.path.join(data_dir, "imagenet2012", "5.1.0"))
             if "train.array_record" in f)
  print(f"stand-in: {len(files['train'])} train JPEGs, {size / len(files['train']) / 1e3:.0f} kB "
        f"each on average, in {data_dir}")
  return data_dir


def _cpu_ms(fn, n: int, reps: int = 3) -> float:
  """Median CPU ms per item of fn() (which handles n items)."""
  out = []
  for _ in range(reps):
    t = time.process_time()
    fn()
    out.append((time.process_time() - t) / n * 1e3)
  return statistics.median(out)


def stages(data_dir: str, augment, batch: int) -> list[tuple[str, float]]:
  """(stage, CPU ms per image) in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dynadiag_jax import data  # pylint: disable=g-import-not-at-top
  from dynadiag_jax.data import augment as aug, jpeg  # pylint: disable=g-import-not-at-top
  raw = tfds.data_source("imagenet2012", split="train", data_dir=data_dir,
                         decoders={"image": tfds.decode.SkipDecoding()})
  dec = tfds.data_source("imagenet2012", split="train", data_dir=data_dir)
  n = min(len(raw), 256)
  enc = [raw[i]["image"] for i in range(n)]
  xs = [jpeg.decode(e) for e in enc]
  rng = np.random.default_rng(0)

  def crop():
    for x in xs:
      h, w = x.shape[:2]
      y = jpeg.crop_resize(x, aug.rrc_box(rng, h, w, augment.scale, augment.ratio), 224)
      y = y[:, ::-1] if rng.random() < 0.5 else y
      np.ascontiguousarray(y)

  src = data.ImageSource("imagenet2012", data_dir, image_size=224, num_workers=0)
  src.augment = augment
  x_u8 = np.stack([jpeg.example(e, 224, rng, augment) for e in enc[:batch]])
  y = np.arange(batch) % 1000
  rngs = [np.random.default_rng(k) for k in range(batch // 2)]
  box, wt = aug.mix_params(rngs, augment, batch, 224, 224)
  prep = jax.jit(data.device.preprocess(src))
  hb = {"image": x_u8, "label": y.astype(np.int32), "mix_box": box, "mix_weight": wt}
  jax.block_until_ready(prep(jax.device_put(hb)))

  def device():
    jax.block_until_ready(prep(jax.device_put(hb)))

  def host_finish():
    aug.apply_mix(src.normalize(x_u8), y, 1000, box, wt)

  return [
      ("read (array_record -> encoded bytes)", _cpu_ms(lambda: [raw[i] for i in range(n)], n)),
      ("decode (libjpeg-turbo)", _cpu_ms(lambda: [jpeg.decode(e) for e in enc], n)),
      ("crop/augment (random-resized crop + flip, 224)", _cpu_ms(crop, n)),
      ("read + decode + crop, fused (jpeg.example)",
       _cpu_ms(lambda: [jpeg.example(raw[i]["image"], 224, rng, augment) for i in range(n)], n)),
      ("to device: uint8 put + normalize + mix, jitted", _cpu_ms(device, batch)),
      ("old: read + PIL decode (tfds)", _cpu_ms(lambda: [dec[i] for i in range(n)], n)),
      ("old: crop/augment in PIL", _cpu_ms(
          lambda: [aug.train_transform(x, rng, augment, 224) for x in xs], n)),
      ("old: host float32 normalize + mix", _cpu_ms(host_finish, batch)),
  ]


def _cpu_s() -> float:
  """CPU seconds used so far by this process and its live children (the workers)."""
  import psutil  # pylint: disable=g-import-not-at-top
  me = psutil.Process()
  total = 0.0
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def _rate(it, batch: int, num: int) -> tuple[float, float]:
  """(images/s, CPU ms per image over all processes) over `num` batches of a running iterator."""
  t, c = time.perf_counter(), _cpu_s()
  for _ in range(num):
    next(it)
  wall, cpu = time.perf_counter() - t, _cpu_s() - c
  return num * batch / wall, cpu / (num * batch) * 1e3


def end_to_end(data_dir: str, augment, batch: int, num: int, workers: list[int],
               rounds: int) -> dict[str, list[tuple[float, float]]]:
  """{configuration: [(images/s, CPU ms per image) per round]}."""
  from dynadiag_jax import data  # pylint: disable=g-import-not-at-top
  fast = data.ImageSource("imagenet2012", data_dir, image_size=224, num_workers=0)
  old = data.ImageSource("imagenet2012", data_dir, image_size=224, num_workers=8, decoder="pil")
  fast.augment = old.augment = augment
  kw = dict(global_batch=batch, seed=0, num_devices=1, process_index=0, process_count=1)
  configs = {"original path (8 threads, float32 + mix on host)":
             lambda s: data.batches(old, start_step=s, **kw)}
  for w in workers:
    name = "grain, in-process thread" if w == 0 else f"grain, {w} worker process{'es' * (w > 1)}"
    configs[name] = (lambda w: lambda s: data.batches(fast, start_step=s, raw=True, workers=w,
                                                      prefetch=2, **kw))(w)
  out: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
  for r in range(rounds):
    for name, make in configs.items():
      it = make(1000 * r)
      try:
        next(it)  # workers up, first batch out
        time.sleep(0.5)  # let the prefetch buffers fill as they would during a train step
        out[name].append(_rate(it, batch, num))
      finally:
        if hasattr(it, "close"):
          it.close()
      print(f"  round {r}: {name}: {out[name][-1][0]:.0f} images/s, "
            f"{out[name][-1][1]:.2f} CPU ms / image", flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=1000)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--batches", type=int, default=12, help="timed batches per configuration")
  p.add_argument("--workers", default="0,1,2,3,4")
  p.add_argument("--rounds", type=int, default=2)
  a = p.parse_args()
  from configs import imagenet_vit_b  # pylint: disable=g-import-not-at-top
  from dynadiag_jax import data  # pylint: disable=g-import-not-at-top
  cfg = imagenet_vit_b.get_config().data
  augment = data.augment_config(cfg, data.images.INFO["imagenet2012"].augment)
  load0 = os.getloadavg()
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as root:
    data_dir = _prepare(root, a.images)
    st = stages(data_dir, augment, a.batch)
    e2e = end_to_end(data_dir, augment, a.batch, a.batches,
                     [int(w) for w in a.workers.split(",")], a.rounds)
  load1 = os.getloadavg()
  print(f"\n{cores} CPU cores; load average {load0[0]:.1f} before, {load1[0]:.1f} after; 224 px, "
        f"random-resized crop + flip, mixup 0.8 / cutmix 1.0 (imagenet_vit_b); batch {a.batch}\n")
  print("| stage (one process) | CPU ms / image | images/s per core |\n|---|---|---|")
  for name, ms in st:
    print(f"| {name} | {ms:.2f} | {1e3 / ms:.0f} |")
  med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
         for k, v in e2e.items()}
  base = next(iter(med.values()))
  print(f"\n| end to end (data.batches) | images/s measured (median of {a.rounds}) | vs original "
        f"| CPU ms / image, all processes | {cores} idle cores: {cores} x 1000 / CPU ms |"
        "\n|---|---|---|---|---|")
  for name, (rate, ms) in med.items():
    parallel = name.endswith("processes") and int(name.split()[1]) >= cores
    proj = f"{cores * 1e3 / ms:.0f}" if parallel else "-"
    print(f"| {name} | {rate:.0f} | {rate / base[0]:.2f}x | {ms:.2f} | {proj} |")

if __name__ == "__main__":
  main()
