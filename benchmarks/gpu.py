"""The GPU check in one command: versions, numerics, ViT-B/16, layer speed, PyTorch peers.

    PYTHONPATH=. timeout 420 python -m benchmarks.gpu --out $OUT/gpu.json   # H100, ~6 min
    PYTHONPATH=. python -m benchmarks.gpu --smoke --out /tmp/gpu.json        # CPU, < 1 min
    python -m benchmarks.gpu --print gpu.json                                # tables again

Runs from the checkout (`PYTHONPATH=.`, nothing installed) with what the GPU machine has:
jax / jaxlib 0.10.2 or 0.11.x, flax, optax, chex, numpy, and optionally torch + triton.
Sections, in order, each in its own subprocess (a crash or a poisoned CUDA context in one
does not take the others down; what a section finished before it died is kept):

- env: python / jax / jaxlib / flax / optax / torch / triton versions, devices, the import
  of every module the check needs (errors caught and reported), modules that must not load
  (tfds, grain, cv2, mlxtend, ml_collections), and one tiny pallas product against dense.
- numerics: y, dx and dvalues of `pallas` and `xla` against `dense` and float64 numpy,
  float32 (TF32 on a GPU) and bfloat16, block 1 / 16 / 32 / 64, frozen offsets (closed
  over, exact host layout) and exploring ones (traced, jittable layout), ViT-B shapes at
  90%; max-norm relative error per product and a pass against `TOL`.
- models: ViT-B/16 (224 px, bfloat16 compute) inference and train step (AdamW), dense
  against the fast recipe frozen and exploring, images/s (helpers of `benchmarks.models`).
- layers: a frozen layer `diag_matmul(x, values, offsets) + bias` with backends `pallas`,
  `xla`, `dense` and the one `auto` picks, against `nn.Dense` (`x @ W + b`), ViT-B shapes,
  90 / 99 / 95% at the fast recipe's block, 197 x {1, 8, 64, 256} rows, forward and
  forward + backward, bfloat16 and float32; medians of interleaved `block_until_ready`
  samples (helpers of `benchmarks.layers`).
- peers: PyTorch 2:4 semi-structured (`to_sparse_semi_structured`, 50%) and block-sparse
  BSR (`to_sparse_bsr`, Triton `bsr_dense_mm`, and `F.linear` on the BSR weight, 90%)
  against `torch.nn.functional.linear`, same shapes, CUDA-event medians;
  "skipped: no torch" where torch does not import.

A time budget (`--budget-s`, default 330 s: the H100 command above leaves 90 s of its 420
for start-up and slack) is shared among the sections; a section past its share skips its
remaining cases with a note, and its subprocess is killed 20 s after it. The JSON (`--out`)
is rewritten after every section; the markdown tables go to stdout as each section ends.
`--smoke` runs every section on tiny shapes (on a CPU the pallas backend runs in
interpret mode, as in the tests), for CI (tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# Run order: correctness first, then the whole model (the headline), then the layer grid
# and the PyTorch peers; numerics and layers have more cases than time and stop at their
# share, so the order decides what a short budget keeps.
SECTIONS = ("env", "numerics", "models", "layers", "peers")
# Share of the budget each section gets (time a section leaves unused passes to the next).
SHARE = {"env": 0.06, "numerics": 0.2, "models": 0.3, "layers": 0.3, "peers": 0.14}
GRACE_S = 20.0        # a section's subprocess is killed this long after its share ends
DEFAULT_BUDGET_S = 330.0
SMOKE_BUDGET_S = 1200.0  # smoke: exercise every case; tests time out on their own

# Max-norm relative error max|got - want| / max|want| allowed per product (y, dx, dv),
# against float64 numpy and against the `dense` backend. README ("Not checked"): on a GPU
# float32 products run on TF32 tensor cores (Triton's default, as XLA's default precision)
# and differ from exact float32 at ~1e-3; TF32 keeps 10 mantissa bits (unit round-off
# 2^-11 ~ 4.9e-4), so 5e-3 is that ~1e-3 with headroom for 1576-row sums. bfloat16 keeps 7
# (2^-8 ~ 3.9e-3 per rounding of inputs and output): 2e-2, the CPU tests' bfloat16
# tolerance (tests/pallas_testing.TOL). Interpret mode on a CPU is exact float32 (~1e-6).
TOL = {"float32": 5e-3, "bfloat16": 2e-2}

# "The fast recipe" is named by issue 22: every encoder linear (qkv, attn_out, mlp_in,
# mlp_out) a DiagDense at 90% with block 64 (each layer the largest valid block up to 64;
# all ViT-B kernels take 64), backend auto (pallas on a GPU for block >= 16).
FAST_RECIPE = {"sparsity": 0.9, "block": 64, "backend": "auto"}

FORBIDDEN = ("tensorflow_datasets", "tensorflow", "grain", "cv2", "mlxtend", "ml_collections")
CHECK_IMPORTS = ("dynadiag_jax", "pallas_kernels", "pallas_kernels.compat", "pallas_kernels.diag",
                 "dynadiag_jax.backends.xla", "dynadiag_jax.models.vit", "benchmarks.layers",
                 "benchmarks.models")
DISTRIBUTIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                 "jax-cuda12-pjrt", "flax", "optax", "chex", "orbax-checkpoint", "numpy",
                 "ml_dtypes", "torch", "triton")

VIT_B = ((768, 768), (768, 3072), (3072, 768))
FULL = {
    "env": {"sanity_blocks": (1, 16)},
    "numerics": {"shapes": [(768, 3072), (3072, 768), (768, 768)], "rows": 1576,
                 "blocks": (64, 16, 1, 32), "dtypes": ("float32", "bfloat16"),
                 "modes": ("frozen", "exploring"), "sparsity": 0.9},
    "layers": {"shapes": list(VIT_B), "rows": (197, 1576, 12608, 50432),
               "sparsities": (0.9, 0.99, 0.95), "dtypes": ("bfloat16", "float32"),
               "modes": ("fwd", "train"), "block": FAST_RECIPE["block"],
               "backends": ("pallas", "xla", "dense"), "repeats": 5, "target_s": 0.02},
    "peers": {"shapes": list(VIT_B), "rows": (197, 1576, 12608, 50432),
              "dtypes": ("bfloat16", "float32"), "modes": ("fwd", "train"),
              "bsr_sparsity": 0.9, "bsr_block": 64, "repeats": 5, "target_s": 0.02},
    "models": {"variant": "B", "image": 224, "batch": 64, "dtype": "bfloat16",
               "num_classes": 1000, "vit": {}, "repeats": 5, "target_s": 0.2},
}
SMOKE = {
    "env": {"sanity_blocks": (16,)},
    # every block, both offset kinds, both dtypes, both orientations, once each
    "numerics": {"cases": [((64, 128), 1, "float32", "frozen"),
                           ((64, 128), 16, "float32", "exploring"),
                           ((128, 64), 32, "bfloat16", "exploring"),
                           ((128, 64), 64, "bfloat16", "frozen")],
                 "rows": 8, "sparsity": 0.9},
    "layers": {"cases": [((64, 128), 8, "fwd", "float32"), ((64, 128), 8, "train", "float32"),
                         ((128, 64), 8, "fwd", "bfloat16"), ((128, 64), 8, "train", "bfloat16")],
               "sparsities": (0.9,), "block": 64, "backends": ("pallas", "xla", "dense"),
               "repeats": 2, "target_s": 0.002},
    "peers": {"shapes": [(64, 128)], "rows": (8,), "dtypes": ("float32",),
              "modes": ("fwd", "train"), "bsr_sparsity": 0.5, "bsr_block": 16, "repeats": 2,
              "target_s": 0.002},
    "models": {"variant": "B", "image": 16, "batch": 2, "dtype": "bfloat16", "num_classes": 10,
               "vit": {"width": 64, "depth": 1, "num_heads": 2, "mlp_dim": 128,
                       "patch_size": 8},
               "repeats": 2, "target_s": 0.002},
}


# -- plumbing -------------------------------------------------------------------------------

def err_line(e: BaseException) -> str:
  """The last line of e's traceback ('Type: message', the message's last line)."""
  lines = [ln for ln in "".join(traceback.format_exception_only(type(e), e)).splitlines()
           if ln.strip()]
  last = lines[-1].strip() if lines else type(e).__name__
  if not last.startswith(type(e).__name__):
    last = f"{type(e).__name__}: {last}"
  return last[:500]


def log(*a) -> None:
  print(*a, file=sys.stderr, flush=True)


class Budget:
  """Seconds left to a section; `over(reserve)` says when to stop starting cases."""

  def __init__(self, seconds: float):
    self.t0 = time.monotonic()
    self.deadline = self.t0 + seconds

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def over(self, reserve: float = 0.0) -> bool:
    return self.left() < reserve

  def elapsed(self) -> float:
    return time.monotonic() - self.t0


class Record:
  """A section's results, written (atomically) to `path` after every case."""

  def __init__(self, name: str, path: str | None):
    self.path = path
    self.data: dict[str, Any] = {"section": name, "status": "running", "cases": [],
                                 "skipped": [], "notes": [], "config": {}}

  def save(self) -> None:
    if not self.path:
      return
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(tmp, self.path)

  def case(self, c: dict) -> None:
    self.data["cases"].append(c)
    self.save()

  def skip(self, what: str, why: str = "over budget") -> None:
    self.data["skipped"].append(f"{what}: {why}")

  def note(self, text: str) -> None:
    self.data["notes"].append(text)


