"""Trains EC-CaM-UNet (or any variant) data-parallel on every visible device.

  python train.py --config configs/kits.py --config.data.root=/data/kits19/data
  python train.py --config configs/demo.py                 # built-in synthetic demo data
  python train.py --config configs/kits.py:unet            # a row of the paper's tables

Restarting with the same --workdir resumes from the latest checkpoint (train state and data
position), giving the same run as an uninterrupted one. SIGINT/SIGTERM save a checkpoint and exit.
Multi-process (one process per host or per GPU; docs/training.md): start this same command in every
process, under srun or mpirun, on Cloud TPU, or with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set; --workdir must be a folder every process sees.
"""

import pathlib

from absl import flags
from ml_collections import config_flags

from ecm_jax import cli
from ecm_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config name>).')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Continue a run in --workdir even though its config differs.')


def default_workdir(config_arg: str) -> pathlib.Path:
  """runs/<config file stem>[-<variant>] for `configs/kits.py[:variant]`."""
  path, _, variant = config_arg.partition(':')
  name = pathlib.Path(path).stem + (f'-{variant}' if variant else '')
  return pathlib.Path('runs') / name.replace('+', '_')


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top  (JAX after the process start-up: the cluster, host memory)
  from ecm_jax.train import loop, preemption
  workdir = pathlib.Path(_WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config'])))
  loop.train_and_evaluate(_CONFIG.value, workdir, stop=preemption.StopSignals(),
                          allow_config_change=_ALLOW_CONFIG_CHANGE.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run(main, UserError, distributed=True)
