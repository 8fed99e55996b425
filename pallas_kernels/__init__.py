"""Pallas (Triton) kernels for diagonal sparsity: BCSR layout, SpMM, SDDMM, custom_vjp backend.

Import-light on purpose: submodules are imported by name (`pallas_kernels.diag` registers
the `pallas` backend of `dynadiag_jax.ops`); nothing here imports jax_triton.
"""
