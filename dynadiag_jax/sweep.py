"""Sweep: methods x sparsities x seeds through train.py, then a table with McNemar tests and plots.

    python -m dynadiag_jax.sweep --config configs/mnist_mlp.py --methods dynadiag,static_diag,rigl \\
        --sparsity 0.9,0.95,0.99 --seeds 0,1,2 --workdir runs/sweep [--config.total_steps=1500]

Each run lives in <workdir>/<method>/s<sparsity>/seed<seed> (`dense` once per seed, in s0)
and is keyed by its full effective config (the config file, every --config override, its
method, sparsity and seed), written to its run.json before it starts. <workdir>/sweep.json
holds the sweep's config: rerunning with other overrides is refused with one line (a new
--workdir makes other runs); with the same ones, finished runs (summary.json of that config)
are skipped and interrupted ones resume from their checkpoints. Runs go through
`python -m dynadiag_jax.train` (an installed package is enough); each child holds its run's
lock and dies with the sweep (SIGTERM: it saves first). Ctrl-C / SIGTERM stop every child
after it saved (exit 130 / 143). Writes results.jsonl (every run's config and overrides),
results.md (mean +- std and n per method and sparsity, paired McNemar p-values against the
best method at each sparsity, paper Appendix E) and PNG plots.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tqdm

from dynadiag_jax.methods import METHODS, records

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
SWEEP_FILE, RUN_FILE = "sweep.json", "run.json"
GRID_FIELDS = ("method", "sparsity", "seed")  # set by --methods / --sparsity / --seeds
PER_RUN = GRID_FIELDS + ("progress_bar",)  # differ between the runs of one sweep
EXIT_USAGE, EXIT_BUSY = 2, 4  # train.py's (dynadiag_jax.train.guard)
ALPHA = 0.05  # significance level of the table's bold


class SweepError(Exception):
  """A sweep that cannot start as asked (exit status 2, one line)."""


def run_dir(workdir: str, method: str, sparsity: float, seed: int) -> str:
  s = 0.0 if method == "dense" else sparsity
  return os.path.join(workdir, method, f"s{s:g}", f"seed{seed}")


def grid(methods: list[str], sparsities: list[float], seeds: list[int]) -> list[tuple]:
  """(method, sparsity, seed) of every run, dense once per seed."""
  out = []
  for m in methods:
    for s in ([0.0] if m == "dense" else sparsities):
      out += [(m, s, k) for k in seeds]
  return out


def job_args(method: str, sparsity: float, seed: int) -> list[str]:
  """The --config overrides that make one run of the grid."""
  out = [f"--config.method={method}", f"--config.seed={seed}", "--config.progress_bar=False"]
  return out + ([f"--config.sparsity={sparsity}"] if method != "dense" else [])


def command(config: str, wd: str, method: str, sparsity: float, seed: int,
            overrides: list[str]) -> list[str]:
  """The child's command line: the training CLI of the installed package."""
  return [sys.executable, "-m", "dynadiag_jax.train", "--config", config, "--workdir", wd,
          *job_args(method, sparsity, seed), *overrides]


