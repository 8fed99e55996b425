"""benchmarks.runs: whole train.py runs side by side, each a real process, one table of ratios."""

from __future__ import annotations

import pytest

from benchmarks import runs


def test_variant_specs_parse_and_a_nameless_one_is_an_error():
  assert runs.parse_variant("fast:recipe.name=fast,recipe.block=32") == (
      "fast", ["--config.recipe.name=fast", "--config.recipe.block=32"])
  assert runs.parse_variant("default:") == ("default", [])
  with pytest.raises(ValueError, match="needs a name"):
    runs.parse_variant(":method=dense")


@pytest.mark.slow
def test_two_real_runs_give_a_table_against_the_first(capsys):
  runs.main(["--config", "configs/digits_mlp.py", "--steps", "4",
             "--variants", "dense:method=dense", "diag:recipe.block=8"])
  rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| dense") or
          r.startswith("| diag")]
  assert len(rows) == 2, rows
  assert rows[0].split("|")[4].strip() == "1.00x"  # the first variant is the baseline
  assert "--config.recipe.block=8" in rows[1]
