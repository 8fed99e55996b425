"""Every Python block of docs/OWN_LOOP.md runs: each example after the data block, in order."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

import dynadiag_jax as dd
from dynadiag_jax.sparsify import sparsify

DOC = Path(__file__).resolve().parents[1] / "docs" / "OWN_LOOP.md"
BLOCK = re.compile(r"(?:<!-- example: (\w+) -->\n)?```python\n(.*?)```", re.S)


def blocks() -> list[tuple[str | None, str]]:
  """(example name or None when unmarked, code) of every ```python block, in page order."""
  return [(m.group(1), m.group(2)) for m in BLOCK.finditer(DOC.read_text())]


def test_every_python_block_belongs_to_an_example():
  found = blocks()
  assert len(found) >= 5
  assert [name for name, _ in found if name is None] == [], "a ```python block has no marker"
  assert {name for name, _ in found} == {"data", "linen", "trainstate", "nnx"}


@pytest.mark.parametrize("example", ["linen", "trainstate", "nnx"])
def test_the_example_runs_and_trains(example, tmp_path, monkeypatch, capsys):
  assert dd.sparsify is sparsify  # the function, exported at the top level
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the page's checkpoints go here
  ns: dict = {"__name__": f"own_loop_{example}"}
  for name, code in blocks():
    if name in ("data", example):
      exec(compile(code, f"{DOC.name}:{name}", "exec"), ns)  # pylint: disable=exec-used
  assert ns["test_accuracy"] > 0.8, capsys.readouterr().out
  assert any(tmp_path.rglob("*")), "the example wrote no checkpoint"