def effective_config(config: str, args: list[str]):
  """The ConfigDict train.py builds from `config` and --config.* `args`; SweepError if it cannot."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from dynadiag_jax.train import cli  # pylint: disable=g-import-not-at-top
  cli.config_importable(config)
  argv = ["sweep", f"--config={config}", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)  # its overrides are found in sys_argv
  try:
    fv(argv)
    c = fv.config
    c.get("seed")
    return c
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(cli._explain(argv, e)) from None  # pylint: disable=protected-access


def config_json(config) -> str:
  from dynadiag_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.config_json(config)


def config_diff(saved: str, current: str, ignore: tuple[str, ...] = ()) -> list[str]:
  """'field: saved -> current' of every field that differs (fields added later as IMPLIED)."""
  from dynadiag_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.config_diff(saved, current, may_change=ignore)


def claim(workdir: str, config: str, overrides: list[str]) -> dict:
  """<workdir>/sweep.json for these overrides; SweepError when the workdir holds another sweep."""
  bad = [a for a in overrides if a.split("=", 1)[0].removeprefix("--config.") in GRID_FIELDS]
  if bad:
    raise SweepError(f"{bad[0].split('=')[0]} is set per run by --methods / --sparsity / --seeds, "
                     "not as an override")
  base = config_json(effective_config(config, overrides))
  path = os.path.join(workdir, SWEEP_FILE)
  mine = {"config": config, "overrides": list(overrides), "effective": json.loads(base)}
  if os.path.exists(path):
    old = json.loads(Path(path).read_text())
    diff = config_diff(json.dumps(old["effective"]), base, PER_RUN)
    if diff:
      more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
      raise SweepError(
          f"{workdir} holds a sweep of another config ({'; '.join(diff[:4])}{more}; its "
          f"overrides: {' '.join(old['overrides']) or 'none'}): its runs would be mixed with "
          "these. Use a new --workdir, or the overrides it was made with")
  elif any(Path(workdir).glob("*/s*/seed*/summary.json")):
    raise SweepError(f"{workdir} holds runs without {SWEEP_FILE} (an older sweep): their configs "
                     "are not known, so they cannot be reused. Use a new --workdir")
  else:
    _write_json(path, mine)  # a new sweep directory: nothing in it to check
  return mine


def _write_json(path: str, obj: dict):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def run_config(config: str, job: tuple, overrides: list[str]) -> str:
  """The JSON of one run's effective config (what its run.json and checkpoints hold)."""
  return config_json(effective_config(config, job_args(*job) + list(overrides)))


def state(workdir: str, job: tuple, want: str) -> str:
  """'done' (summary.json of this config), 'todo', or 'other' (run.json of another config)."""
  wd = run_dir(workdir, *job)
  rec = os.path.join(wd, RUN_FILE)
  if os.path.exists(rec):
    have = json.loads(Path(rec).read_text())["config"]
    if config_diff(json.dumps(have), want, ("progress_bar",)):
      return "other"
  elif os.path.exists(os.path.join(wd, "summary.json")):
    return "other"
  return "done" if os.path.exists(os.path.join(wd, "summary.json")) else "todo"


