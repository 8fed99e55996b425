"""Whole `train.py` runs, exploration included, against the dense run: wall-time ratios, one run.

    python -m benchmarks.runs --config configs/mnist_vit_wide.py --steps 240 \\
        --variants dense:method=dense fast:recipe.name=fast default:

Each variant is `name:override,override` (overrides as `--config.<override>`; empty: the
config as it is). Every variant runs `--rounds` times, interleaved (dense, fast, default,
dense, ...), each in a fresh process (`python -m dynadiag_jax.train`, compile and data
loading included, as a user's run) in its own temporary workdir; the table gives the median
wall time (`summary.json`'s `wall_s`: the whole run, exploration and freeze included) and the
speed-up of each variant over the first. Test accuracy is printed too, but a short run says
nothing about accuracy: that is the sweep's job (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def parse_variant(spec: str) -> tuple[str, list[str]]:
  """'fast:recipe.name=fast,recipe.block=32' -> ('fast', ['--config.recipe.name=fast', ...])."""
  name, _, rest = spec.partition(":")
  if not name:
    raise ValueError(f"a variant needs a name before ':', got {spec!r}")
  return name, [f"--config.{o}" for o in rest.split(",") if o]


def run_once(config: str, steps: int, overrides: list[str], workdir: str) -> dict:
  """One train.py run in a fresh process; its summary.json."""
  cmd = [sys.executable, "-m", "dynadiag_jax.train", "--config", config, "--workdir", workdir,
         f"--config.total_steps={steps}", "--config.eval_every=0",
         f"--config.checkpoint.every={steps}", "--config.progress_bar=False", *overrides]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/mnist_vit_wide.py")
  ap.add_argument("--steps", type=int, default=240)
  ap.add_argument("--rounds", type=int, default=1)
  ap.add_argument("--variants", nargs="+", default=["dense:method=dense", "fast:recipe.name=fast",
                                                    "default:"])
  args = ap.parse_args(argv)
  variants = dict(parse_variant(v) for v in args.variants)
  walls = {k: [] for k in variants}
  accs = {k: [] for k in variants}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for name, overrides in variants.items():
        wd = os.path.join(tmp, f"{name}_{r}")
        s = run_once(args.config, args.steps, overrides, wd)
        walls[name].append(float(s["wall_s"]))
        accs[name].append(float(s["test_accuracy"]))
        print(f"  {name} round {r + 1}: {walls[name][-1]:.1f} s", file=sys.stderr, flush=True)
  base = statistics.median(walls[next(iter(variants))])
  print(f"{args.config}, {args.steps} steps, whole train.py runs (fresh process each, compile "
        f"included), median of {args.rounds} interleaved rounds, load average at end "
        f"{os.getloadavg()[0]:.1f}\n")
  print("| variant | overrides | wall s | speed-up | test accuracy (short run) |")
  print("|---|---|---|---|---|")
  for name, overrides in variants.items():
    w = statistics.median(walls[name])
    print(f"| {name} | {' '.join(overrides) or '-'} | {w:.1f} | {base / w:.2f}x | "
          f"{statistics.median(accs[name]):.3f} |")


if __name__ == "__main__":
  main()
