"""The one exception type of the data package."""


class DataError(ValueError):
  """Bad input data or data config; the message names the file (or config field) and the problem."""