COMPILE_WORKERS = [8]  # --compile-workers


def compile_all(jobs: dict, workers: int | None = None) -> dict:
  """{key: (jitted fn, args)} -> {key: compiled executable or the exception}.

  Tracing and lowering run here (Python); XLA's compiles (Triton kernels, PTX) run in a
  thread pool, so the ~16 cores of the GPU machine compile several programs at once. XLA's
  GEMM autotuning then measures candidates on a shared GPU: `--compile-workers 1` checks
  that this did not bias a timing (slower to compile).
  """
  out, lowered = {}, {}
  for k, (fn, args) in jobs.items():
    try:
      lowered[k] = fn.lower(*args)
    except Exception as e:  # pylint: disable=broad-except
      out[k] = e
  workers = workers or max(1, min(COMPILE_WORKERS[0], os.cpu_count() or 1))
  with ThreadPoolExecutor(workers) as ex:
    futs = {k: ex.submit(lo.compile) for k, lo in lowered.items()}
    for k, fut in futs.items():
      try:
        out[k] = fut.result()
      except Exception as e:  # pylint: disable=broad-except
        out[k] = e
  return out


def _dtype(name: str):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def rel_err(got, want) -> float:
  """max|got - want| / max|want| in float64 (the tests' max-norm relative error)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  g = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  w = np.asarray(want, np.float64)
  if g.shape != w.shape:
    raise ValueError(f"shape {g.shape} against {w.shape}")
  scale = float(np.abs(w).max()) if w.size else 0.0
  return float(np.abs(g - w).max()) / max(scale, 1e-30) if w.size else 0.0


# -- section: env ---------------------------------------------------------------------------

def section_env(rec: Record, budget: Budget, cfg: dict) -> None:
  """Versions, devices, imports; the first thing the device run reports."""
  import importlib  # pylint: disable=import-outside-toplevel
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  d = rec.data
  d["python"] = sys.version.split()[0]
  d["platform"] = platform.platform()
  d["cpus"] = os.cpu_count()
  vers = {}
  for dist in DISTRIBUTIONS:
    try:
      vers[dist] = md.version(dist)
    except md.PackageNotFoundError:
      vers[dist] = None
  d["distributions"] = vers
  rec.save()
  imports = {}
  for mod in ("jax", "jaxlib", "flax", "optax", "chex", "numpy") + CHECK_IMPORTS:
    t = time.perf_counter()
    try:
      m = importlib.import_module(mod)
      imports[mod] = {"ok": True, "version": getattr(m, "__version__", None),
                      "seconds": round(time.perf_counter() - t, 3)}
    except Exception as e:  # pylint: disable=broad-except
      imports[mod] = {"ok": False, "error": err_line(e)}
    d["imports"] = imports
    rec.save()
  d["forbidden_loaded"] = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
  try:
    import jax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel
    d["jax"] = jax.__version__
    d["jaxlib"] = getattr(jaxlib, "__version__", None) or vers.get("jaxlib")
    d["default_backend"] = jax.default_backend()
    d["devices"] = [{"repr": repr(x), "platform": x.platform,
                     "device_kind": getattr(x, "device_kind", None)} for x in jax.devices()]
  except Exception as e:  # pylint: disable=broad-except
    d["devices_error"] = err_line(e)
  try:
    from pallas_kernels import compat  # pylint: disable=import-outside-toplevel
    d["compat"] = {"jax_version": list(compat.JAX_VERSION),
                   "needs_abstract_gpu": compat.needs_abstract_gpu(),
                   "triton_compiler_params": type(compat.triton_compiler_params()).__module__
                   + "." + type(compat.triton_compiler_params()).__name__}
  except Exception as e:  # pylint: disable=broad-except
    d["compat"] = {"error": err_line(e)}
  d["nvidia_smi"] = _nvidia_smi()
  rec.save()
  # One tiny product per backend through the custom_vjp, against float64.
  try:
    d["sanity"] = _sanity(cfg.get("sanity_blocks", (1, 16)))
  except Exception as e:  # pylint: disable=broad-except
    d["sanity"] = {"error": err_line(e)}
  rec.save()


def _nvidia_smi() -> str | None:
  import shutil  # pylint: disable=import-outside-toplevel
  exe = shutil.which("nvidia-smi")
  if not exe:
    return None
  try:
    return subprocess.run(
        [exe, "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
  except Exception as e:  # pylint: disable=broad-except
    return err_line(e)


def _sanity(blocks) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dynadiag_jax import pattern  # pylint: disable=import-outside-toplevel
  from tests.pallas_testing import reference  # pylint: disable=import-outside-toplevel
  out = {}
  rng = np.random.default_rng(0)
  m, n, rows = 128, 64, 40
  for b in blocks:
    geo = pattern.Geometry(m, n, b)
    k = pattern.num_kept(m, n, 0.75, b)
    o = np.sort(rng.choice(geo.P, k, replace=False)).astype(np.int32)
    x, v, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                for s in ((rows, m), geo.values_shape(k), (rows, n)))
    want = reference(x, v, o, m, n, dy, b)
    for be in ("pallas", "xla", "dense"):
      t = time.perf_counter()
      try:
        got = jax.block_until_ready(_products_fn(m, n, be, o)(x, v, dy))
        out[f"b{b} {be}"] = {"max_rel_err": max(rel_err(g, w) for g, w in zip(got, want)),
                             "seconds": round(time.perf_counter() - t, 2)}
      except Exception as e:  # pylint: disable=broad-except
        out[f"b{b} {be}"] = {"error": err_line(e)}
  return out


# -- section: numerics ----------------------------------------------------------------------

def _numerics_cases(cfg: dict) -> list[tuple]:
  if "cases" in cfg:
    return [tuple(c) for c in cfg["cases"]]
  # the first shape through every dtype and block first: a short budget keeps breadth
  return [(tuple(s), b, dt, md) for s in cfg["shapes"] for dt in cfg["dtypes"]
          for b in cfg["blocks"] for md in cfg["modes"]]


def _products_fn(m: int, n: int, backend: str, o_static):
  """jit((x, v, [o,] dy) -> (y, dx, dv)) through diag_matmul's custom_vjp; frozen offsets
  (`o_static`, numpy) closed over, exploring ones an argument (traced)."""
  import jax  # pylint: disable=import-outside-toplevel
  from dynadiag_jax import ops  # pylint: disable=import-outside-toplevel

  def products(x, v, o, dy):
    y, vjp = jax.vjp(lambda x, v: ops.diag_matmul(x, v, o, m, n, backend), x, v)
    return (y, *vjp(dy))

  if o_static is not None:
    return jax.jit(lambda x, v, dy: products(x, v, o_static, dy))
  return jax.jit(products)


def section_numerics(rec: Record, budget: Budget, cfg: dict) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dynadiag_jax import pattern  # pylint: disable=import-outside-toplevel
  from tests.pallas_testing import reference  # pylint: disable=import-outside-toplevel
  rows, s = cfg["rows"], cfg["sparsity"]
  rec.data["config"] = {"rows": rows, "sparsity": s, "tolerance": TOL,
                        "metric": "max|got - want| / max|want|, float64",
                        "platform": jax.default_backend(),
                        "pallas_interpret": jax.default_backend() not in ("gpu", "cuda", "rocm")}
  # one group per (shape, block, dtype): both offset kinds share inputs and the reference
  groups = collections.OrderedDict()
  for shape, b, dt, md in _numerics_cases(cfg):
    groups.setdefault((tuple(shape), b, dt), []).append(md)
  last_s = 0.0  # how long the last group took: do not start one that cannot finish
  for gi, ((shape, b, dt), modes) in enumerate(groups.items()):
    m, n = shape
    label = f"{m}x{n} b{b} {dt}"
    if budget.over(reserve=max(5.0, 0.8 * last_s)):
      for md in modes:
        rec.skip(f"numerics {label} {md}")
      continue
    log(f"  numerics {gi + 1}/{len(groups)}: {label} {'/'.join(modes)}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(1000 + gi)
    geo = pattern.Geometry(m, n, b)
    k = pattern.num_kept(m, n, s, b)
    o = np.sort(rng.choice(geo.P, k, replace=False)).astype(np.int32)
    dtype = _dtype(dt)
    x, v, dy = (jnp.asarray(rng.standard_normal(sh), dtype)
                for sh in ((rows, m), geo.values_shape(k), (rows, n)))
    want = reference(x, v, o, m, n, dy, b)  # float64 of the (rounded) inputs
    jobs = {}
    for md in modes:
      for be in ("dense", "pallas", "xla"):
        if md == "frozen":
          jobs[(md, be)] = (_products_fn(m, n, be, o), (x, v, dy))
        else:
          jobs[(md, be)] = (_products_fn(m, n, be, None), (x, v, jnp.asarray(o), dy))
    compiled = compile_all(jobs)
    for md in modes:
      case = {"shape": [m, n], "block": b, "K": k, "P": geo.P, "dtype": dt, "offsets": md,
              "rows": rows, "tol": TOL[dt], "errors": {}, "vs_dense": {}, "vs_f64": {}}
      outs = {}
      for be in ("dense", "pallas", "xla"):
        c = compiled[(md, be)]
        args = jobs[(md, be)][1]
        try:
          if isinstance(c, Exception):
            raise c
          outs[be] = jax.block_until_ready(c(*args))
        except Exception as e:  # pylint: disable=broad-except
          case["errors"][be] = err_line(e)
      for be, got in outs.items():
        case["vs_f64"][be] = dict(zip(("y", "dx", "dv"), (rel_err(g, w) for g, w in zip(got, want))))
        if be != "dense" and "dense" in outs:
          case["vs_dense"][be] = dict(zip(("y", "dx", "dv"),
                                          (rel_err(g, w) for g, w in zip(got, outs["dense"]))))
      worst = [e for be in ("pallas", "xla") for d_ in (case["vs_f64"].get(be, {}),
                                                         case["vs_dense"].get(be, {}))
               for e in d_.values()]
      case["max_err"] = max(worst) if worst else None
      case["pass"] = (not case["errors"] and len(worst) == 12 and max(worst) <= TOL[dt])
      case["seconds"] = round(time.perf_counter() - t0, 2)
      rec.case(case)
    last_s = time.perf_counter() - t0
    del compiled, jobs


# -- section: layers ------------------------------------------------------------------------

def layers_per_call_gpu(rows: int) -> int:
  """R distinct layers per timed call: enough that ~20 us of dispatch does not hide the
  smaller products (as benchmarks.layers.layers_per_call does on a CPU)."""
  return 4 if rows <= 2048 else 1


def _calls_per_sample(vs: dict, target_s: float, base: str) -> int:
  """n back-to-back calls per sample: `base`'s sample >= target_s (as
  benchmarks.layers.calls_per_sample), but no variant's sample over 10 x target_s, so that
  a variant many times slower than the base does not eat the budget."""
  import jax  # pylint: disable=import-outside-toplevel
  one = {}
  for k, (fn, p, xs) in vs.items():
    t = time.perf_counter()
    jax.block_until_ready(fn(p, xs))
    one[k] = max(time.perf_counter() - t, 1e-7)
  calls = math.ceil(target_s / one[base])
  return max(1, min(calls, int(10 * target_s / max(one.values()))))


def _layer_cases(cfg: dict) -> list[tuple]:
  """(sparsity, dtype, mode, (m, n), rows) in the order run: every 90% case first."""
  if "cases" in cfg:
    return [(s, dt, md, tuple(sh), r) for s in cfg["sparsities"]
            for sh, r, md, dt in cfg["cases"]]
  return [(s, dt, md, tuple(sh), r) for s in cfg["sparsities"] for dt in cfg["dtypes"]
          for md in cfg["modes"] for sh in cfg["shapes"] for r in cfg["rows"]]


def _layer_jit(apply: Callable, mode: str):
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import layers  # pylint: disable=import-outside-toplevel
  if mode == "fwd":
    return jax.jit(lambda ps, xs: [apply(p, x) for p, x in zip(ps, xs)])
  return jax.jit(jax.value_and_grad(layers._loss(apply), argnums=(0, 1)))  # pylint: disable=protected-access


def section_layers(rec: Record, budget: Budget, cfg: dict) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import layers  # pylint: disable=import-outside-toplevel
  from dynadiag_jax import ops, pattern  # pylint: disable=import-outside-toplevel
  backends, block = tuple(cfg["backends"]), cfg["block"]
  rec.data["config"] = {"block": block, "backends": list(backends), "repeats": cfg["repeats"],
                        "sample_s": cfg["target_s"], "platform": jax.default_backend(),
                        "timing": "median of interleaved samples; a sample = n back-to-back "
                                  "calls then block_until_ready; R distinct layers per call "
                                  "(R = 4 up to 2048 rows, else 1); ms are per layer"}
  cases = _layer_cases(cfg)
  # compile by groups that share (sparsity, dtype, mode, shape): all row counts at once
  groups = collections.OrderedDict()
  for c in cases:
    groups.setdefault(c[:4], []).append(c[4])
  dense_cache: dict = {}  # (dtype, mode, shape, rows) -> (compiled, params, xs)
  last_s = 0.0  # how long the last group took: do not start one that cannot finish
  for (s, dt, md, (m, n)), rows_l in groups.items():
    label = f"{m}x{n} {md} {dt} s={s:g}"
    if budget.over(reserve=max(8.0, 0.8 * last_s)):
      for r in rows_l:
        rec.skip(f"layers {label} rows {r}")
      continue
    log(f"  layers {label}: rows {rows_l}")
    dtype = _dtype(dt)
    b = pattern.largest_block(m, n, block)
    geo = pattern.Geometry(m, n, b)
    k = pattern.num_kept(m, n, s, b)
    jobs, inputs = {}, {}
    for rows in rows_l:
      rng = np.random.default_rng(rows * 7 + m + 3 * n)
      r_ = layers_per_call_gpu(rows)
      xs = [jnp.asarray(rng.standard_normal((rows, m)), dtype) for _ in range(r_)]
      bias = [jnp.zeros((n,), dtype) for _ in range(r_)]
      dkey = (dt, md, (m, n), rows)
      if dkey not in dense_cache:
        wb = [(jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(m), dtype), c) for c in bias]
        jobs[(rows, "nn.Dense")] = (_layer_jit(lambda p, x: x @ p[0] + p[1], md), (wb, xs))
        inputs[(rows, "nn.Dense")] = (wb, xs)
      o = np.sort(rng.choice(geo.P, k, replace=False)).astype(np.int32)
      vb = [(jnp.asarray(rng.standard_normal(geo.values_shape(k)) / np.sqrt(k * b), dtype), c)
            for c in bias]
      for be in backends:
        apply = (lambda be_, o_: lambda p, x: ops.diag_matmul(x, p[0], o_, m, n, be_) + p[1])(be, o)
        jobs[(rows, be)] = (_layer_jit(apply, md), (vb, xs))
        inputs[(rows, be)] = (vb, xs)
    t0 = time.perf_counter()
    compiled = compile_all(jobs)
    compile_s = time.perf_counter() - t0
    for rows in rows_l:
      case = {"shape": [m, n], "rows": rows, "mode": md, "dtype": dt, "sparsity": s,
              "block": b, "K": k, "P": geo.P, "R": layers_per_call_gpu(rows), "errors": {},
              "ms": {}, "speedup": {}, "group_compile_s": round(compile_s, 1)}
      if budget.over(reserve=3.0):
        rec.skip(f"layers {label} rows {rows}")
        continue
      vs = {}
      dkey = (dt, md, (m, n), rows)
      if dkey in dense_cache:
        vs["nn.Dense"] = dense_cache[dkey]
      for name in ("nn.Dense",) + backends:
        if name == "nn.Dense" and "nn.Dense" in vs:
          continue
        c = compiled[(rows, name)]
        p, xs = inputs[(rows, name)]
        try:
          if isinstance(c, Exception):
            raise c
          jax.block_until_ready(c(p, xs))
          vs[name] = (c, p, xs)
        except Exception as e:  # pylint: disable=broad-except
          case["errors"][name] = err_line(e)
      if "nn.Dense" not in vs:
        rec.case(case)
        continue
      dense_cache[dkey] = vs["nn.Dense"]
      try:
        calls = _calls_per_sample(vs, cfg["target_s"], "nn.Dense")
        med = layers.time_round_robin(vs, cfg["repeats"], calls)
      except Exception as e:  # pylint: disable=broad-except
        case["errors"]["timing"] = err_line(e)
        rec.case(case)
        continue
      r_ = case["R"]
      case["calls_per_sample"] = calls
      case["ms"] = {kname: t / r_ * 1e3 for kname, t in med.items()}
      case["speedup"] = {kname: med["nn.Dense"] / t for kname, t in med.items() if kname != "nn.Dense"}
      try:
        case["auto"] = ops.resolve_backend("auto", geo, rows, k).name
      except Exception as e:  # pylint: disable=broad-except
        case["errors"]["auto"] = err_line(e)
      rec.case(case)
    last_s = time.perf_counter() - t0
    del compiled, jobs, inputs


# -- section: peers (PyTorch) ---------------------------------------------------------------

def _torch_time(torch, fns: dict, repeats: int, target_s: float, cuda: bool) -> dict:
  """Median seconds per call of each fn, interleaved; CUDA events on a GPU."""
  def sync():
    if cuda:
      torch.cuda.synchronize()

  one = {}
  for k, fn in fns.items():  # one call each: F.linear sets n, the slowest caps it
    sync()
    t = time.perf_counter()
    fn()
    sync()
    one[k] = max(time.perf_counter() - t, 1e-7)
  calls = max(1, min(math.ceil(target_s / one["F.linear"]),
                     int(10 * target_s / max(one.values()))))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      if cuda:
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
        for _ in range(calls):
          fn()
        ev1.record()
        ev1.synchronize()
        times[k].append(ev0.elapsed_time(ev1) / 1e3 / calls)
      else:
        t = time.perf_counter()
        for _ in range(calls):
          fn()
        times[k].append((time.perf_counter() - t) / calls)
  return {k: statistics.median(v) for k, v in times.items()}, calls


def section_peers(rec: Record, budget: Budget, cfg: dict) -> None:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    rec.data["status_override"] = "skipped"
    rec.note(f"skipped: no torch ({err_line(e)})")
    return
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dynadiag_jax import pattern  # pylint: disable=import-outside-toplevel
  fnn = torch.nn.functional
  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  try:
    import triton  # pylint: disable=import-outside-toplevel
    triton_v = triton.__version__
  except Exception as e:  # pylint: disable=broad-except
    triton_v = f"not importable: {err_line(e)}"
  rec.data["config"] = {
      "torch": torch.__version__, "triton": triton_v, "cuda": cuda,
      "device": torch.cuda.get_device_name(0) if cuda else "cpu",
      "bsr_sparsity": cfg["bsr_sparsity"], "bsr_block": cfg["bsr_block"],
      "bsr_pattern": "block-diagonals (as the fast recipe's layer: same kept blocks)",
      "timing": "CUDA events (perf_counter on a CPU), median of interleaved samples of n "
                "back-to-back calls; ms per layer",
      "train": "F.linear: grads of x and W; 2:4 and BSR: PyTorch has no weight gradient for "
               "these formats, so only dx (where supported)"}
  torch.backends.cuda.matmul.allow_tf32 = True  # as jax's default precision on a GPU (TF32)
  try:
    from torch.sparse import to_sparse_semi_structured  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    to_sparse_semi_structured = None
    rec.note(f"no to_sparse_semi_structured: {err_line(e)}")
  try:
    from torch.sparse._triton_ops import bsr_dense_mm  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    bsr_dense_mm = None
    rec.note(f"no torch.sparse._triton_ops.bsr_dense_mm: {err_line(e)}")
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}
  cases = [(dt, md, tuple(sh), r) for dt in cfg["dtypes"] for md in cfg["modes"]
           for sh in cfg["shapes"] for r in cfg["rows"]]
  for dt, md, (m, n), rows in cases:
    label = f"{m}x{n} rows {rows} {md} {dt}"
    if budget.over(reserve=3.0):
      rec.skip(f"peers {label}")
      continue
    log(f"  peers {label}")
    case = {"shape": [m, n], "rows": rows, "mode": md, "dtype": dt, "errors": {}, "ms": {},
            "speedup": {}, "notes": []}
    g = torch.Generator(device="cpu").manual_seed(rows + m + n)
    dtype = tdt[dt]
    train = md == "train"
    x = torch.randn(rows, m, generator=g).to(dev, dtype)
    w = (torch.randn(n, m, generator=g) / math.sqrt(m)).to(dev, dtype)  # (out, in) as torch
    fns = {}
    xg = x.clone().requires_grad_(train)
    wg = w.clone().requires_grad_(train)

    def step(f, inp):
      def run():
        y = f(inp)
        if train:
          y.float().pow(2).mean().backward()
        return y
      return run

    fns["F.linear"] = step(lambda a: fnn.linear(a, wg), xg)
    dense_of = {}  # variant -> the dense (out, in) weight it stands for (numerics check)
    # 2:4 semi-structured: in every 4 consecutive inputs of an output row keep 2 at random
    try:
      if to_sparse_semi_structured is None:
        raise RuntimeError("to_sparse_semi_structured unavailable")
      keep = torch.rand(n, m // 4, 4, generator=g).argsort(-1).argsort(-1) < 2
      w24 = (w.cpu() * keep.reshape(n, m)).to(dev, dtype)
      ws = to_sparse_semi_structured(w24)
      fns["2:4"] = step(lambda a: fnn.linear(a, ws), x.clone().requires_grad_(train))
      dense_of["2:4"] = w24
    except Exception as e:  # pylint: disable=broad-except
      case["errors"]["2:4"] = err_line(e)
    # BSR at bsr_sparsity: the block-diagonal pattern of a DiagDense (b x b blocks)
    b = cfg["bsr_block"]
    try:
      geo = pattern.Geometry(m, n, b)
      k = pattern.num_kept(m, n, cfg["bsr_sparsity"], b)
      o = np.sort(np.random.default_rng(rows).choice(geo.P, k, replace=False))
      rows_pk, cols_pk = pattern.diagonal_coords(m, n, b)
      mask = np.zeros((m // b, n // b), bool)
      mask[rows_pk[o], cols_pk[o]] = True
      full = np.kron(mask, np.ones((b, b), bool))  # (m, n) in our (in, out) layout
      wb = (w.cpu() * torch.from_numpy(full.T.copy())).to(dev, dtype)
      w_bsr = wb.to_sparse_bsr((b, b))
      case["bsr_blocks"] = int(mask.sum())
      rows_pad = -(-rows // 16) * 16  # bsr_dense_mm wants the dense columns % 16 == 0
      if bsr_dense_mm is not None:
        xp = torch.zeros(rows_pad, m, device=dev, dtype=dtype)
        xp[:rows] = x
        fns["BSR bsr_dense_mm"] = step(lambda a: bsr_dense_mm(w_bsr, a.t()).t(),
                                       xp.clone().requires_grad_(train))
        dense_of["BSR bsr_dense_mm"] = wb
        if rows_pad != rows:
          case["notes"].append(f"BSR bsr_dense_mm on {rows_pad} rows (padded to 16)")
      fns["BSR F.linear"] = step(lambda a: fnn.linear(a, w_bsr), x.clone().requires_grad_(train))
      dense_of["BSR F.linear"] = wb
    except Exception as e:  # pylint: disable=broad-except
      case["errors"]["BSR"] = err_line(e)
    ok = {}
    case["max_rel_err"] = {}  # forward output against F.linear on the same dense weight
    for name, fn in fns.items():  # warm up (Triton compiles here), drop what fails
      try:
        got = fn()
        if cuda:
          torch.cuda.synchronize()
        ok[name] = fn
        if name in dense_of:
          with torch.no_grad():
            want = fnn.linear(x, dense_of[name]).float()
            got = got.detach()[:rows].float()
            case["max_rel_err"][name] = float((got - want).abs().max() / want.abs().max())
      except Exception as e:  # pylint: disable=broad-except
        case["errors"][name] = err_line(e)
    if "F.linear" in ok:
      try:
        med, calls = _torch_time(torch, ok, cfg["repeats"], cfg["target_s"], cuda)
        case["calls_per_sample"] = calls
        case["ms"] = {k_: t * 1e3 for k_, t in med.items()}
        case["speedup"] = {k_: med["F.linear"] / t for k_, t in med.items() if k_ != "F.linear"}
      except Exception as e:  # pylint: disable=broad-except
        case["errors"]["timing"] = err_line(e)
    rec.case(case)
    del fns, ok


# -- section: models ------------------------------------------------------------------------

def build_models(cfg: dict, key) -> tuple[dict, dict]:
  """{name: (kind, jitted fn, state)} as `benchmarks.models.build`, at cfg's dtype and size:
  the dense ViT, the fast recipe frozen (offsets closed over) and exploring (K_active = K,
  alpha random, offsets traced from it)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import dynadiag_jax as dd  # pylint: disable=import-outside-toplevel
  from benchmarks import models as bm  # pylint: disable=import-outside-toplevel
  from dynadiag_jax.layers import LayerFactory  # pylint: disable=import-outside-toplevel
  from dynadiag_jax.models.vit import ViT  # pylint: disable=import-outside-toplevel
  b, img = cfg["batch"], cfg["image"]
  dtype = _dtype(cfg["dtype"])
  x = jax.random.normal(key, (b, img, img, 3), jnp.float32)
  y = jax.random.randint(key, (b,), 0, cfg["num_classes"])
  tx = optax.adamw(1e-4)
  kw = dict(cfg["vit"], num_classes=cfg["num_classes"], dtype=dtype)
  dense = ViT(cfg["variant"], **kw)
  fac = LayerFactory.from_dict({name: FAST_RECIPE["sparsity"] for name in bm.LINEARS},
                               block=FAST_RECIPE["block"], backend=FAST_RECIPE["backend"])
  sparse = ViT(cfg["variant"], linear=fac, **kw)
  vd = jax.jit(dense.init)(key, x[:1])  # one compile, not one per initializer op
  ve = jax.jit(sparse.init)(key, x[:1])
  p_e, r_e = bm._split(ve)  # pylint: disable=protected-access
  p_e = jax.tree_util.tree_map_with_path(
      lambda path, a: jax.random.normal(key, a.shape) if path[-1].key == "alpha" else a, p_e)
  ve = {"params": p_e, **r_e}
  vf, _ = dd.freeze(ve)
  exploring = dd.with_phase(sparse, level=0.0)
  out = {}
  for name, model, v, closed in (("dense", dense, vd, False), ("frozen", sparse, vf, True),
                                 ("exploring", exploring, ve, False)):
    p, rest = bm._split(v)  # pylint: disable=protected-access
    out[f"infer {name}"] = ("infer", bm._infer(model, rest, closed), [p, x])  # pylint: disable=protected-access
    out[f"train {name}"] = ("train", bm._train(model, rest, closed, tx),  # pylint: disable=protected-access
                            [p, tx.init(p), x, y])
  info = {"params": {name: int(sum(a.size for a in jax.tree.leaves(v["params"])))
                     for name, v in (("dense", vd), ("frozen", vf), ("exploring", ve))}}
  try:
    t = dd.totals(sparse, vf, x[:1])
    info["frozen_totals"] = {k: v for k, v in t.items() if not isinstance(v, (list, dict))}
  except Exception as e:  # pylint: disable=broad-except
    info["frozen_totals"] = err_line(e)
  return out, info


