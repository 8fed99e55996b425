"""Train-step time of config.parallel='pmap' vs 'mesh' on 4 forced CPU devices, side by side.

    python -m benchmarks.parallel                 # mnist_mlp and mnist_vit_tiny, 7 rounds
    python -m benchmarks.parallel --quick         # mnist_mlp only, 3 rounds

For each config and phase (exploring at its last K_active level, and frozen) three variants
are built through the training system's own pieces (`loop.Run`, `parallel.build`): pmap,
mesh 4x1 (data only) and mesh 2x2 (data x fsdp, every parameter matrix split). Each is
compiled, then all are timed round-robin, interleaved (a sample is `--steps` chained train
steps on one batch, blocked on at the end); the table gives medians in ms per step and each
mesh variant's time over pmap's from the same rounds. One run on this machine: ratios, not a
verdict on another machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import importlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from dynadiag_jax import data  # noqa: E402
from dynadiag_jax.train import loop  # noqa: E402
from dynadiag_jax.train import state as state_lib  # noqa: E402

VARIANTS = {"pmap": {"parallel": "pmap"},
            "mesh 4x1": {"parallel": "mesh"},
            "mesh 2x2 fsdp": {"parallel": "mesh", "fsdp": 2}}


def _config(name: str, variant: dict):
  c = importlib.import_module(f"configs.{name}").get_config()
  c.num_devices = 4
  c.parallel = variant["parallel"]
  c.mesh.update(fsdp=variant.get("fsdp", 1), fsdp_min_size=0)
  return c


def _prepared(name: str, variant: dict, frozen: bool):
  """(step, state, batch) of one variant, compiled."""
  run = loop.Run.build(_config(name, variant))
  at = run.sched.freeze_step - (0 if frozen else 1)
  host = state_lib.advance(run.fresh(), run.sched, at)
  par = run.par
  step = par.train_step(run.model, run.tx, run.sched, run.spec, run.config.label_smoothing, None)
  raw = data.train_batch(run.source, at, global_batch=run.config.batch_size, seed=0,
                         num_devices=4, shard=par.shard_batches, raw=True)
  state, batch = par.put(host), par.batch(run.source, raw)
  state, _ = step(state, batch)  # compile
  jax.block_until_ready(state)
  return step, state, batch


def bench(name: str, frozen: bool, rounds: int, steps: int) -> dict[str, float]:
  """Median ms per train step of each variant, timed round-robin."""
  prepared = {v: list(_prepared(name, kw, frozen)) for v, kw in VARIANTS.items()}
  times: dict[str, list[float]] = {v: [] for v in VARIANTS}
  for _ in range(rounds):
    for v, p in prepared.items():
      step, state, batch = p
      t0 = time.perf_counter()
      for _ in range(steps):
        state, _ = step(state, batch)
      jax.block_until_ready(state)
      times[v].append((time.perf_counter() - t0) / steps * 1e3)
      p[1] = state
  return {v: statistics.median(t) for v, t in times.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default="mnist_mlp,mnist_vit_tiny")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--steps", type=int, default=10, help="chained steps per timed sample")
  ap.add_argument("--quick", action="store_true", help="mnist_mlp, 3 rounds")
  a = ap.parse_args(argv)
  names = ["mnist_mlp"] if a.quick else a.configs.split(",")
  rounds = 3 if a.quick else a.rounds
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{os.cpu_count()} cores; medians of {rounds} rounds of {a.steps} steps")
  cols = list(VARIANTS)
  print("| config | phase | " + " | ".join(f"{v} ms" for v in cols) + " | " +
        " | ".join(f"{v} / pmap" for v in cols[1:]) + " |")
  print("|---|---|" + "---:|" * (2 * len(cols) - 1))
  for name in names:
    for frozen in (False, True):
      t = bench(name, frozen, rounds, a.steps)
      print(f"| {name} | {'frozen' if frozen else 'exploring'} | " +
            " | ".join(f"{t[v]:.2f}" for v in cols) + " | " +
            " | ".join(f"{t[v] / t['pmap']:.2f}x" for v in cols[1:]) + " |", flush=True)


if __name__ == "__main__":
  main()
