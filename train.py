"""Trains EC-CaM-UNet (or any variant) data-parallel on every visible device.

  python train.py --config configs/kits.py --config.data.root=/data/kits19/data
  python train.py --config configs/demo.py                 # built-in synthetic demo data
  python train.py --config configs/kits.py:unet            # a row of the paper's tables

Restarting with the same --workdir resumes from the latest checkpoint (train state and data
iterator), giving the same run as an uninterrupted one. SIGINT/SIGTERM save a checkpoint and exit.
"""

import os
import pathlib
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ecm_jax import host_memory  # no JAX: set up before JAX starts (main)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config name>).')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Continue a run in --workdir even though its config differs.')
_HOST_MEMORY = flags.DEFINE_enum('host_memory', 'auto', host_memory.MODES,
                                 host_memory.FLAG_HELP)


def default_workdir(config_arg: str) -> pathlib.Path:
  """runs/<config file stem>[-<variant>] for `configs/kits.py[:variant]`."""
  path, _, variant = config_arg.partition(':')
  name = pathlib.Path(path).stem + (f'-{variant}' if variant else '')
  return pathlib.Path('runs') / name.replace('+', '_')


def maybe_initialize_distributed() -> None:
  """Multi-host: join the cluster when the launcher's environment says there is one.

  `jax.distributed.initialize()` finds the coordinator itself on Cloud TPU pods, SLURM and Open
  MPI; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  import jax  # pylint: disable=g-import-not-at-top
  multi = ('JAX_COORDINATOR_ADDRESS' in os.environ
           or int(os.environ.get('SLURM_NTASKS', '1')) > 1
           or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
           or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''))
  if multi:
    jax.distributed.initialize()


class StopRequested:
  """SIGINT/SIGTERM set a flag that the loop checks between steps (checkpoint, then exit)."""

  def __init__(self):
    self.signal_name = None
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None:  # a second Ctrl-C stops at once
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def __bool__(self):
    return self.signal_name is not None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  host_memory.configure(_HOST_MEMORY.value)  # before JAX starts; may restart the command
  maybe_initialize_distributed()
  from ecm_jax import trainer, training  # pylint: disable=g-import-not-at-top  (after distributed init)
  training.enable_compilation_cache()
  workdir = pathlib.Path(_WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS['config'])))
  try:
    trainer.train_and_evaluate(_CONFIG.value, workdir, stop=StopRequested(),
                               allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except trainer.USER_ERRORS as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
