"""`StaticArray`: a small numpy array that jax treats as static structure, not as an input.

A frozen layer's offsets never change, so `dynadiag_jax.freeze` stores them as
`StaticArray`s: a pytree node with no leaves whose value lives in the tree structure. Passed
into `jax.jit` or `jax.pmap` with the rest of the variables, they stay concrete at trace time
(the kernels build their exact layouts once) and a different pattern is a different trace.
`arrays` turns them back into plain arrays (for a checkpoint), `static` the other way;
`savable` / `restored` do the same to a whole model's variables around a checkpointer.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

COLLECTION = "dynadiag"  # diag_dense.COLLECTION (diag_dense imports this module)
# The frozen `dynadiag` variables held static (DiagDense: offsets (K,), in_features () and
# the input permutation perm (m,) of a mixing layer).
STATIC_NAMES = ("offsets", "in_features", "perm")


class StaticArray:
  """A read-only numpy array, hashed and compared by value, that has no pytree leaves."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    a = np.array(value)  # a copy: the caller's array may change
    a.setflags(write=False)
    self.value = a

  def __array__(self, dtype=None, copy=None):
    return self.value if dtype is None else self.value.astype(dtype)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.value.shape

  @property
  def dtype(self) -> np.dtype:
    return self.value.dtype

  @property
  def ndim(self) -> int:
    return self.value.ndim

  def __int__(self) -> int:
    return int(self.value)

  def __len__(self) -> int:
    return len(self.value)

  def __getitem__(self, i):
    return self.value[i]

  def __hash__(self) -> int:
    return hash((self.value.shape, self.value.dtype.str, self.value.tobytes()))

  def __eq__(self, other) -> bool:
    return (isinstance(other, StaticArray) and self.value.shape == other.value.shape
            and self.value.dtype == other.value.dtype
            and bool(np.array_equal(self.value, other.value)))

  def __repr__(self) -> str:
    return f"StaticArray({self.value.tolist()!r}, dtype={self.value.dtype})"


jax.tree_util.register_pytree_node(StaticArray, lambda s: ((), s), lambda s, _: s)


def _map_named(tree: Any, fn) -> Any:
  """`tree` (nested mappings) with fn applied to every leaf whose key is in STATIC_NAMES."""
  if isinstance(tree, Mapping):
    return {k: fn(v) if k in STATIC_NAMES and not isinstance(v, Mapping) else _map_named(v, fn)
            for k, v in tree.items()}
  return tree


def static(collection: Any) -> Any:
  """A `dynadiag` collection with its frozen offsets and widths as `StaticArray`s."""
  return _map_named(collection, lambda v: v if isinstance(v, StaticArray) else StaticArray(v))


def _plain(v: Any) -> Any:
  """`v` as a plain numpy array when it is a `StaticArray`, else unchanged."""
  return np.array(v.value) if isinstance(v, StaticArray) else v


def arrays(collection: Any) -> Any:
  """A `dynadiag` collection with every `StaticArray` a plain numpy array again."""
  return _map_named(collection, _plain)


def savable(tree: Any) -> Any:
  """`tree` (a model's variables, an `nnx.State`, any pytree) with every `StaticArray` a
  plain numpy array: what a checkpointer (orbax) can write; a `StaticArray` has no leaves."""
  return jax.tree.map(_plain, tree, is_leaf=lambda v: isinstance(v, StaticArray))


def restored(variables: Mapping[str, Any]) -> dict:
  """Restored Linen variables with the `dynadiag` collection's frozen offsets static again."""
  variables = dict(variables)
  if COLLECTION in variables:
    variables[COLLECTION] = static(variables[COLLECTION])
  return variables
