"""dynadiag-jax: dynamic diagonal sparse training (DynaDiag, ICML 2025) in JAX/Flax."""

from dynadiag_jax import (allocation, cover, gates, mixing, ops, optim, pattern, recipe, schedules,
                          sharding, static)
from dynadiag_jax.diag_dense import DiagDense
from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.phases import advance, exploring_layers, freeze, with_phase
from dynadiag_jax.probe import linear_calls
from dynadiag_jax.recipe import Recipe
from dynadiag_jax.schedules import Phase, PhaseError, Schedule
from dynadiag_jax.sparsify import sparsify
from dynadiag_jax.summary import summarize, totals

__all__ = [
    "DiagDense", "LayerFactory", "Phase", "PhaseError", "Recipe", "Schedule", "advance",
    "allocation", "analysis", "cover", "export", "exploring_layers", "freeze", "gates", "linear_calls",
    "mixing", "nnx", "ops", "optim", "pattern", "recipe", "schedules", "sharding", "sparsify", "static",
    "summarize", "totals", "with_phase",
]


_LAZY = ("analysis", "export", "nnx")  # imported on first use (networkx takes ~1 s to import)


def __getattr__(name: str):
  """`dd.analysis`, `dd.export`, `dd.nnx`: imported on first use."""
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(f"dynadiag_jax.{name}")
  raise AttributeError(f"module 'dynadiag_jax' has no attribute {name!r}")