def section_models(rec: Record, budget: Budget, cfg: dict) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import models as bm  # pylint: disable=import-outside-toplevel
  rec.data["config"] = {k: v for k, v in cfg.items() if k != "vit"} | {
      "vit_overrides": cfg["vit"], "fast_recipe": FAST_RECIPE, "linears": list(bm.LINEARS),
      "platform": jax.default_backend(),
      "timing": "median of interleaved samples of n back-to-back calls (block_until_ready); "
                "train = loss, grads, AdamW update; inputs float32 images, compute in dtype"}
  t0 = time.perf_counter()
  vs, info = build_models(cfg, jax.random.PRNGKey(0))
  rec.data["models"] = info
  rec.data["build_s"] = round(time.perf_counter() - t0, 1)
  rec.save()
  # dense and frozen first (they make the table), exploring second
  order = [("infer dense", "infer frozen", "train dense", "train frozen"),
           ("train exploring", "infer exploring")]
  timed: dict = {}
  results = {}
  last_s = 0.0  # the last group's compile + timing: do not start one that cannot finish
  for group in order:
    if budget.over(reserve=max(15.0, 1.1 * last_s)):
      for name in group:
        rec.skip(f"models {name}")
      continue
    log(f"  models: compiling {', '.join(group)}")
    t0 = time.perf_counter()
    compiled = compile_all({name: (vs[name][1], vs[name][2]) for name in group})
    compile_s = time.perf_counter() - t0
    for name in group:
      kind, _, state = vs[name]
      c = compiled[name]
      entry = {"name": name, "kind": kind, "compile_s_group": round(compile_s, 1)}
      try:
        if isinstance(c, Exception):
          raise c
        jax.block_until_ready(bm._call(kind, c, state))  # pylint: disable=protected-access
        timed[name] = (kind, c, state)
      except Exception as e:  # pylint: disable=broad-except
        entry["error"] = err_line(e)
      results[name] = entry
    # time everything compiled so far, interleaved, so dense and sparse share conditions
    if budget.over(reserve=5.0) or not timed:
      continue
    # time_round_robin calls fn(p, xs): here fn(state, None) runs one call of a variant
    vsd = {name: ((lambda st, _, kind=kind, fn=fn: bm._call(kind, fn, st)), state, None)  # pylint: disable=protected-access
           for name, (kind, fn, state) in timed.items()}
    med, calls = _time_models(vsd, cfg["repeats"], cfg["target_s"])
    for name, t in med.items():
      results[name].update(seconds=t, images_per_s=cfg["batch"] / t, calls_per_sample=calls)
    last_s = time.perf_counter() - t0
    rec.data["cases"] = [results[k] for k in results]
    rec.save()
  rec.data["cases"] = [results[k] for k in results]
  for kind in ("infer", "train"):
    base = results.get(f"{kind} dense", {}).get("seconds")
    for name in ("frozen", "exploring"):
      r = results.get(f"{kind} {name}", {})
      if base and r.get("seconds"):
        r["speedup"] = base / r["seconds"]
  rec.save()


