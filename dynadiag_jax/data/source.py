"""What image and text sources share: split sizes from `num_examples`."""

from __future__ import annotations


class Source:
  """A data source with `train_split`, `eval_split` and `num_examples(split)`."""

  train_split: str
  eval_split: str

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  @property
  def num_train(self) -> int:
    return self.num_examples(self.train_split)

  @property
  def num_test(self) -> int:
    return self.num_examples(self.eval_split)
