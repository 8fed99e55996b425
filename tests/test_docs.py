"""The README stays short and keeps its commands; links in README.md and docs/ resolve; the
API table of docs/USAGE.md names only what the code has."""

import glob
import inspect
import os
import re
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))


def _read(rel: str) -> str:
  with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
    return f.read()


def test_readme_is_short_and_keeps_its_commands():
  text = _read("README.md")
  assert len(text.splitlines()) <= 250
  assert "    python -m pytest -q -n 2 --dist loadfile tests\n" in text  # what .ci/run runs
  assert 'pip install -e ".[test]" && python examples/quickstart.py' in text


def _slugs(rel: str) -> set[str]:
  """GitHub's heading anchors of a markdown page."""
  out, seen, code = set(), {}, False
  for line in _read(rel).splitlines():
    if line.startswith("```"):
      code = not code
    m = None if code else re.match(r"^#{1,6}\s+(.*)", line)
    if m:
      slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      out.add(slug if n == 0 else f"{slug}-{n}")
  return out


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
  bad = []
  for target in re.findall(r"\]\(([^)\s]+)\)", _read(page)):
    if re.match(r"[a-z]+:", target):
      continue
    path, _, anchor = target.partition("#")
    rel = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(os.path.join(ROOT, rel)):
      bad.append(f"{target}: no such file")
    elif anchor and rel.endswith(".md") and anchor not in _slugs(rel):
      bad.append(f"{target}: no such heading")
  assert not bad, f"{page}: {bad}"


def test_usage_api_table_names_exist():
  import importlib  # pylint: disable=import-outside-toplevel
  dd = importlib.import_module("dynadiag_jax")
  text = _read("docs/USAGE.md")
  table = text[text.index("| piece | what it is |"):].split("\n\n")[0].splitlines()[2:]
  assert len(table) >= 10
  for row in table:
    head, desc = (c.strip() for c in row.strip().strip("|").split(" | ", 1))
    objs = []
    for name in re.findall(r"`([\w.]+)`", head):
      parts = name.split(".")
      obj = dd if parts[0] == "dd" else importlib.import_module(".".join(parts[:2]))
      for part in parts[1 if parts[0] == "dd" else 2:]:
        obj = getattr(obj, part)
      objs.append(obj)
    for call in re.findall(r"`(?:dd\.)?([A-Za-z_][\w.]*)\(", desc):  # every `f(...)` named
      found = False
      for obj in objs + [dd]:
        try:
          for part in call.replace("sched.", "Schedule.").split("."):  # sched: a dd.Schedule
            obj = getattr(obj, part)
          found = True
          break
        except AttributeError:
          continue
      assert found, f"{head}: {call} is not in the code"


def _module_words(mod: types.ModuleType) -> set[str]:
  """What a module row may name bare: its attributes and their parameters (choices that are
  strings, such as gate or method names, are written quoted: `'st_topk_shadow'`)."""
  words = set(dir(mod))
  for obj in vars(mod).values():
    if callable(obj):
      try:
        words |= set(inspect.signature(obj).parameters)
      except (TypeError, ValueError):
        pass
  return words


def test_usage_api_table_module_rows_name_only_module_members():
  """In a module's row every bare `name` is a member, a parameter of one, or a choice it lists
  (the table once listed `dd.gates.st_topk_shadow`, a gate name, not a function)."""
  import importlib  # pylint: disable=import-outside-toplevel
  importlib.import_module("dynadiag_jax.analysis")
  text = _read("docs/USAGE.md")
  table = text[text.index("| piece | what it is |"):].split("\n\n")[0].splitlines()[2:]
  jax_terms = {"custom_vjp", "alpha"}  # jax's decorator; the DiagDense parameter alpha
  for row in table:
    head, desc = (c.strip() for c in row.strip().strip("|").split(" | ", 1))
    name = re.findall(r"`([\w.]+)`", head)[0].replace("dd.", "dynadiag_jax.")
    if "." not in name:
      continue
    try:
      mod = importlib.import_module(name)
    except ModuleNotFoundError:
      continue  # a class or function row
    words = _module_words(mod) | set(dir(importlib.import_module("dynadiag_jax"))) | jax_terms
    bare = re.findall(r"`([A-Za-z_]\w*)`", desc)
    unknown = sorted(set(bare) - words)
    assert not unknown, f"{head}: {unknown} are not members of {name}"
