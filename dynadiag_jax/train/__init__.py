"""Training: configs -> model, pmapped steps, DynaDiag phases, orbax checkpoints, reporting.

    from dynadiag_jax.train import train_and_evaluate
    summary = train_and_evaluate(config, workdir)  # config: configs/*.py get_config()
"""

from dynadiag_jax.train import build, checkpoint, progress, state, step
from dynadiag_jax.train.build import DataSpec, build_model, build_optimizer, build_schedule
from dynadiag_jax.train.checkpoint import Checkpointer, CheckpointError
from dynadiag_jax.train.loop import evaluate, train_and_evaluate
from dynadiag_jax.train.state import TrainState
from dynadiag_jax.train.step import make_eval_step, make_train_step

__all__ = [
    "CheckpointError", "Checkpointer", "DataSpec", "TrainState", "build", "build_model",
    "build_optimizer", "build_schedule", "checkpoint", "evaluate", "make_eval_step",
    "make_train_step", "progress", "state", "step", "train_and_evaluate",
]
