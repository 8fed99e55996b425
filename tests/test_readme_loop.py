"""The README's own-loop example runs as printed, and its frozen step runs exact layouts."""

from __future__ import annotations

import re
from pathlib import Path

import dynadiag_jax as dd

ROOT = Path(__file__).resolve().parents[1]


def readme_loop() -> str:
  """The README's python block that drives the phases (the one calling dd.advance)."""
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  loops = [b for b in blocks if "dd.advance" in b and "dd.with_phase" in b]
  assert len(loops) == 1, f"expected one own-loop example in README.md, found {len(loops)}"
  return loops[0]


def test_the_readme_loop_runs_and_its_frozen_step_has_exact_layouts(diag_calls, capsys):
  code = readme_loop()
  assert "dd.recipe.DEFAULT, 300" in code
  code = code.replace("dd.recipe.DEFAULT, 300", "dd.recipe.DEFAULT, 12")  # a short run
  calls = diag_calls
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert not dd.exploring_layers(scope["variables"])  # it froze
  # exploring calls trace their top-K offsets; from the frozen train step on (its trace,
  # then the summary's probe) every call must see them concrete
  seen = [concrete for concrete, _ in calls]
  assert seen.count(True) >= 2 and False not in seen[seen.index(True):], (
      f"the frozen train step traced its offsets (bounded layouts): {seen}")
  assert "frozen" in capsys.readouterr().out  # the summary it prints shows frozen layers
