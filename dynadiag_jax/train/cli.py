"""The command line of train.py (also `python -m dynadiag_jax.train`): flags, help, exit statuses.

    python train.py --config configs/mnist_mlp.py --workdir runs/mnist [--config.FIELD=VALUE ...]

Mistakes and failures print one line on stderr (`train.py: error: ...`); the exit statuses
are guard.py's. SIGINT and SIGTERM stop the run at a step boundary after saving it
(signals.py); train.py blocks them from its first line until `run` installs the handlers.
"""

from __future__ import annotations

import ctypes
import difflib
import importlib.util
import logging as py_logging
import os
import re
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from dynadiag_jax.data import DataNotFoundError
from dynadiag_jax.train import checkpoint, guard, lock, signals
from dynadiag_jax.train.loop import train_and_evaluate

PROG = "train.py"
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")

# Third-party log lines that say nothing actionable to a user of this CLI.
QUIET = ("OpenCV is not installed", "Variant folder", "Dataset info file")
# Environment variable the sweep sets in its children: die (SIGTERM: save, exit 143) with it.
PARENT_ENV = "DYNADIAG_PARENT_PID"
PR_SET_PDEATHSIG = 1

USAGE = f"""usage: {PROG} --config CONFIG.py --workdir DIR [--config.FIELD=VALUE ...]

Trains a DynaDiag (or baseline) model; rerunning the same command resumes from the newest
checkpoint in DIR/checkpoints. Any config field can be overridden, e.g.
--config.total_steps=500 --config.sparsity=0.95 --config.method=rigl.

Exit status: 0 finished (summary.json written); 1 error in the run (checkpoint, data, disk);
2 command-line or config mistake (nothing created); 3 diverged; 4 workdir in use by another
run; 130 / 143 stopped by SIGINT / SIGTERM after saving the current step (rerun to resume).
"""


def fail(message: str, status: int):
  """Prints one line on stderr and exits with `status`. Single-process: at once, so that no exit
  handlers or threads of the libraries (tensorboard, orbax) add their own tracebacks about the
  same failure; multi-host: through jax's shutdown, which the other processes wait for."""
  guard.report(f"{PROG}: error: {' '.join(str(message).split())}")
  for f in (sys.stdout, sys.stderr):
    try:
      f.flush()
    except (OSError, ValueError):
      pass
  if jax.distributed.is_initialized():
    sys.exit(status)
  os._exit(status)  # pylint: disable=protected-access


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


def config_importable(path: str | None) -> None:
  """Puts the folder above a config file's package on sys.path, so `from configs import common`
  works from any working directory (an installed package, a sweep run elsewhere)."""
  if not path:
    return
  here = os.path.dirname(os.path.abspath(path.split(":", 1)[0] if not os.path.isfile(path)
                                         else path))
  if os.path.isfile(os.path.join(here, "__init__.py")):
    root = os.path.dirname(here)
    if root not in sys.path:
      sys.path.insert(0, root)


def _field_mistake(config: config_dict.ConfigDict, argv: list[str]) -> str | None:
  """'no field ...; did you mean ...' for the first --config.a.b override naming no field
  (a field that moved into config.recipe, or was removed, says so)."""
  for a in argv:
    m = re.match(r"--(?:no)?config\.([\w.]+)", a)
    if not m:
      continue
    if m.group(1) in checkpoint.RENAMED:
      return (f"config.{m.group(1)} is now config.{checkpoint.RENAMED[m.group(1)]} (the recipe, "
              f"docs/USAGE.md): --config.{checkpoint.RENAMED[m.group(1)]}=...")
    if m.group(1) in checkpoint.REMOVED:
      return (f"config.{m.group(1)} was removed: measured and not adopted (docs/RESEARCH.md); "
              "run the commit named there to use it")
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


def _flag_mistake(config: config_dict.ConfigDict, argv: list[str]) -> str | None:
  """'unknown flag --total_steps; config fields are set as --config.total_steps=...'."""
  for a in argv:
    m = re.match(r"--(?:no)?([\w.]+)(=|$)", a)
    if not m or m.group(1) in ("config", "workdir", "help", "helpfull") or \
        m.group(1).startswith("config."):
      continue
    name = m.group(1)
    fields = [k for k, _ in _fields(config)]
    if name in fields:
      return f"unknown flag --{name}; config fields are set as --config.{name}=VALUE"
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"; did you mean --config.{close[0]}=VALUE?" if close else ""
    return f"unknown flag --{name} (flags: --config, --workdir, --config.FIELD=VALUE){hint}"
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
  return _field_mistake(config, argv) or _flag_mistake(config, argv) or known


