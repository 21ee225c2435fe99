"""Process start-up for every entry point: logging, host memory, the cluster, the compile cache.

`start` runs first thing in `main` of train.py, eval.py, the report and the benchmarks. What is
CPU-specific (`ecm_jax.cpu.host_memory`) is chosen here once, from the platform the process will
run on, decided without starting JAX; a GPU/TPU process never imports or configures it.
"""

import functools
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import sys

from ecm_jax import cluster

HOST_MEMORY_MODES = ('auto', 'huge_pages+retain', 'huge_pages', 'retain', 'default')
HOST_MEMORY_HELP = (
    'CPU only: huge_pages backs large host blocks with transparent huge pages (restarts the '
    'command with glibc.malloc.hugetlb=1); retain keeps freed host memory for reuse (more memory, '
    'slower compiles); both spare every step most of its page faults; auto is huge_pages+retain on '
    'the CPU (retain alone where huge pages are not to be had) and default on GPU/TPU; default is '
    'the C library\'s behaviour (ecm_jax.cpu.host_memory).')

# Orbax warnings about what we do on purpose: the best checkpoint by val Dice is kept by a
# preservation policy (orbax still asks for metrics at every save), and evaluation opens the
# checkpoints read-only.
_ORBAX_NOISE = ('Requested `tracked_metric`', 'Given directory is read only',
                'Type handler registry type')  # ecm_jax.train.checkpoint's array handler

_host_memory = None  # ecm_jax.cpu.host_memory once configured (CPU processes only)
_host_memory_in_effect = 'default'


def accelerator_plugin_installed() -> bool:
  """Whether JAX can find a GPU or TPU backend here (a PJRT plugin or libtpu), without starting
  JAX (which would create the threads that host-memory set-up must precede)."""
  return bool(importlib.metadata.entry_points(group='jax_plugins')
              or importlib.util.find_spec('jax_plugins') or importlib.util.find_spec('libtpu'))


def runs_on_cpu() -> bool:
  """Whether this process's JAX will run on the CPU: JAX_PLATFORMS is 'cpu', or it is unset and no
  GPU/TPU plugin is installed. Decided without starting JAX."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  return platforms == 'cpu' or not (platforms or accelerator_plugin_installed())


def configure_logging(verbose: bool = False) -> None:
  """The project's INFO lines on stderr; libraries' routine chatter (orbax and grain log every save
  and worker start at INFO) at WARNING, and the orbax warnings that are noise here silenced."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  absl_logging.use_absl_handler()
  project = logging.getLogger('ecm_jax')
  project.setLevel(logging.DEBUG if verbose else logging.INFO)
  if not project.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    project.addHandler(handler)
  project.propagate = False
  absl_logging.get_absl_logger().addFilter(
      lambda record: not any(noise in record.getMessage() for noise in _ORBAX_NOISE))
  if not verbose:
    # An orbax error with a traceback comes from a background save thread; the exception reaches
    # our code too, which reports it in one line (ecm_jax.train.checkpoint).
    absl_logging.get_absl_logger().addFilter(
        lambda record: not (record.exc_info and f'{os.sep}orbax{os.sep}' in record.pathname))
    # After a failed save, orbax's other write tasks are reported by asyncio, and tensorstore's
    # callbacks into orbax's closed event loop print through sys.excepthook or, from its threads,
    # sys.unraisablehook: the save's own error is reported once, by ecm_jax.train.checkpoint.
    logging.getLogger('asyncio').addFilter(
        lambda record: 'exception was never retrieved' not in record.getMessage())
    sys.excepthook = functools.partial(_skip_closed_loop_errors, sys.excepthook)
    sys.unraisablehook = functools.partial(_skip_closed_loop_unraisable, sys.unraisablehook)


def _is_closed_loop_error(kind, value) -> bool:
  return kind is RuntimeError and str(value) == 'Event loop is closed'


def _skip_closed_loop_errors(excepthook, kind, value, traceback):
  if not _is_closed_loop_error(kind, value):
    excepthook(kind, value, traceback)


def _skip_closed_loop_unraisable(unraisablehook, unraisable):
  if not _is_closed_loop_error(unraisable.exc_type, unraisable.exc_value):
    unraisablehook(unraisable)


def configure_host_memory(mode: str) -> str:
  """On the CPU, `ecm_jax.cpu.host_memory.configure(mode)` (may restart the command); elsewhere
  nothing. Returns the mode in effect. Call before JAX starts."""
  global _host_memory, _host_memory_in_effect
  if mode not in HOST_MEMORY_MODES:
    raise ValueError(f'host memory mode must be one of {HOST_MEMORY_MODES}, got {mode!r}')
  if not runs_on_cpu():
    return 'default'
  from ecm_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top  (CPU only)
  _host_memory = host_memory
  _host_memory_in_effect = host_memory.configure(mode)
  return _host_memory_in_effect


def host_memory_in_effect() -> str:
  """What `configure_host_memory` set up: 'default', 'huge_pages', 'retain' or both."""
  return _host_memory_in_effect


def fit_host_memory(step_temp_bytes: int) -> str | None:
  """After compiling the train step: on a CPU process that retains freed memory, stop retaining if
  the step's temporaries would not fit (`ecm_jax.cpu.host_memory.fit_to_memory`); the message
  saying so, or None."""
  return None if _host_memory is None else _host_memory.fit_to_memory(step_temp_bytes)


def enable_compilation_cache() -> None:
  """Persists compiled steps across processes (a resumed or repeated run skips recompilation).

  Uses $JAX_COMPILATION_CACHE_DIR when set (jax reads it itself), else ~/.cache/ecm_jax/xla.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    path = pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
    jax.config.update('jax_compilation_cache_dir', str(path / 'ecm_jax' / 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def start(*, host_memory: str = 'auto', verbose: bool = False, distributed: bool = False,
          heartbeat_timeout_s: int = 100, compilation_cache: bool = True) -> None:
  """Everything a process sets up before its first JAX computation, in the order it needs.

  distributed: join the multi-process job the launcher started, if any (`ecm_jax.cluster`).
  (`compilation_cache=False` for the benchmarks, which measure compile times.)
  """
  configure_logging(verbose)
  configure_host_memory(host_memory)  # before JAX starts its threads; may restart the command
  if distributed and cluster.initialize(heartbeat_timeout_s) is not None:
    import jax  # pylint: disable=g-import-not-at-top  (started by the cluster)
    if jax.process_index() != 0:  # process 0 reports for the job
      logging.getLogger('ecm_jax').setLevel(logging.WARNING)
  if compilation_cache:
    enable_compilation_cache()
