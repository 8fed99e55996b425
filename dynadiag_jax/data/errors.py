"""The one error raised when a data set is not where the config says."""

from __future__ import annotations


class DataNotFoundError(ValueError):
  """A data set is missing; the message names it, where it was sought and how to prepare it."""
