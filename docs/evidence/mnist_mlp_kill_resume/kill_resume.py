"""Issue 9 done-when 1: every method trains through train.py on mnist_mlp at 90% and resumes
bitwise after kill -9 (SIGKILL once the step-100 checkpoint exists).

    python docs/evidence/mnist_mlp_kill_resume/kill_resume.py [dense,dynadiag,...]

from the repository root; runs under runs/kill_resume/, output in output.txt beside this file.
"""
import json, os, shutil, signal, subprocess, sys, time
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
sys.path.insert(0, ROOT)
from dynadiag_jax.train import checkpoint
W = os.path.join(ROOT, 'runs', 'kill_resume')
METHODS = sys.argv[1].split(',') if len(sys.argv) > 1 else ['dense', 'dynadiag', 'static_diag', 'diagheur', 'rigl', 'set', 'gmp', 'nm']
flags = ['--config.total_steps=300', '--config.checkpoint.every=50', '--config.checkpoint.keep=10',
         '--config.eval_every=0', '--config.log_every=50', '--config.progress_bar=False',
         '--config.fast_compile=True', '--config.masks.every=25', '--config.sparsity=0.9']
cmd = lambda m, wd: [sys.executable, 'train.py', '--config', 'configs/mnist_mlp.py', '--workdir', wd,
                     f'--config.method={m}', *flags]
for m in METHODS:
  ref, run = f'{W}/{m}/ref', f'{W}/{m}/killed'
  shutil.rmtree(f'{W}/{m}', ignore_errors=True)
  r = subprocess.run(cmd(m, ref), cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  p = subprocess.Popen(cmd(m, run), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ck = f'{run}/checkpoints'
  while p.poll() is None and not (os.path.isdir(ck) and any(d.isdigit() and int(d) >= 100 for d in os.listdir(ck))):
    time.sleep(0.05)
  alive = p.poll() is None
  p.send_signal(signal.SIGKILL); p.wait()
  had = sorted(int(d) for d in os.listdir(ck) if d.isdigit())
  r = subprocess.run(cmd(m, run), cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  a, ma = checkpoint.load(f'{ref}/checkpoints'); b, mb = checkpoint.load(ck)
  diff = [k for k in a if k not in b or a[k].tobytes() != b[k].tobytes()]
  s = json.load(open(f'{run}/summary.json')); s0 = json.load(open(f'{ref}/summary.json'))
  print(f"{m:12s} killed while running: {alive}, checkpoints at kill {had}, resumed_from {s['resumed_from']}, "
        f"final step {mb['step']}, leaves {len(a)}, differing {len(diff)}, acc {s0['test_accuracy']:.4f} / {s['test_accuracy']:.4f}, sparsity {s['sparsity']:.4f}", flush=True)
