"""The one command-line convention of every entry point (train.py, eval.py, `python -m
ecm_jax.models.summary`, `ecm_jax.evaluate.report`, `ecm_jax.torch_ref.parity`, `benchmarks.*`).

absl flags, `--config path/to/config.py[:variant]` (ml_collections) with `--config.key=value`
overrides where a command takes a config, and these shared flags:
  --verbose      libraries' INFO logs and full tracebacks on errors;
  --host_memory  CPU host-memory mode (ignored on GPU/TPU; `ecm_jax.runtime`);
  --cluster_timeout  multi-process jobs: how long a silent process is waited for (`ecm_jax.cluster`).
`run(main, errors)` starts the process (`ecm_jax.runtime.start`) and turns the user errors in
`errors` into one `error: ...` line on stderr and exit status 2 (the traceback with --verbose); so
are a failed write for lack of space or permission (wherever it happens: a picture, a log line) and
a `--config.key=value` naming no config key (with ml_collections' suggestion).
"""

from collections.abc import Callable, Sequence
import os
import re
import sys

from absl import app, flags

from ecm_jax import files, runtime
from ecm_jax.errors import StorageError

VERBOSE = flags.DEFINE_bool('verbose', False, 'Show library INFO logs and full tracebacks.')

HOST_MEMORY = flags.DEFINE_enum('host_memory', 'auto', runtime.HOST_MEMORY_MODES,
                                runtime.HOST_MEMORY_HELP)

CLUSTER_TIMEOUT = flags.DEFINE_integer(
    'cluster_timeout', 100, 'Multi-process jobs: seconds after which a silent process (dead, or '
    'its host lost) makes every other process stop with an error (ecm_jax.cluster).', lower_bound=5)


def run(main: Callable[[Sequence[str]], None],
        errors: type[BaseException] | tuple[type[BaseException], ...] = (), *,
        distributed: bool = False, positional: bool = False, compilation_cache: bool = True) -> None:
  """`absl.app.run` of `main(argv)` after `runtime.start`; see the module doc.

  positional: whether the command takes positional arguments (else any is a usage error).
  distributed, compilation_cache: passed to `runtime.start`.
  """

  def wrapped(argv):
    if not positional and len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    try:
      runtime.start(host_memory=HOST_MEMORY.value, verbose=VERBOSE.value,
                    distributed=distributed, heartbeat_timeout_s=CLUSTER_TIMEOUT.value,
                    compilation_cache=compilation_cache)
      main(argv)
    except errors as e:
      if VERBOSE.value:
        raise
      _exit_with(str(e), storage=isinstance(e, StorageError))
    except OSError as e:
      if VERBOSE.value or e.errno not in files.STORAGE_ERRNOS:
        raise
      _exit_with(f'could not write {e.filename or "a file"} ({e.strerror}): free space there or '
                 'make it writable, then rerun the same command (training resumes from its latest '
                 'checkpoint)', storage=True)

  app.run(wrapped, flags_parser=_parse_flags)


def _exit_with(message: str, storage: bool) -> None:
  """`error: message` on stderr and exit status 2. After a failed write the process ends at once:
  what is on disk is safe, and the exit handlers of libraries (a TensorBoard writer flushing to a
  full disk) would only add their tracebacks."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  if storage:
    os._exit(2)  # pylint: disable=protected-access
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.` key as a one-line error (exit 2)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing key
    text = str(e).encode().decode('unicode_escape').strip('\'"')
    key = re.match(r"'?([^'\n]+)'?", text).group(1)
    hint = re.search(r'Did you mean .*', text)
    named = [arg.split('=')[0] for arg in argv[1:]
             if arg.startswith('--config.') and key in arg.split('=')[0].split('.')]
    print(f'error: {named[0] if named else "a --config override"}: the config has no key {key!r}'
          + (f'. {hint.group(0)}' if hint else ''), file=sys.stderr)
    sys.exit(2)
