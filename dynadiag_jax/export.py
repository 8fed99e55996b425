"""Hand a trained (frozen) sparse model to a server or another tool (docs/EXPORT.md).

- `export(model, variables, example_input, path)` writes an inference artifact: a
  `jax.export` serialized function of (weights, x) with symbolic batch (and, optionally,
  sequence) dimensions, and the compact weights (each DiagDense's K x D values and bias,
  every other parameter as it is) in `weights.npz`. The frozen offsets are closed over,
  so the function specialises on them as the training loop does; they travel inside the
  serialized module, not as weights. Loading and running it needs only jax and numpy:

      import jax
      import numpy as np
      exp = jax.export.deserialize(bytearray(open(f"{path}/exported.bin", "rb").read()))
      weights = jax.device_put(dict(np.load(f"{path}/weights.npz")))
      run = jax.jit(exp.call)  # jitted: one dispatch per call, weights stay on the device
      y = run(weights, x)

- `densify(model, variables)` turns every frozen DiagDense into `nn.Dense`'s {kernel, bias}
  at the same path: the variables of the same model built with `LayerFactory()` (all
  `nn.Dense`, `dense_model(model)`), for any tool that reads dense checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynadiag_jax import mixing, pattern
from dynadiag_jax.diag_dense import COLLECTION, DiagDense
from dynadiag_jax.layers import LayerFactory

EXPORTED = "exported.bin"
WEIGHTS = "weights.npz"
META = "meta.json"
FORMAT = "dynadiag-jax-export/1"
SEP = "/"  # weights.npz keys are param paths joined by SEP: 'fc1/values', 'head/kernel'


def _plain(tree: Any) -> Any:
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def _frozen_layers(col: Mapping) -> list[tuple[str, ...]]:
  """Paths (in the `dynadiag` collection, = in `params`) of DiagDense layers; raises if any explores."""
  found, exploring = [], []

  def walk(node, path):
    if not isinstance(node, Mapping):
      return
    leaf = lambda k: k in node and not isinstance(node[k], Mapping)
    if leaf("offsets"):
      found.append(path)
    elif leaf("k"):
      exploring.append(path)
    else:
      for key, child in node.items():
        walk(child, path + (key,))

  walk(col, ())
  if exploring:
    names = ", ".join(SEP.join(p) for p in exploring)
    raise ValueError(f"export / densify take frozen variables; layers still exploring: {names}. "
                     "Freeze first: variables, _ = dynadiag_jax.freeze(variables)")
  return found


def _flat(params: Mapping) -> dict[str, Any]:
  return {SEP.join(k): v for k, v in flax.traverse_util.flatten_dict(_plain(params)).items()}


def _nested(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def _split(variables: Mapping) -> tuple[dict, dict]:
  """(params, the other collections); checks that every DiagDense is frozen."""
  variables = _plain(dict(variables))
  if "params" not in variables:
    raise ValueError("variables must hold a 'params' collection")
  _frozen_layers(variables.get(COLLECTION, {}))
  rest = {k: jax.tree_util.tree_map(np.asarray, v) for k, v in variables.items() if k != "params"}
  return variables["params"], rest


def input_spec(example_input: Any, symbolic: Sequence[str | None] = ("b",),
               constraints: Sequence[str] = ()) -> jax.ShapeDtypeStruct:
  """example_input's shape and dtype with its leading dims named by `symbolic` (None: keep)."""
  shape = tuple(np.shape(example_input))
  if len(symbolic) > len(shape):
    raise ValueError(f"symbolic names {len(symbolic)} dims, the input has {len(shape)}: {shape}")
  dims = [str(d) if i >= len(symbolic) or symbolic[i] is None else str(symbolic[i])
          for i, d in enumerate(shape)]
  sym = jax.export.symbolic_shape(", ".join(dims), constraints=tuple(constraints))
  return jax.ShapeDtypeStruct(tuple(sym), jnp.asarray(example_input).dtype)


def _npz_ready(a: np.ndarray) -> tuple[np.ndarray, str]:
  """(array numpy can store, dtype name); bfloat16 etc. travel as their bits."""
  a = np.asarray(a)
  if a.dtype.kind in "biuf" and a.dtype.name in np.sctypeDict:
    return a, a.dtype.name
  return a.view(f"u{a.dtype.itemsize}"), a.dtype.name


