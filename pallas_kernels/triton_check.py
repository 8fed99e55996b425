"""The Triton modules Pallas emits for cuda, checked on CPU in a second (no plugin, no GPU).

Lowering for cuda (`lower(lowering_platforms=("cuda",))`) runs Pallas' Triton lowering but
not Triton's verifier: a module that the GPU compiler refuses lowers fine. `triton_modules`
catches every module as it is built, so tests can run the MLIR verifier on it
(`operation.verify()`) and lint the kernel jaxpr for the typing trap of jax 0.10.2: in a
`select_n` (`jnp.where`), a weakly typed Python literal takes the *predicate's* type, i1,
so `jnp.where(c, 3, 0)` is a bool (a loop bound that fails to verify, or a value that
silently becomes 0/1). Kernels use typed constants (`jnp.int32(3)`) instead.

Reads jax internals (`jax._src.pallas.triton.pallas_call_registration.lowering`) of the
pinned jax version; a change there fails loudly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import jax
from jax._src import source_info_util
from jax.extend import core as jex_core


@dataclasses.dataclass
class TritonModule:
  """One pallas_call as lowered for Triton: its name, kernel jaxpr and MLIR module."""
  name: str
  jaxpr: Any
  module: Any

  def verify(self) -> None:
    """Runs the MLIR verifier; raises AssertionError naming the kernel if it fails."""
    try:
      self.module.operation.verify()
    except Exception as e:  # jaxlib's MLIRError carries the diagnostics
      raise AssertionError(f"Triton module of {self.name} does not verify:\n{e}") from e

  def weak_selects(self) -> list[str]:
    """select_n equations of the kernel that take a weakly typed literal as a case."""
    return weak_select_literals(self.jaxpr)


@contextlib.contextmanager
def capture() -> Iterator[list[TritonModule]]:
  """Collects every Triton module lowered inside the block (lower for 'cuda' there)."""
  from jax._src.pallas.triton import pallas_call_registration as reg
  orig = reg.lowering.lower_jaxpr_to_triton_module
  got: list[TritonModule] = []

  def spy(jaxpr, *args, **kw):
    res = orig(jaxpr, *args, **kw)
    got.append(TritonModule(jaxpr.debug_info.func_name, jaxpr, res.module))
    return res

  reg.lowering.lower_jaxpr_to_triton_module = spy
  try:
    yield got
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = orig


def triton_modules(f: Callable, *args) -> list[TritonModule]:
  """The Triton modules of jit(f)(*args) lowered for cuda (no GPU or plugin needed)."""
  from pallas_kernels import compat  # pylint: disable=import-outside-toplevel
  with capture() as got, compat.cuda_lowering():
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
  return got


def _subjaxprs(eqn) -> Iterator[Any]:
  for v in eqn.params.values():
    for j in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(j, jex_core.ClosedJaxpr):
        yield j.jaxpr
      elif isinstance(j, jex_core.Jaxpr):
        yield j


def _is_weak_literal(v) -> bool:
  return isinstance(v, jex_core.Literal) and bool(getattr(v.aval, "weak_type", False))


def weak_select_literals(jaxpr, weak: frozenset = frozenset()) -> list[str]:
  """Every select_n (in jaxpr and its sub-jaxprs) whose case is a weakly typed literal.

  The Triton lowering inlines nested jits (jnp.where is one) with their literal
  arguments, so a weak literal passed into a call counts inside it too (`weak`).
  """
  bad = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "select_n":
      if any(_is_weak_literal(v) or (not isinstance(v, jex_core.Literal) and v in weak)
             for v in eqn.invars[1:]):
        bad.append(f"select_n with a weakly typed literal case at "
                   f"{source_info_util.summarize(eqn.source_info) or '?'}")
    for sub in _subjaxprs(eqn):
      inner = frozenset()
      if len(sub.invars) == len(eqn.invars):  # a call (pjit, closed_call): same arguments
        inner = frozenset(i for i, o in zip(sub.invars, eqn.invars)
                          if _is_weak_literal(o) or (not isinstance(o, jex_core.Literal)
                                                     and o in weak))
      bad += weak_select_literals(sub, inner)
  return bad