def _time_models(vs: dict, repeats: int, target_s: float):
  """(median seconds per call of each variant, calls per sample) by
  `benchmarks.layers.time_round_robin`; calls per sample from the first variant's time,
  capped so that no variant's sample passes 10 x target_s."""
  from benchmarks import layers  # pylint: disable=import-outside-toplevel
  calls = _calls_per_sample(vs, target_s, next(iter(vs)))
  return layers.time_round_robin(vs, repeats, calls), calls


SECTION_FNS = {"env": section_env, "numerics": section_numerics, "layers": section_layers,
               "peers": section_peers, "models": section_models}


def run_section(name: str, out_path: str | None, seconds: float, smoke: bool) -> int:
  """One section in this process; its record saved to out_path as it goes."""
  rec = Record(name, out_path)
  rec.data["smoke"] = smoke
  rec.data["compile_workers"] = COMPILE_WORKERS[0]
  budget = Budget(seconds)
  cfg = (SMOKE if smoke else FULL).get(name, {})
  rec.save()
  rc = 0
  try:
    SECTION_FNS[name](rec, budget, cfg)
    rec.data["status"] = rec.data.pop("status_override", "ok")
  except BaseException as e:  # pylint: disable=broad-except
    rec.data["status"] = "error"
    rec.data["error"] = err_line(e)
    rec.data["traceback"] = traceback.format_exc()[-4000:]
    log(traceback.format_exc())
    rc = 1
  rec.data["seconds"] = round(budget.elapsed(), 1)
  rec.save()
  return rc