class Children:
  """The training processes of this sweep: started with SIGINT / SIGTERM held (they take them
  once their handlers are in), each in its own session, stopped on the sweep's own signal."""

  def __init__(self):
    self.procs: set[subprocess.Popen] = set()
    self.signum: int | None = None
    self.lock = threading.Lock()

  def handle(self, signum, frame):
    """The sweep's SIGINT / SIGTERM: no new runs; each child gets it once, saves and exits."""
    del frame
    if self.signum is None:
      self.signum = signum
      with self.lock:
        for p in self.procs:
          if p.poll() is None:
            os.kill(p.pid, signum)

  def call(self, cmd: list[str], log, env: dict) -> int:
    """Runs one child to its end; its exit status (None if the sweep is stopping)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
      with self.lock:
        if self.signum is not None:
          return None
        p = subprocess.Popen(cmd, env={**env, "DYNADIAG_PARENT_PID": str(os.getpid())},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.add(p)
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, old)
    try:
      return p.wait()
    finally:
      with self.lock:
        self.procs.discard(p)


def train_one(children: Children, config: str, workdir: str, job: tuple, overrides: list[str],
              single_thread: bool, want: str) -> tuple[tuple, int | None]:
  """Runs one (method, sparsity, seed) to completion; (job, exit status)."""
  wd = run_dir(workdir, *job)
  os.makedirs(wd, exist_ok=True)
  _write_json(os.path.join(wd, RUN_FILE), {"config": json.loads(want),
                                           "overrides": list(overrides),
                                           "command": command(config, wd, *job, overrides)})
  env = dict(os.environ)
  if single_thread:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD).strip()
  with open(os.path.join(wd, "log.txt"), "a") as log:
    return job, children.call(command(config, wd, *job, overrides), log, env)


def collect(workdir: str, task: str = "") -> list[dict]:
  """One record per finished run (summary.json) under workdir, with its config and overrides;
  written to results.jsonl. With a sweep.json, runs of another config are left out."""
  sweep = os.path.join(workdir, SWEEP_FILE)
  base = json.loads(Path(sweep).read_text())["effective"] if os.path.exists(sweep) else None
  rows = []
  for p in sorted(Path(workdir).glob("*/s*/seed*/summary.json")):
    s = json.loads(p.read_text())
    method, sp, seed = p.parts[-4], float(p.parts[-3][1:]), int(p.parts[-2][4:])
    rec = p.parent / RUN_FILE
    run = json.loads(rec.read_text()) if rec.exists() else {}
    if base is not None and (not run or config_diff(json.dumps(base), json.dumps(run["config"]),
                                                    PER_RUN)):
      continue  # not a run of this sweep's config
    metric = "perplexity" if "perplexity" in s else "test_accuracy"
    rows.append({"task": task or s.get("data", ""), "method": method, "sparsity": sp,
                 "seed": seed, "metric": metric, "value": s[metric],
                 "actual_sparsity": s.get("sparsity"), "stored_params": s.get("stored_params"),
                 "steps": s.get("steps"), "wall_s": s.get("wall_s"),
                 "commit": s.get("code", {}).get("commit"), "dir": str(p.parent),
                 "overrides": run.get("overrides"), "config": run.get("config")})
  with open(os.path.join(workdir, "results.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return rows


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
  """Exact two-sided McNemar p-value of paired correctness vectors (binomial on discordant pairs)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n01 = int(np.sum(a & ~b))
  n10 = int(np.sum(~a & b))
  if n01 + n10 == 0:
    return 1.0
  return float(stats.binomtest(n01, n01 + n10, 0.5).pvalue)


def _load_correct(row: dict) -> np.ndarray | None:
  p = os.path.join(row["dir"], records.PREDICTIONS)
  return np.load(p) if os.path.exists(p) else None


def paired_p(rows_a: list[dict], rows_b: list[dict]) -> float | None:
  """McNemar p over the seeds both methods ran, their per-example outcomes concatenated."""
  by_b = {r["seed"]: r for r in rows_b}
  xa, xb = [], []
  for r in rows_a:
    if r["seed"] in by_b:
      ca, cb = _load_correct(r), _load_correct(by_b[r["seed"]])
      if ca is not None and cb is not None and ca.shape == cb.shape:
        xa.append(ca)
        xb.append(cb)
  if not xa:
    return None
  return mcnemar(np.concatenate(xa), np.concatenate(xb))


def _cell(v: np.ndarray) -> str:
  """mean +- std (n); one seed has no spread: its value (1)."""
  if len(v) == 1:
    return f"{v[0]:.2f} (1)"
  return f"{v.mean():.2f} +- {v.std(ddof=1):.2f} ({len(v)})"


