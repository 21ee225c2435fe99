"""The errors a user can cause and fix: each message names the file or key and what to do.

Entry points (`ecm_jax.cli.run`) print them as one `error: ...` line and exit 2; anything else is
a bug and keeps its traceback. No JAX here: the command line imports this before JAX starts.
"""


class UserError(Exception):
  """Bad input, config or run directory (the message says which and what to do)."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (named in the message)."""


class DataError(UserError, ValueError):
  """A dataset file or folder that cannot be used (named in the message)."""


class WorkdirError(UserError, ValueError):
  """The workdir cannot be used for this run (different config, missing checkpoint, ...)."""


class StorageError(UserError, OSError):
  """A folder the command must write is read-only, full or not permitted (named in the message)."""


class NonFiniteLossError(UserError, RuntimeError):
  """Training diverged; the last good checkpoint is left in place."""