# -- the driver -----------------------------------------------------------------------------

def _tee(stream, sink, tail: collections.deque) -> None:
  for line in iter(stream.readline, ""):
    sink.write(line)
    sink.flush()
    tail.append(line.rstrip("\n"))
  stream.close()


class Terminated(BaseException):
  """The driver got SIGTERM (the outer `timeout`)."""


def _on_term(signum, frame) -> None:  # pylint: disable=unused-argument
  raise Terminated()


def _kill_group(proc) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)  # the section's own process group (its session)
  except (ProcessLookupError, PermissionError):
    pass


def run_child(name: str, seconds: float, smoke: bool, tmpdir: str) -> dict:
  """One section in a subprocess, killed GRACE_S after its share; its record, completed."""
  path = os.path.join(tmpdir, f"{name}.json")
  cmd = [sys.executable, "-m", "benchmarks.gpu", "--section", name, "--section-out", path,
         "--section-seconds", f"{seconds:.1f}", "--compile-workers", str(COMPILE_WORKERS[0])]
  cmd += ["--smoke"] if smoke else []
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  t0 = time.monotonic()
  tail: collections.deque = collections.deque(maxlen=60)
  proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  th = threading.Thread(target=_tee, args=(proc.stderr, sys.stderr, tail), daemon=True)
  th.start()
  killed = terminated = False
  try:
    rc = proc.wait(timeout=seconds + GRACE_S)
  except subprocess.TimeoutExpired:
    killed = True
    _kill_group(proc)
    rc = proc.wait()
  except Terminated:  # take the running section with us, keep what it wrote
    terminated = True
    _kill_group(proc)
    rc = proc.wait()
  th.join(timeout=5)
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    data = {"section": name, "cases": [], "skipped": [], "notes": [], "config": {}}
  data["wall_s"] = round(time.monotonic() - t0, 1)
  data["budget_s"] = round(seconds, 1)
  data["returncode"] = rc
  if terminated:
    data["status"] = "killed"
    data["terminated"] = True
    data["error"] = "the driver got SIGTERM (outer timeout); partial results kept"
  elif killed:
    data["status"] = "killed"
    data["error"] = f"killed {GRACE_S:.0f} s after its {seconds:.0f} s share (partial results kept)"
  elif rc != 0 and data.get("status") in (None, "running", "ok"):
    data["status"] = "error"
    last = next((ln for ln in reversed(tail) if ln.strip()), "")
    why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
    data["error"] = f"{why}: {last}"[:500]
  return data


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, interpret mode)")
  ap.add_argument("--out", default="gpu_bench.json", help="JSON results (rewritten per section)")
  ap.add_argument("--budget-s", type=float, default=None,
                  help=f"seconds for all sections (default {DEFAULT_BUDGET_S:g}, smoke "
                       f"{SMOKE_BUDGET_S:g})")
  ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list, in run order")
  ap.add_argument("--compile-workers", type=int, default=8,
                  help="threads compiling programs at once (1: no concurrent autotuning)")
  ap.add_argument("--inprocess", action="store_true",
                  help="run the sections in this process (debugging; no crash isolation)")
  ap.add_argument("--print", dest="print_file", default=None,
                  help="print the tables of a saved JSON and exit")
  ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--section-out", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--section-seconds", type=float, default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  COMPILE_WORKERS[0] = max(1, args.compile_workers)

  if args.print_file:
    with open(args.print_file) as f:
      res = json.load(f)
    for name in res.get("sections", {}):
      print(render(name, res["sections"][name]))
    return 0
  if args.section:  # a child
    return run_section(args.section, args.section_out, args.section_seconds or 60.0, args.smoke)

  names = [s for s in args.sections.split(",") if s]
  for s in names:
    if s not in SECTIONS:
      ap.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
  budget_s = args.budget_s or (SMOKE_BUDGET_S if args.smoke else DEFAULT_BUDGET_S)
  t0 = time.monotonic()
  res = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu"]
                             + (argv if argv is not None else sys.argv[1:])),
         "smoke": args.smoke, "budget_s": budget_s, "tolerance": TOL,
         "fast_recipe": FAST_RECIPE, "compile_workers": COMPILE_WORKERS[0],
         "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def save():
    res["wall_s"] = round(time.monotonic() - t0, 1)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, out)

  signal.signal(signal.SIGTERM, _on_term)
  print(f"# dynadiag-jax GPU check{' (smoke)' if args.smoke else ''}: "
        f"budget {budget_s:g} s, sections {', '.join(names)}\n", flush=True)
  with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmpdir:
    for i, name in enumerate(names):
      left = budget_s - (time.monotonic() - t0)
      share = left * SHARE[name] / sum(SHARE[s] for s in names[i:])
      if share < 3.0:
        data = {"section": name, "status": "skipped", "cases": [], "skipped": [],
                "notes": [f"skipped: {left:.0f} s of the budget left"], "config": {}}
      elif args.inprocess:
        path = os.path.join(tmpdir, f"{name}.json")
        run_section(name, path, share, args.smoke)
        with open(path) as f:
          data = json.load(f)
      else:
        log(f"== {name} (share {share:.0f} s)")
        data = run_child(name, share, args.smoke, tmpdir)
      res["sections"][name] = data
      save()
      print(render(name, data), flush=True)
      if data.get("terminated"):
        print(f"terminated; wrote {out} ({res['wall_s']:.0f} s)", flush=True)
        return 124
  print(f"wrote {out} ({res['wall_s']:.0f} s)", flush=True)
  return 0


