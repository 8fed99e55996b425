"""Trains a DynaDiag model from a config.

    python train.py --config configs/mnist_mlp.py --workdir runs/mnist

Any config field can be overridden: --config.sparsity=0.8 --config.total_steps=500
(`--help` lists them and the methods). Rerunning the same command resumes from the newest
checkpoint in <workdir>/checkpoints. Mistakes and failures print one line on stderr. Exit
status (dynadiag_jax.train.guard): 0 finished; 1 error in the run (checkpoint, data, disk);
2 command-line or config mistake (nothing created); 3 diverged (the last good checkpoint is
kept); 4 the workdir is in use by another run; 130 / 143 stopped by SIGINT / SIGTERM (the
current step saved; rerun the same command to resume). docs/TRAINING.md has the details.
"""

import signal

# First: SIGINT / SIGTERM wait (blocked) until the run's own handlers take them, so that a
# Ctrl-C during the imports or the first compile is a clean stop, never a traceback or a crash.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from dynadiag_jax.train import cli  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  cli.run()
