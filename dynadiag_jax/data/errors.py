"""The one error raised when a data set is not where the config says."""


class DataNotFoundError(ValueError):
  """A data set is missing; the message names it, where it was sought and how to prepare it."""