def table(rows: list[dict], sparsities: list[float], methods: list[str]) -> str:
  """Markdown: mean +- std (n) per method and sparsity, McNemar p against that column's best;
  the best is bold only when it beats every other sparse method of its column at p < ALPHA."""
  if not rows:
    return "(no finished runs)\n"
  metric = rows[0]["metric"]
  lower = metric == "perplexity"
  scale = 1.0 if lower else 100.0
  cell = {}
  for m in methods:
    for s in sparsities:
      cell[m, s] = [r for r in rows if r["method"] == m and (r["sparsity"] == s or m == "dense")]
  best, pvals = {}, {}
  for s in sparsities:
    means = {m: np.mean([r["value"] for r in cell[m, s]]) for m in methods
             if cell[m, s] and m != "dense"}
    if means:
      best[s] = (min if lower else max)(means, key=means.get)
      pvals.update({(m, s): paired_p(cell[m, s], cell[best[s], s]) for m in means if m != best[s]})
  won = {s for s, b in best.items()
         if all(p is not None and p < ALPHA for (m, t), p in pvals.items() if t == s)
         and any(t == s for (_, t) in pvals)}
  unit = "perplexity (lower is better)" if lower else "test accuracy, %"
  head = "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
  out = [f"{unit}; mean +- std (n seeds; one seed: its value); p: paired McNemar against the "
         f"best sparse method of the column, **bold** when it beats each other one at p < {ALPHA}",
         "", head, "|---" * (len(sparsities) + 1) + "|"]
  for m in methods:
    cols = []
    for s in sparsities:
      rs = cell[m, s]
      if not rs:
        cols.append("-")
        continue
      txt = _cell(np.array([r["value"] for r in rs]) * scale)
      if best.get(s) == m and s in won:
        txt = f"**{txt}**"
      elif pvals.get((m, s)) is not None:
        txt += f", p={pvals[m, s]:.2g}"
      cols.append(txt)
    out.append(f"| {m} | " + " | ".join(cols) + " |")
  return "\n".join(out) + "\n"