def _fields(config: config_dict.ConfigDict, prefix: str = ""):
  """(dotted name, value) of every leaf field."""
  for k in sorted(config.keys()):
    v = config[k]
    if isinstance(v, config_dict.ConfigDict):
      yield from _fields(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def help_text(argv: list[str]) -> str:
  """The usage, the methods, and every field of the config given (or of configs/*.py's names)."""
  from dynadiag_jax import methods  # pylint: disable=g-import-not-at-top
  out = [USAGE, f"Methods (--config.method): {', '.join(methods.METHODS)}"]
  path = _config_path(argv)
  if path and os.path.isfile(path.split(":", 1)[0]):
    try:
      config = _load(path)
    except Exception as e:  # pylint: disable=broad-except
      out.append(f"\n(cannot load {path}: {type(e).__name__}: {e})")
    else:
      out.append(f"\nFields of {path} (--config.FIELD=VALUE), with their values:")
      out += [f"  {k} = {v!r}" for k, v in _fields(config)]
  else:
    here = os.path.join(os.getcwd(), "configs")
    names = sorted(f for f in os.listdir(here) if f.endswith(".py") and f not in
                   ("__init__.py", "common.py")) if os.path.isdir(here) else []
    out.append("\nConfigs here: " + (", ".join(f"configs/{n}" for n in names) or "none") +
               f"\nGive --config to list its fields: {PROG} --config configs/mnist_mlp.py --help")
  return "\n".join(out) + "\n"


def parse(argv: list[str]) -> list[str]:
  """absl flags; a mistake exits with one line on stderr (status 2) before anything is created."""
  if any(a in ("-h", "--help", "-help", "--helpfull", "-?") for a in argv[1:]):
    config_importable(_config_path(argv))
    sys.stdout.write(help_text(argv))
    sys.exit(0)
  config_importable(_config_path(argv))
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
  """Drops third-party log lines that only add noise (QUIET), and orbax's own error reports:
  a failed save or restore ends the run with one line of ours naming the cause."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if "/orbax/" in (record.pathname or ""):
      return False
    return not str(record.msg).startswith(QUIET)


def die_with_parent() -> None:
  """In a sweep's child (PARENT_ENV set): SIGTERM when the parent dies (Linux prctl), so a
  killed sweep leaves no orphan training; exits at once if the parent is already gone."""
  parent = os.environ.get(PARENT_ENV)
  if not parent:
    return
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
  except (OSError, AttributeError):
    pass
  if str(os.getppid()) != parent:
    fail(f"the sweep that started this run (pid {parent}) is gone", guard.EXIT_PREEMPTED)


def main(argv):
  """Runs train_and_evaluate; every outcome is one line on stderr and a guard exit status."""
  del argv
  logging.set_verbosity(logging.WARNING)
  for name in ("absl", ""):
    py_logging.getLogger(name).addFilter(_Quiet())
  for h in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
    h.addFilter(_Quiet())
  guard.failures_end_process()
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except guard.Stopped as e:
    guard.report(f"{PROG}: {e}")
    sys.exit(e.status)
  except lock.WorkdirBusyError as e:
    fail(e, guard.EXIT_BUSY)
  except (guard.ConfigError, guard.WorkdirError) as e:
    fail(e, guard.EXIT_USAGE)
  except guard.DivergenceError as e:
    fail(e, guard.EXIT_DIVERGED)
  except (checkpoint.CheckpointError, DataNotFoundError) as e:  # the message says what to do
    fail(f"{type(e).__name__}: {e}", guard.EXIT_ERROR)
  except OSError as e:  # disk full, read-only, ... outside a checkpoint
    fail(guard.os_error(e), guard.EXIT_ERROR)


def run(argv: list[str] | None = None):
  """The train.py entry point: signal handlers first (then held signals arrive), then absl."""
  signals.install()
  die_with_parent()
  app.run(main, argv=argv, flags_parser=parse)
