"""Trains a DynaDiag model from a config.

    python train.py --config configs/mnist_mlp.py --workdir runs/mnist

Any config field can be overridden: --config.sparsity=0.8 --config.total_steps=500.
Rerunning the same command resumes from the newest checkpoint in <workdir>/checkpoints.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dynadiag_jax.data import DataNotFoundError
from dynadiag_jax.train import CheckpointError, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (CheckpointError, DataNotFoundError) as e:  # the message says what to do
    raise SystemExit(f"{type(e).__name__}: {e}") from e


if __name__ == "__main__":
  app.run(main)
