"""dynadiag-jax: dynamic diagonal sparse training (DynaDiag, ICML 2025) in JAX/Flax."""

from dynadiag_jax import gates, ops, pattern
from dynadiag_jax.diag_dense import DiagDense
from dynadiag_jax.layers import LayerFactory
