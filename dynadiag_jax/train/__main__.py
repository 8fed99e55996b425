"""`python -m dynadiag_jax.train --config ... --workdir ...`: train.py from an installed package."""

from dynadiag_jax.train import signals

signals.hold()  # as train.py: SIGINT / SIGTERM wait for the run's handlers

from dynadiag_jax.train import cli  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  cli.run()