def export(model: nn.Module, variables: Mapping, example_input: Any, path: str | os.PathLike,
           symbolic: Sequence[str | None] = ("b",), constraints: Sequence[str] = (),
           platforms: Sequence[str] | None = None, **apply_kwargs) -> jax.export.Exported:
  """Writes `path`/{exported.bin, weights.npz, meta.json}; returns the `jax.export.Exported`.

  variables: frozen (`dynadiag_jax.freeze`); the `dynadiag` collection (offsets) and any
  other non-params collection are closed over as constants, `params` is the argument.
  example_input: an array (or ShapeDtypeStruct) of the input's shape and dtype; its leading
  dims are named by `symbolic` (e.g. ("b",) for images (B, H, W, C), ("b", "t") for GPT-2
  tokens (B, T); None keeps a dim concrete) with `constraints` such as "t <= 128" (a model
  that compares a symbolic dim with a constant, as GPT-2 checks its context, needs one).
  platforms: lowering platforms (default: the current one); `apply_kwargs` go to
  `model.apply` (e.g. train=False). The exported function is (weights, x) -> model output,
  weights a flat {'path/to/param': array} dict, as stored in weights.npz.
  """
  params, rest = _split(variables)
  flat = _flat(params)

  def infer(weights, x):
    return model.apply({"params": _nested(weights), **rest}, x, **apply_kwargs)

  x_spec = input_spec(example_input, symbolic, constraints)
  w_spec = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.asarray(v).dtype) for k, v in flat.items()}
  exp = jax.export.export(jax.jit(infer), platforms=platforms)(w_spec, x_spec)

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, EXPORTED), "wb") as f:
    f.write(exp.serialize())
  stored, dtypes = {}, {}
  for k, v in flat.items():
    stored[k], dtypes[k] = _npz_ready(np.asarray(v))
  np.savez(os.path.join(path, WEIGHTS), **stored)
  meta = {
      "format": FORMAT,
      "input": {"shape": [str(d) for d in x_spec.shape], "dtype": str(x_spec.dtype),
                "constraints": list(constraints)},
      "output": [{"shape": [str(d) for d in o.shape], "dtype": str(o.dtype)}
                 for o in exp.out_avals],
      "platforms": list(exp.platforms),
      "jax": jax.__version__,
      "weights": {k: {"shape": list(np.shape(v)), "dtype": dtypes[k]} for k, v in flat.items()},
      "weight_bytes": int(sum(np.asarray(v).nbytes for v in flat.values())),
      "exported_bytes": os.path.getsize(os.path.join(path, EXPORTED)),
      "sparse_layers": [SEP.join(p) for p in _frozen_layers(rest.get(COLLECTION, {}))],
  }
  with open(os.path.join(path, META), "w") as f:
    json.dump(meta, f, indent=1)
  return exp


def load(path: str | os.PathLike):
  """fn(x) -> output from an `export` directory: plain jax and numpy, as in docs/EXPORT.md."""
  with open(os.path.join(path, EXPORTED), "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  with open(os.path.join(path, META)) as f:
    dtypes = {k: w["dtype"] for k, w in json.load(f)["weights"].items()}
  with np.load(os.path.join(path, WEIGHTS)) as z:
    weights = {k: z[k] if z[k].dtype.name == dtypes[k] else z[k].view(jnp.dtype(dtypes[k]))
               for k in z.files}
  weights, run = jax.device_put(weights), jax.jit(exp.call)
  return lambda x: run(weights, x)


def dense_model(model: nn.Module) -> nn.Module:
  """`model` with every linear an `nn.Dense` (a default `LayerFactory`): what `densify` feeds."""
  if isinstance(model, DiagDense):
    return nn.Dense(model.features, use_bias=model.use_bias, dtype=model.dtype,
                    param_dtype=model.param_dtype, precision=model.precision)
  if not hasattr(model, "linear"):
    raise ValueError(f"{type(model).__name__} has no `linear` LayerFactory to replace")
  dense = LayerFactory(dtype=model.linear.dtype, param_dtype=model.linear.param_dtype)
  return model.clone(linear=dense)


def densify(model: nn.Module, variables: Mapping, example_input: Any = None) -> dict:
  """Variables of `dense_model(model)`: every frozen DiagDense as nn.Dense {kernel, bias}.

  `dense_model(model).apply(densify(model, variables), x)` equals `model.apply(variables, x)`
  to float rounding. The `dynadiag` collection is dropped, every other collection and every
  other parameter kept. A DiagDense without bias whose kernel is wider than tall does not
  record its output width: pass `example_input` then (shapes are read off the dense model).
  """
  variables = _plain(dict(variables))
  col = variables.get(COLLECTION, {})
  params = _plain(variables["params"])
  dense_shapes = []  # filled once, only when a layer needs it

  def width(path, m, d) -> int:
    if d < m:  # D = N: a tall kernel, n = D * b
      return d
    if example_input is None:
      raise ValueError(f"DiagDense {SEP.join(path)!r} has no bias and a kernel at least as "
                       "wide as tall, so its output width is not recorded: pass example_input")
    if not dense_shapes:
      dense = dense_model(model)
      dense_shapes.append(jax.eval_shape(dense.init, jax.random.PRNGKey(0), example_input))
    node = dense_shapes[0]["params"]
    for key in path:
      node = node[key]
    return int(node["kernel"].shape[1])

  for path in _frozen_layers(col):
    node, layer = col, params
    for key in path:
      node, layer = node[key], layer[key]
    v = layer["values"]
    m = int(np.asarray(node["in_features"]).reshape(-1)[0])
    b = pattern.block_of(v)
    n = int(np.shape(layer["bias"])[0]) if "bias" in layer else width(path, m, np.shape(v)[1] * b)
    new = {k: x for k, x in layer.items() if k != "values"}
    w_MxN = pattern.densify(v, np.asarray(node["offsets"]), m, n, b)
    if "perm" in node:  # x[..., perm] @ W = x @ W[inverse(perm)]
      w_MxN = w_MxN[mixing.inverse(np.asarray(node["perm"]).astype(np.int32))]
    new["kernel"] = w_MxN
    params = _set(params, path, new)
  out = {k: v for k, v in variables.items() if k not in ("params", COLLECTION)}
  out["params"] = params
  return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  if not path:  # the model is one DiagDense
    return value
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
  return out