# -- markdown -------------------------------------------------------------------------------

def _f(x, fmt="{:.3g}") -> str:
  return "-" if x is None else fmt.format(x)


def _status(name: str, d: dict) -> str:
  s = f"**{name}**: {d.get('status', '?')}"
  if d.get("seconds") is not None or d.get("wall_s") is not None:
    s += f", {d.get('wall_s', d.get('seconds'))} s"
  if d.get("budget_s") is not None:
    s += f" (share {d['budget_s']} s)"
  if d.get("error"):
    s += f"; error: `{d['error']}`"
  lines = [s]
  for n in d.get("notes", []):
    lines.append(f"- {n}")
  if d.get("skipped"):
    lines.append(f"- skipped {len(d['skipped'])} cases (over budget), e.g. {d['skipped'][0]}")
  return "\n".join(lines)


def render(name: str, d: dict) -> str:
  """Markdown of one section's record."""
  out = [f"## {name}", "", _status(name, d), ""]
  try:
    out += RENDER[name](d)
  except Exception as e:  # pylint: disable=broad-except
    out.append(f"(cannot render: {err_line(e)})")
  return "\n".join(out) + "\n"


def _render_env(d: dict) -> list[str]:
  rows = [("python", d.get("python")), ("platform", d.get("platform")), ("cpus", d.get("cpus")),
          ("jax / jaxlib", f"{d.get('jax')} / {d.get('jaxlib')}"),
          ("default backend", d.get("default_backend")),
          ("devices", "; ".join(f"{x['device_kind']}" for x in d.get("devices", [])) or
           d.get("devices_error")),
          ("nvidia-smi", d.get("nvidia_smi")), ("compat", d.get("compat")),
          ("forbidden modules loaded", d.get("forbidden_loaded"))]
  rows += [(f"dist {k}", v) for k, v in (d.get("distributions") or {}).items() if v]
  rows += [(f"import {k}", "ok" if v.get("ok") else v.get("error"))
           for k, v in (d.get("imports") or {}).items()]
  rows += [(f"sanity {k}", _f(v.get("max_rel_err")) if "error" not in v else v["error"])
           for k, v in (d.get("sanity") or {}).items()]
  return ["| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _render_numerics(d: dict) -> list[str]:
  out = ["| kernel | block | K / P | dtype | offsets | backend | y vs dense | dx vs dense "
         "| dv vs dense | y vs f64 | dx vs f64 | dv vs f64 | tol | pass |",
         "|---" * 14 + "|"]
  for c in d.get("cases", []):
    for be in ("dense", "pallas", "xla"):
      if be in c.get("errors", {}):
        out.append(f"| {c['shape'][0]}x{c['shape'][1]} | {c['block']} | {c['K']} / {c['P']} | "
                   f"{c['dtype']} | {c['offsets']} | {be} | error: {c['errors'][be]} "
                   "| | | | | | | no |")
        continue
      vd, vf = c["vs_dense"].get(be, {}), c["vs_f64"].get(be, {})
      ok = "" if be == "dense" else ("yes" if max(list(vd.values()) + list(vf.values()),
                                                  default=1) <= c["tol"] else "no")
      out.append(f"| {c['shape'][0]}x{c['shape'][1]} | {c['block']} | {c['K']} / {c['P']} | "
                 f"{c['dtype']} | {c['offsets']} | {be} | "
                 + " | ".join(_f(vd.get(p)) for p in ("y", "dx", "dv")) + " | "
                 + " | ".join(_f(vf.get(p)) for p in ("y", "dx", "dv"))
                 + f" | {c['tol']:g} | {ok} |")
  return out


def _render_layers(d: dict) -> list[str]:
  out = ["| kernel | rows | mode | dtype | sparsity | K / P | block | nn.Dense ms | pallas | "
         "xla | dense | auto |", "|---" * 12 + "|"]
  for c in d.get("cases", []):
    sp = c.get("speedup", {})
    cells = [(_f(sp.get(be), "{:.2f}x") if be not in c.get("errors", {}) else "error")
             for be in ("pallas", "xla", "dense")]
    auto = c.get("auto")
    auto_cell = f"{auto} {_f(sp.get(auto), '{:.2f}x')}" if auto else "-"
    out.append(f"| {c['shape'][0]}x{c['shape'][1]} | {c['rows']} | "
               f"{'fwd' if c['mode'] == 'fwd' else 'fwd+bwd'} | {c['dtype']} | {c['sparsity']:g} "
               f"| {c['K']} / {c['P']} | {c['block']} | {_f(c.get('ms', {}).get('nn.Dense'), '{:.4f}')} "
               f"| " + " | ".join(cells) + f" | {auto_cell} |")
  errs = [(c['shape'], c['rows'], c['mode'], c['dtype'], k, v) for c in d.get("cases", [])
          for k, v in c.get("errors", {}).items()]
  if errs:
    out += ["", "Errors:"] + [f"- {e[0][0]}x{e[0][1]} rows {e[1]} {e[2]} {e[3]} {e[4]}: `{e[5]}`"
                              for e in errs[:20]]
  return out


def _render_peers(d: dict) -> list[str]:
  if not d.get("cases"):
    return []
  names = ("2:4", "BSR bsr_dense_mm", "BSR F.linear")
  out = ["| kernel | rows | mode | dtype | F.linear ms | " + " | ".join(names) + " |",
         "|---" * (5 + len(names)) + "|"]
  for c in d["cases"]:
    sp = c.get("speedup", {})
    cells = []
    for nm in names:
      cells.append(_f(sp.get(nm), "{:.2f}x") if nm in sp else
                   ("error" if nm in c.get("errors", {}) or "BSR" in c.get("errors", {}) else "-"))
    out.append(f"| {c['shape'][0]}x{c['shape'][1]} | {c['rows']} | "
               f"{'fwd' if c['mode'] == 'fwd' else 'fwd+bwd'} | {c['dtype']} | "
               f"{_f(c.get('ms', {}).get('F.linear'), '{:.4f}')} | " + " | ".join(cells) + " |")
  worst = {}
  for c in d["cases"]:
    for k, v in c.get("max_rel_err", {}).items():
      worst[k] = max(worst.get(k, 0.0), v)
  if worst:
    out += ["", "Forward max-norm relative error against F.linear on the same dense weight "
                "(worst case): " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items())]
  errs = sorted({f"{k}: `{v}`" for c in d["cases"] for k, v in c.get("errors", {}).items()})
  if errs:
    out += ["", "Errors (distinct):"] + [f"- {e}" for e in errs[:20]]
  return out


def _render_models(d: dict) -> list[str]:
  cfg = d.get("config", {})
  cases = {c["name"]: c for c in d.get("cases", [])}
  out = [f"ViT-{cfg.get('variant')}/16 {cfg.get('vit_overrides') or ''}, {cfg.get('image')} px, "
         f"batch {cfg.get('batch')}, {cfg.get('dtype')}, fast recipe {FAST_RECIPE}", "",
         "| model | inference images/s | vs dense | train images/s | vs dense |",
         "|---|---|---|---|---|"]
  for name in ("dense", "frozen", "exploring"):
    i, t = cases.get(f"infer {name}", {}), cases.get(f"train {name}", {})
    cell = lambda c: (f"error: {c['error']}" if c.get("error") else _f(c.get("images_per_s"), "{:.1f}"))
    out.append(f"| {name} | {cell(i)} | {_f(i.get('speedup'), '{:.2f}x')} | {cell(t)} | "
               f"{_f(t.get('speedup'), '{:.2f}x')} |")
  return out


RENDER = {"env": _render_env, "numerics": _render_numerics, "layers": _render_layers,
          "peers": _render_peers, "models": _render_models}


if __name__ == "__main__":
  sys.exit(main())
