"""`Recipe`: how DynaDiag learns its diagonals, one frozen value read by every part that needs it.

The layer (`DiagDense` / `LayerFactory`), the optimizer chain (`optim.wrap`), the schedule
(`Recipe.schedule`) and `train.py` (`config.recipe`) all take the same `Recipe`; the freeze
reads the gate that the layer recorded at init, so it cannot fold another one.

A new recipe knob touches two files: this one (the field and its check) and the module that
uses it; `configs/common.py` lists `Recipe`'s fields by itself, so `--config.recipe.<knob>`
works with no further edit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dynadiag_jax import gates, pattern
from dynadiag_jax.mixing import NAMES as MIXINGS
from dynadiag_jax.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class Experimental:
  """Research options kept because they are still under study; off by default.

  hold: layer names (any key of a param path, e.g. 'qkv') whose alpha never moves: their
  selection stays the random start (static random diagonals) while the others learn.
  """
  hold: tuple[str, ...] = ()

  def __post_init__(self):
    if isinstance(self.hold, str) or not all(isinstance(n, str) and n for n in self.hold):
      raise ValueError(f"recipe.experimental.hold must be a tuple of layer names, got {self.hold!r}")
    object.__setattr__(self, "hold", tuple(self.hold))


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Layout, gate, schedule and alpha settings of DynaDiag (docs/DESIGN.md section 3).

  block: b x b block-diagonals, an upper bound (each layer takes the largest b <= block that
  divides its kernel, and with `cover` also lets its K diagonals connect every input and
  output, K D >= P: `pattern.largest_covering_block`; 1 is the paper's method); mixing: the layers' input permutation
  ('none' | 'stride' | 'random' | 'learned', `dynadiag_jax.mixing`). A layer's own `block` / `mixing`,
  when set, overrides these. gate: a `gates.NAMES` gate; freeze_fraction: exploration share of training, then the
  freeze; t_start / t_end: cosine temperature of the soft top-k; k_start_fraction: K_active
  starts at this share of P (cosine down to K); num_levels: K_active levels (one compile
  each); alpha_lr: alpha's learning rate as a multiple of the optimizer's; l1: l1 penalty
  on alpha; cover: keep the K diagonals of high alpha that leave no input or output of a
  rectangular layer unconnected (`cover.select`; exploring and at the freeze), not the top-K.
  """
  block: int = 1
  mixing: str = "none"
  gate: str = gates.DEFAULT
  freeze_fraction: float = 0.3
  t_start: float = 5.0
  t_end: float = 0.05
  k_start_fraction: float = 1.0
  num_levels: int = 5
  alpha_lr: float = 1.0
  l1: float = 0.0
  cover: bool = False
  experimental: Experimental = Experimental()

  def __post_init__(self):
    if not pattern.is_block_size(self.block):
      raise ValueError(f"recipe.block must be an integer >= 1, got {self.block!r}")
    object.__setattr__(self, "block", int(self.block))
    if self.mixing not in MIXINGS:
      raise ValueError(f"recipe.mixing must be one of {list(MIXINGS)}, got {self.mixing!r}")
    gates.by_name(self.gate)
    if self.alpha_lr <= 0:
      raise ValueError(f"recipe.alpha_lr must be > 0, got {self.alpha_lr}")
    if self.l1 < 0:
      raise ValueError(f"recipe.l1 must be >= 0, got {self.l1}")
    if not isinstance(self.cover, (bool, np.bool_)):
      raise TypeError(f"recipe.cover must be a bool, got {self.cover!r}")
    if not isinstance(self.experimental, Experimental):
      raise TypeError(f"recipe.experimental must be an Experimental, got {self.experimental!r}")
    self.schedule(1)  # checks freeze_fraction, temperatures, k_start_fraction, num_levels

  def schedule(self, total_steps: int) -> Schedule:
    """The temperature / K_active / freeze schedule of a run of `total_steps` steps."""
    return Schedule(total_steps, freeze_fraction=self.freeze_fraction, t_start=self.t_start,
                    t_end=self.t_end, k_start_fraction=self.k_start_fraction,
                    num_levels=self.num_levels)

  def replace(self, **kw) -> "Recipe":
    """A copy with the given fields changed (validated again)."""
    return dataclasses.replace(self, **kw)


DEFAULT = Recipe()  # the best measured recipe (docs: results per task)
PAPER = Recipe(gate=gates.PAPER)  # the paper's: soft top-k gates, same schedule
# block-diagonals of up to 32 x 32 (smaller where K of them could not connect every input and
# output), kept so that they do: the fast layout that kept accuracy on the wide ViT at 90%
# (docs/FAST.md; b = 64 there left half the outputs unconnected and lost 7 points)
FAST = Recipe(block=32, cover=True)
RECIPES: dict[str, Recipe] = {"default": DEFAULT, "paper": PAPER, "fast": FAST}


def get(recipe: str | Recipe) -> Recipe:
  """The recipe called `recipe` (a `RECIPES` name), or `recipe` itself."""
  if isinstance(recipe, Recipe):
    return recipe
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
  return RECIPES[recipe]


def fields() -> tuple[str, ...]:
  """Recipe's field names other than `experimental`."""
  return tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "experimental")
