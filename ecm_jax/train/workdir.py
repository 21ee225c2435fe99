"""Run directories: what a workdir holds, who may use it, and the config its run records.

Layout of a workdir:
  config.json        the resolved config of the run (a restart must match it)
  splits.json        the case-level split (written once, honoured afterwards)
  checkpoints/<step> orbax checkpoints: the latest `train.checkpoint_keep` and the best by val Dice
  damaged_checkpoints/<step>  checkpoints that failed to read, moved aside (`ecm_jax.train.checkpoint`)
  metrics.jsonl      one JSON object per logged step / validation; tensorboard/ the same as events
  .lock              held by the train.py that is using the workdir (process 0 of a job)

In a multi-process job the workdir is one folder that every process sees (a shared file system):
every process writes its part of each checkpoint there, process 0 everything else
(`check_shared` refuses a workdir that is not shared before anything is written).

A workdir becomes a run with its first checkpoint: until then (e.g. a first attempt that stopped on
a mistyped data.root) its config.json may be replaced by the next attempt's without
--allow_config_change.
"""

import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ecm_jax import config as config_lib
from ecm_jax import files
from ecm_jax.errors import WorkdirError

LOCK_NAME = '.lock'
_log = logging.getLogger(__name__)


class WorkdirLock:
  """An exclusive lock on a workdir for the life of one training process (`with WorkdirLock(w):`).

  `flock` on `<workdir>/.lock`: the kernel releases it when the holder exits in any way (also
  kill -9), so a lock is never stale; the file keeps the last holder's pid, host and start time for
  the message a second process gets. On a network file system the lock needs the file system's
  lock support (NFSv4, Lustre with flock); without it a second train.py is not detected.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors='replace').strip() or 'unknown process'
      os.close(fd)
      raise WorkdirError(f'{self.path.parent} is in use by another training process ({holder}): '
                         'wait for it to finish or stop it, or use another --workdir') from None
    os.ftruncate(fd, 0)
    started = datetime.datetime.now().isoformat(timespec='seconds')
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}, since {started}\n'.encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc_info) -> None:
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def check_shared(workdir: pathlib.Path) -> None:
  """In a multi-process job: WorkdirError on every process unless all of them see the file that
  process 0 writes into `workdir` (else each would save checkpoints into its own folder)."""
  if jax.process_count() == 1:
    return
  token = multihost_utils.broadcast_one_to_all(
      np.frombuffer(os.urandom(8), np.uint32) if jax.process_index() == 0 else np.zeros(2, np.uint32))
  probe = pathlib.Path(workdir) / f'.shared-check-{"".join(f"{t:08x}" for t in np.asarray(token))}'
  if jax.process_index() == 0:
    probe.touch()
  multihost_utils.sync_global_devices('ecm_jax: shared-workdir probe written')
  sees = multihost_utils.process_allgather(np.asarray(probe.exists()))
  multihost_utils.sync_global_devices('ecm_jax: shared-workdir probe read')
  if jax.process_index() == 0:
    probe.unlink()
  blind = [int(i) for i in np.flatnonzero(~np.asarray(sees))]
  if blind:
    raise WorkdirError(
        f'--workdir {workdir} is not shared between the processes of this job: process(es) '
        f'{", ".join(map(str, blind))} do not see the file process 0 wrote there. Use a folder on '
        'a file system that every host mounts at the same path (NFS, Lustre, GCS FUSE, ...).')


def record_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, *,
                  has_checkpoint: bool, allow_config_change: bool, write: bool = True) -> None:
  """Refuses to continue a run (a workdir with a checkpoint) under another config unless
  `allow_config_change`; then records `config` in config.json (when `write`: process 0).

  A workdir without a checkpoint is not yet a run: a different config replaces the recorded one,
  and the split the earlier attempt wrote (splits.json, made from that config) is removed.
  """
  path = pathlib.Path(workdir) / 'config.json'
  new = config_lib.to_dict(config)
  if path.exists():
    diff = config_lib.differences(json.loads(path.read_text()), new)
    if diff and has_checkpoint and not allow_config_change:
      raise WorkdirError(
          f'{workdir} holds a run with a different config ({path}):\n  ' + '\n  '.join(diff) +
          '\nUse another --workdir, or pass --allow_config_change to continue this run with the '
          'new config.')
    if diff and not has_checkpoint and write:
      _log.info('%s has no checkpoint yet: replacing its config (%s)', workdir, '; '.join(diff))
      (pathlib.Path(workdir) / 'splits.json').unlink(missing_ok=True)
  if write:
    files.write_json(path, new)


def load_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config a run recorded, as a ConfigDict (for eval and inference)."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.exists():
    raise WorkdirError(f'{workdir} is not a training run: {path} is missing.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))
