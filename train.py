"""Trains a DynaDiag model from a config.

    python train.py --config configs/mnist_mlp.py --workdir runs/mnist

Any config field can be overridden: --config.sparsity=0.8 --config.total_steps=500.
Rerunning the same command resumes from the newest checkpoint in <workdir>/checkpoints.
Mistakes and failures print one line on stderr. Exit status (dynadiag_jax.train.guard):
0 finished; 1 error in the run (checkpoint, data); 2 command-line or config mistake (nothing
created); 3 diverged (non-finite loss; the last good checkpoint is kept); 143 stopped by
SIGTERM after saving a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as py_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from dynadiag_jax.data import DataNotFoundError
from dynadiag_jax.train import CheckpointError, guard, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")

# Third-party log lines that say nothing actionable to a user of this CLI.
QUIET = ("OpenCV is not installed", "Variant folder", "Dataset info file")


def fail(message: str, status: int):
  """Prints one line on stderr and exits with `status`."""
  guard.report(f"train.py: error: {' '.join(str(message).split())}")
  sys.exit(status)


def _config_path(argv: list[str]) -> str | None:
  """The value of --config in argv, if any."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load(path: str) -> config_dict.ConfigDict:
  """get_config() of a config file (path[:arg] as config_flags reads it)."""
  arg = None
  if not os.path.isfile(path) and ":" in path:
    path, arg = path.split(":", 1)
  spec = importlib.util.spec_from_file_location("_train_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def _field_mistake(config: config_dict.ConfigDict, argv: list[str]) -> str | None:
  """'no field ...; did you mean ...' for the first --config.a.b override naming no field."""
  for a in argv:
    m = re.match(r"--(?:no)?config\.([\w.]+)", a)
    if not m:
      continue
    node, path = config, []
    for key in m.group(1).split("."):
      if not isinstance(node, (config_dict.ConfigDict, dict)):
        return f"config.{'.'.join(path)} is a {type(node).__name__}, it has no field {key!r}"
      if key not in node:
        close = difflib.get_close_matches(key, list(node.keys()), n=1)
        where = f"config.{'.'.join(path)}" if path else "the config"
        hint = f"; did you mean {'.'.join(path + close)!r}?" if close else ""
        return f"no field {'.'.join(path + [key])!r} in {where}{hint}"
      node, path = node[key], path + [key]
  return None


def _explain(argv: list[str], err: Exception) -> str:
  """One line saying what is wrong with the command line."""
  path = _config_path(argv)
  if path is None:
    return "--config is required: a configs/*.py file (e.g. --config configs/mnist_mlp.py)"
  if not os.path.isfile(path) and not os.path.isfile(path.split(":", 1)[0]):
    here = os.path.dirname(path) or "."
    files = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
    close = difflib.get_close_matches(os.path.basename(path), files, n=1)
    return f"config file {path!r} not found" + (
        f"; did you mean {os.path.join(here, close[0])!r}?" if close else "")
  try:
    config = _load(path)
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot load config file {path!r}: {type(e).__name__}: {e}"
  known = str(err) if isinstance(err, flags.Error) else f"{type(err).__name__}: {err}"
  return _field_mistake(config, argv) or known


def parse(argv: list[str]) -> list[str]:
  """absl flags; a mistake exits with one line on stderr (status 2) before anything is created."""
  try:
    rest = FLAGS(argv)
    config = FLAGS.config  # a config file that failed to load raises on first use
    if config is None:
      raise ValueError("no config")
    config.get("seed")
  except Exception as e:  # pylint: disable=broad-except
    fail(_explain(argv, e), guard.EXIT_USAGE)
  if not FLAGS.workdir:
    fail("--workdir is required: where checkpoints, metrics and summary.json go",
         guard.EXIT_USAGE)
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}", guard.EXIT_USAGE)
  return rest


class _Quiet(py_logging.Filter):
  """Drops third-party log lines that only add noise (see QUIET)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(QUIET)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  py_logging.getLogger("absl").addFilter(_Quiet())
  try:
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (guard.ConfigError, guard.WorkdirError) as e:
    fail(e, guard.EXIT_USAGE)
  except guard.DivergenceError as e:
    fail(e, guard.EXIT_DIVERGED)
  except (CheckpointError, DataNotFoundError) as e:  # the message says what to do
    fail(f"{type(e).__name__}: {e}", guard.EXIT_ERROR)
  if summary is None:  # SIGTERM: a checkpoint was saved
    sys.exit(guard.EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse)
