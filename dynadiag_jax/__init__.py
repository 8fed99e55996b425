"""dynadiag-jax: dynamic diagonal sparse training (DynaDiag, ICML 2025) in JAX/Flax."""

from dynadiag_jax import allocation, gates, ops, optim, pattern, schedules
from dynadiag_jax.diag_dense import DiagDense
from dynadiag_jax.layers import LayerFactory
from dynadiag_jax.phases import advance, exploring_layers, freeze, set_k_active, set_temperature
from dynadiag_jax.probe import linear_calls
from dynadiag_jax.schedules import Schedule
from dynadiag_jax.summary import summarize, totals

__all__ = [
    "DiagDense", "LayerFactory", "Schedule", "advance", "allocation", "exploring_layers", "freeze",
    "gates", "linear_calls", "ops", "optim", "pattern", "schedules", "set_k_active",
    "set_temperature", "summarize", "totals",
]
