"""Sweep: methods x sparsities x seeds through train.py, then a table with McNemar tests and plots.

    python -m dynadiag_jax.sweep --config configs/mnist_mlp.py --methods dynadiag,static_diag,rigl \\
        --sparsity 0.9,0.95,0.99 --seeds 0,1,2 --workdir runs/sweep [--config.total_steps=1500]

Each run lives in <workdir>/<method>/s<sparsity>/seed<seed> (`dense` once per seed, in
s0); a run with a summary.json is done and skipped, so rerunning the command resumes
(an interrupted run resumes from its own checkpoints). Writes results.jsonl, results.md
(mean +- std and n per method and sparsity, paired McNemar p-values against the best
method at each sparsity, paper Appendix E) and PNG plots.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tqdm

from dynadiag_jax.methods import METHODS, records

ROOT = Path(__file__).resolve().parents[1]
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


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


def command(config: str, wd: str, method: str, sparsity: float, seed: int,
            overrides: list[str]) -> list[str]:
  cmd = [sys.executable, str(ROOT / "train.py"), "--config", config, "--workdir", wd,
         f"--config.method={method}", f"--config.seed={seed}", "--config.progress_bar=False"]
  if method != "dense":
    cmd.append(f"--config.sparsity={sparsity}")
  return cmd + list(overrides)


def train_one(config: str, workdir: str, job: tuple, overrides: list[str],
              single_thread: bool) -> tuple[tuple, int]:
  """Runs one (method, sparsity, seed) to completion; (job, exit code) (0 when already done)."""
  wd = run_dir(workdir, *job)
  if os.path.exists(os.path.join(wd, "summary.json")):
    return job, 0
  os.makedirs(wd, exist_ok=True)
  lock = os.path.join(wd, "run.lock")  # one process per run directory, even across sweeps
  try:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    pid = int(Path(lock).read_text() or 0)
    if _alive(pid):
      return job, 0  # another sweep is running it
    os.unlink(lock)
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  try:
    return job, _train(config, wd, job, overrides, single_thread)
  finally:
    os.unlink(lock)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except (OSError, ValueError):
    return False
  return pid > 0


def _train(config: str, wd: str, job: tuple, overrides: list[str], single_thread: bool) -> int:
  env = dict(os.environ)
  if single_thread:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD).strip()
  with open(os.path.join(wd, "log.txt"), "a") as log:
    return subprocess.call(command(config, wd, *job, overrides), cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT)


def collect(workdir: str, task: str = "") -> list[dict]:
  """One record per finished run (summary.json) under workdir; written to results.jsonl."""
  rows = []
  for p in sorted(Path(workdir).glob("*/s*/seed*/summary.json")):
    s = json.loads(p.read_text())
    method, sp, seed = p.parts[-4], float(p.parts[-3][1:]), int(p.parts[-2][4:])
    metric = "perplexity" if "perplexity" in s else "test_accuracy"
    rows.append({"task": task or s.get("data", ""), "method": method, "sparsity": sp,
                 "seed": seed, "metric": metric, "value": s[metric],
                 "actual_sparsity": s.get("sparsity"), "stored_params": s.get("stored_params"),
                 "steps": s.get("steps"), "wall_s": s.get("wall_s"),
                 "commit": s.get("code", {}).get("commit"), "dir": str(p.parent)})
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


def table(rows: list[dict], sparsities: list[float], methods: list[str]) -> str:
  """Markdown: mean +- std (n) per method and sparsity, McNemar p against that column's best."""
  if not rows:
    return "(no finished runs)\n"
  metric = rows[0]["metric"]
  lower = metric == "perplexity"
  scale = 1.0 if lower else 100.0
  cell = {}
  for m in methods:
    for s in sparsities:
      cell[m, s] = [r for r in rows if r["method"] == m and (r["sparsity"] == s or m == "dense")]
  best = {}
  for s in sparsities:
    means = {m: np.mean([r["value"] for r in cell[m, s]]) for m in methods
             if cell[m, s] and m != "dense"}
    if means:
      best[s] = (min if lower else max)(means, key=means.get)
  unit = "perplexity (lower is better)" if lower else "test accuracy, %"
  head = "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
  out = [f"{unit}; mean +- std (n seeds); p: paired McNemar against the best sparse method "
         "of the column (**bold**)", "", head, "|---" * (len(sparsities) + 1) + "|"]
  for m in methods:
    cols = []
    for s in sparsities:
      rs = cell[m, s]
      if not rs:
        cols.append("-")
        continue
      v = np.array([r["value"] for r in rs]) * scale
      txt = f"{v.mean():.2f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.2f} ({len(v)})"
      if best.get(s) == m:
        txt = f"**{txt}**"
      elif s in best:
        p = paired_p(rs, cell[best[s], s])
        if p is not None:
          txt += f", p={p:.2g}"
      cols.append(txt)
    out.append(f"| {m} | " + " | ".join(cols) + " |")
  return "\n".join(out) + "\n"


def plot_metric(rows: list[dict], sparsities: list[float], methods: list[str], path: str,
                title: str = "") -> None:
  """Accuracy (or perplexity) against sparsity, one line per method, error bars = std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not rows:
    return
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
  plot_metric(rows, sparsities, methods, os.path.join(workdir, "accuracy.png"), task)
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


def main(argv: list[str] | None = None) -> int:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
  sparsities = [float(s) for s in args.sparsity.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  config = os.path.abspath(args.config)
  task = args.task or Path(config).stem
  os.makedirs(args.workdir, exist_ok=True)
  workdir = os.path.abspath(args.workdir)
  jobs = grid(methods, sparsities, seeds)
  failed = []
  if not args.report_only:
    todo = [j for j in jobs if not os.path.exists(os.path.join(run_dir(workdir, *j),
                                                               "summary.json"))]
    print(f"{task}: {len(jobs)} runs, {len(jobs) - len(todo)} done, {len(todo)} to go, "
          f"{args.jobs} at a time", flush=True)
    t0 = time.time()
    with cf.ThreadPoolExecutor(max(1, args.jobs)) as pool, tqdm.tqdm(total=len(todo),
                                                                      unit="run") as bar:
      futs = [pool.submit(train_one, config, workdir, j, overrides, args.jobs > 1) for j in todo]
      for f in cf.as_completed(futs):
        job, rc = f.result()
        if rc:
          failed.append(job)
          bar.write(f"FAILED {job} (exit {rc}); see {run_dir(workdir, *job)}/log.txt")
        bar.set_postfix(failed=len(failed))
        bar.update()
    print(f"{len(todo)} runs in {time.time() - t0:.0f} s", flush=True)
  print(report(workdir, sparsities, methods, task, sigma=args.sigma))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
