"""Reads and verifies a train.py checkpoint without building its model.

    python -m dynadiag_jax.train.verify runs/mnist            # the newest step
    python -m dynadiag_jax.train.verify runs/mnist --step 20

Prints the step, phase, parameter count and saved config; every leaf's crc32 is checked.
A corrupt or incomplete checkpoint is one line on stderr and exit status 1. It only reads:
nothing is created, renamed or deleted, so it is safe beside a live run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from absl import logging

from dynadiag_jax.train import guard
from dynadiag_jax.train.checkpoint import CheckpointError, load


def describe(directory: str, step: int | None = None) -> str:
  """A few lines on the newest (or `step`) checkpoint: step, phase, size, config; verified."""
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")  # a workdir
  flat, meta = load(directory, step)
  cfg = json.loads(meta.get("config") or "{}")
  n = sum(int(np.size(v)) for k, v in flat.items() if k.startswith("params/"))
  phase = "frozen" if meta.get("frozen") else f"exploring, K_active level {meta.get('level')}"
  rc = cfg.get("recipe") or {}
  cfg = {**cfg, **{f"recipe.{k}": rc[k] for k in ("name", "block") if rc.get(k) is not None}}
  run = ", ".join(f"{k}={cfg[k]}" for k in ("method", "sparsity", "block", "recipe.name",
                                            "recipe.block", "total_steps") if k in cfg)
  return (f"{directory}: step {meta['step']} ({phase}), {meta.get('wall_s', 0.0):.1f} s of training\n"
          f"  {len(flat)} leaves, {n:,} parameters, every crc32 verified\n"
          f"  config: {run or 'not recorded'}")


def main(argv: list[str] | None = None) -> int:
  """`python -m dynadiag_jax.train.verify WORKDIR [--step N]`: read and verify a checkpoint."""
  ap = argparse.ArgumentParser(prog="python -m dynadiag_jax.train.verify", description=main.__doc__)
  ap.add_argument("directory", help="a train.py workdir or its checkpoints/ directory")
  ap.add_argument("--step", type=int, default=None, help="this step instead of the newest")
  args = ap.parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # orbax's notes on a read-only manager
  try:
    with guard.stderr_dropped_on_error():  # one line, not orbax's tracebacks
      text = describe(args.directory, args.step)
  except CheckpointError as e:
    guard.report(f"checkpoint: error: {' '.join(str(e).split())}")
    return guard.EXIT_ERROR
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
