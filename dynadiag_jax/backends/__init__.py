"""Backends of `diag_matmul` beyond the dense reference: `xla` (structured) and the `auto` rule."""
