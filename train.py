"""Trains EC-CaM-UNet (or any variant) data-parallel on every visible device.

  python train.py --config configs/kits.py --config.data.root=/data/kits19/data
  python train.py --config configs/demo.py                 # built-in synthetic demo data
  python train.py --config configs/kits.py:unet            # a row of the paper's tables

Restarting with the same --workdir resumes from the latest checkpoint (train state and data
iterator), giving the same run as an uninterrupted one. SIGINT/SIGTERM save a checkpoint and exit.
"""

import pathlib
import signal

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
  del argv
  from ecm_jax.train import loop  # pylint: disable=g-import-not-at-top  (after distributed start-up)
  workdir = pathlib.Path(_WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config'])))
  loop.train_and_evaluate(_CONFIG.value, workdir, stop=StopRequested(),
                          allow_config_change=_ALLOW_CONFIG_CHANGE.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run(main, UserError, distributed=True)