def plot_metric(rows: list[dict], sparsities: list[float], methods: list[str], path: str,
                title: str = "") -> bool:
  """Accuracy (or perplexity) against sparsity, one line per method, error bars = std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not rows:
    return False
  metric = rows[0]["metric"]
  scale = 1.0 if metric == "perplexity" else 100.0
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = np.arange(len(sparsities))
  for m in methods:
    if m == "dense":
      v = np.array([r["value"] for r in rows if r["method"] == m]) * scale
      if len(v):
        ax.axhline(v.mean(), color="k", ls="--", lw=1, label="dense")
      continue
    mu, sd, xx = [], [], []
    for i, s in enumerate(sparsities):
      v = np.array([r["value"] for r in rows if r["method"] == m and r["sparsity"] == s]) * scale
      if len(v):
        mu.append(v.mean())
        sd.append(v.std())
        xx.append(i)
    if xx:
      ax.errorbar(xx, mu, yerr=sd, marker="o", capsize=3, label=m)
  ax.set_xticks(xs, [f"{s:.0%}" for s in sparsities])
  ax.set_xlabel("sparsity")
  ax.set_ylabel("perplexity" if metric == "perplexity" else "test accuracy (%)")
  ax.set_title(title)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_gates(run: str, path: str) -> bool:
  """The gates of one layer over exploration (heatmap): min(K softmax(alpha / T), 1), or the
  forward 0/1 top-K of a hard gate."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from dynadiag_jax import analysis  # pylint: disable=g-import-not-at-top
  tr = records.read_trace(run)
  if not tr:
    return False
  steps = [r["step"] for r in tr]
  g_SxP = np.stack([analysis.gates(np.array(r["alpha"]), r["k"], r["temperature"],
                                   r.get("gate", "soft_topk")) for r in tr])
  fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.6))
  im = a0.imshow(g_SxP.T, aspect="auto", origin="lower", cmap="viridis",
                 extent=(steps[0], steps[-1], 0, g_SxP.shape[1]))
  fig.colorbar(im, ax=a0)
  a0.set_xlabel("step")
  a0.set_ylabel("diagonal offset")
  a0.set_title(f"gates of {tr[0]['layer']} (K={tr[0]['k']})")
  ent = [analysis.gate_entropy(g) for g in g_SxP]
  a1.plot(steps, ent, label="gate entropy (nats)")
  a1.plot(steps, [np.log(r["k"]) for r in tr], "k--", lw=1, label="log K (hard top-K)")
  a1.set_xlabel("step")
  a1.legend(fontsize=7)
  a1.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_offsets(runs: dict[str, str], path: str) -> bool:
  """Histograms of the kept offsets of the first sparse layer, one panel per run (method)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from dynadiag_jax import analysis  # pylint: disable=g-import-not-at-top
  pats = {}
  for label, d in runs.items():
    pat = records.read_patterns(os.path.join(d, records.PATTERNS))
    if pat:
      pats[label] = pat
  if not pats:
    return False
  fig, axes = plt.subplots(1, len(pats), figsize=(4.5 * len(pats), 3.2), squeeze=False)
  for ax, (label, pat) in zip(axes[0], pats.items()):
    layer, lp = next(iter(pat.items()))
    p_total = max(lp["m"], lp["n"]) // lp.get("block", 1)
    counts, edges = analysis.offset_histogram(lp["offsets"], p_total, bins=32)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
    ax.set_title(f"{label}: {layer} ({len(lp['offsets'])}/{p_total})", fontsize=8)
    ax.set_xlabel("offset")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def small_world(runs: dict[str, str], seed: int = 0) -> dict[str, dict]:
  """{label: analysis.small_world of the first sparse layer} of runs with patterns.json."""
  from dynadiag_jax import analysis  # pylint: disable=g-import-not-at-top
  out = {}
  for label, d in runs.items():
    pat = records.read_patterns(os.path.join(d, records.PATTERNS)) or {}
    sparse = {k: v for k, v in pat.items()
              if len(v["offsets"]) * 2 < max(v["m"], v["n"]) // v.get("block", 1)}
    if sparse:  # the smallest layer that keeps under half of its diagonals (networkx is slow)
      layer, lp = min(sparse.items(), key=lambda kv: kv[1]["m"] + kv[1]["n"])
      out[label] = {"layer": layer, **analysis.small_world(
          lp["offsets"], lp["m"], lp["n"], lp.get("block", 1), seed=seed)}
  return out


def report(workdir: str, sparsities: list[float], methods: list[str], task: str,
           sigma: bool = False) -> str:
  """results.jsonl, results.md and the plots of a sweep directory; the markdown text."""
  rows = collect(workdir, task)
  md = [f"### {task}", "", table(rows, sparsities, methods)]
  for name in ("accuracy.png", "gates.png", "offsets.png"):  # only plots written now are linked
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, name))
  if plot_metric(rows, sparsities, methods, os.path.join(workdir, "accuracy.png"), task):
    md.append(f"![{task}: metric against sparsity](accuracy.png)")
  s0 = sparsities[0]
  dyn = run_dir(workdir, "dynadiag", s0, 0)
  if plot_gates(dyn, os.path.join(workdir, "gates.png")):
    md.append("![gates of one layer over training](gates.png)")
  runs = {m: run_dir(workdir, m, s0, 0) for m in ("dynadiag", "static_diag") if m in methods}
  if plot_offsets(runs, os.path.join(workdir, "offsets.png")):
    md.append("![kept offsets](offsets.png)")
  if sigma and runs:
    sw = small_world(runs)
    if sw:
      md += ["", f"Small-world factor of one sparse layer at {s0:.0%} (seed 0):", "",
             "| method | layer | C | C_rand | L | L_rand | sigma |", "|---|---|---|---|---|---|---|"]
      md += [f"| {k} | {v['layer']} | {v['C']:.3f} | {v['C_rand']:.3f} | {v['L']:.2f} | "
             f"{v['L_rand']:.2f} | {v['sigma']:.2f} |" for k, v in sw.items()]
  text = "\n".join(md) + "\n"
  Path(workdir, "results.md").write_text(text)
  return text


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--methods", default="dynadiag,static_diag,rigl")
  ap.add_argument("--sparsity", default="0.9,0.95,0.99")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
  ap.add_argument("--task", default="", help="name in the tables (default: the config's stem)")
  ap.add_argument("--sigma", action="store_true", help="small-world factor of a layer")
  ap.add_argument("--report-only", action="store_true", help="no training, only the report")
  args, rest = ap.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    ap.error(f"unknown arguments {bad}; overrides look like --config.total_steps=1000")
  return args, rest


def _plan(args, overrides: list[str]) -> tuple[str, str, list[tuple], dict]:
  """(config path, workdir, jobs, {job: its config JSON}) after every check; SweepError if not."""
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SweepError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
  try:
    sparsities = [float(s) for s in args.sparsity.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
  except ValueError as e:
    raise SweepError(f"--sparsity / --seeds: {e}") from None
  config = os.path.abspath(args.config)
  if not os.path.isfile(config.split(":", 1)[0]):
    raise SweepError(f"config file {args.config!r} not found")
  workdir = os.path.abspath(args.workdir)
  jobs = grid(methods, sparsities, seeds)
  return config, workdir, jobs, {j: run_config(config, j, overrides) for j in jobs}


def _train_all(children: Children, config: str, workdir: str, todo: list[tuple],
               overrides: list[str], jobs_at_once: int, want: dict) -> dict[tuple, int | None]:
  """Runs `todo`, jobs_at_once at a time; {job: exit status (None: not started)}."""
  out = {}
  if not todo:
    return out
  with cf.ThreadPoolExecutor(max(1, jobs_at_once)) as pool, tqdm.tqdm(total=len(todo),
                                                                       unit="run") as bar:
    futs = [pool.submit(train_one, children, config, workdir, j, overrides, jobs_at_once > 1,
                        want[j]) for j in todo]
    for f in cf.as_completed(futs):
      job, rc = f.result()
      out[job] = rc
      log = f"{run_dir(workdir, *job)}/log.txt"
      if rc == EXIT_BUSY:
        bar.write(f"BUSY {job}: another process is training it; see {log}")
      elif rc and children.signum is None:
        bar.write(f"FAILED {job} (exit {rc}); see {log}")
      bar.set_postfix(failed=sum(1 for r in out.values() if r))
      bar.update()
  return out


def main(argv: list[str] | None = None) -> int:
  """The sweep's command line; returns its exit status (0 all runs done, 1 a run failed, 2 a
  mistake or another sweep's workdir, 4 a run busy in another process, 130 / 143 stopped)."""
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  try:
    config, workdir, jobs, want = _plan(args, overrides)
    os.makedirs(workdir, exist_ok=True)
    claim(workdir, config, overrides)
    other = [j for j in jobs if state(workdir, j, want[j]) == "other"]
    if other:
      raise SweepError(f"{run_dir(workdir, *other[0])} holds a run of another config "
                       f"({len(other)} such run(s)); use a new --workdir")
  except SweepError as e:
    print(f"sweep: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return EXIT_USAGE
  methods = list(dict.fromkeys(j[0] for j in jobs))
  sparsities = [float(s) for s in args.sparsity.split(",")]
  task = args.task or Path(config).stem
  if not args.report_only:
    todo = [j for j in jobs if state(workdir, j, want[j]) != "done"]
    print(f"{task}: {len(jobs)} runs, {len(jobs) - len(todo)} done, {len(todo)} to go, "
          f"{args.jobs} at a time", flush=True)
    children, t0 = Children(), time.time()
    old = {s: signal.signal(s, children.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      rcs = _train_all(children, config, workdir, todo, overrides, args.jobs, want)
    finally:
      for s, h in old.items():
        signal.signal(s, h)
    if children.signum is not None:
      name = "SIGINT" if children.signum == signal.SIGINT else "SIGTERM"
      saved = sum(1 for r in rcs.values() if r == 128 + children.signum)
      print(f"sweep: {name}: stopped; {saved} run(s) saved their current step; rerun the same "
            "command to resume", file=sys.stderr, flush=True)
      return 128 + children.signum
    print(f"{len(todo)} runs in {time.time() - t0:.0f} s", flush=True)
  print(report(workdir, sparsities, methods, task, sigma=args.sigma))
  if args.report_only:
    return 0
  if any(r == EXIT_BUSY for r in rcs.values()):
    return EXIT_BUSY
  return 1 if any(rcs.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
