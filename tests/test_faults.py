"""Faults and misuse end in one clear message and lose nothing: a full or read-only disk, damaged
checkpoints, a second trainer on a workdir, config values out of range.

The full and read-only file systems are small tmpfs mounts (skipped where mounting is not
permitted); the rest runs anywhere. train.py's own resume after a damaged checkpoint is in
tests/test_train_e2e.py.
"""

import contextlib
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from ecm_jax import files
from ecm_jax.errors import ConfigError, DataError, StorageError, WorkdirError
from ecm_jax.models.networks import build_model
from ecm_jax.train import checkpoint, train_state
from ecm_jax.train import loop as trainer
from ecm_jax.train import workdir as workdir_lib
from helpers import REPO, SMALL

# Random values: orbax compresses, and 200 KB of noise stay about 200 KB on disk.
STATE = {'weights': np.random.default_rng(0).normal(size=50_000).astype(np.float32),
         'bias': np.ones(3, np.float32)}


def abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str):
  """A tmpfs mounted at `path` for the block; the test is skipped where mounting is refused."""
  path.mkdir(parents=True, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                          capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({result.stderr.strip()})')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=True)


def save_steps(manager, steps, state=STATE):
  for step in steps:
    checkpoint.save(manager, step, jax.tree.map(jnp.asarray, state))
    checkpoint.wait_until_finished(manager)


def damage(step_dir: pathlib.Path) -> None:
  """Truncates the largest array file of a checkpoint (what a lost write or a bad disk leaves)."""
  largest = max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(largest, 100)


def test_a_full_disk_during_a_save_is_one_error_and_keeps_the_checkpoints(tmp_path):
  with tmpfs(tmp_path / 'disk', 'size=600k') as disk:
    manager = checkpoint.checkpoint_manager(disk / 'run', keep_latest=3)
    save_steps(manager, [1, 2])  # ~200 KB each
    with pytest.raises(StorageError) as error:
      save_steps(manager, [3])
    message = str(error.value)
    assert 'No space left on device' in message and str(manager.directory) in message
    assert 'intact (steps: 1, 2)' in message and 'rerun the same command' in message
    manager.close()
    # The next run resumes from step 2, and what the failed save left is cleared away.
    manager = checkpoint.checkpoint_manager(disk / 'run', keep_latest=3)
    assert manager.all_steps() == [1, 2]
    step, state = checkpoint.restore_newest_readable(manager, abstract(STATE), print)
    assert step == 2
    np.testing.assert_array_equal(state['weights'], STATE['weights'])
    assert sorted(p.name for p in manager.directory.iterdir()) == ['1', '2']
    manager.close()


def test_a_damaged_checkpoint_is_reported_moved_aside_and_the_older_one_used(tmp_path):
  manager = checkpoint.checkpoint_manager(tmp_path, keep_latest=3)
  save_steps(manager, [1, 2])
  damage(tmp_path / 'checkpoints' / '2')
  reports = []
  step, state = checkpoint.restore_newest_readable(manager, abstract(STATE), reports.append)
  assert step == 1
  np.testing.assert_array_equal(state['weights'], STATE['weights'])
  assert len(reports) == 1
  assert reports[0].startswith(f'checkpoint 2 ({tmp_path / "checkpoints" / "2"}) is damaged (')
  assert 'OUT_OF_RANGE' in reports[0] and f'moved it to {tmp_path / "damaged_checkpoints/2"}' in \
      reports[0]
  assert manager.all_steps() == [1]
  assert (tmp_path / 'damaged_checkpoints' / '2').is_dir()
  save_steps(manager, [2])  # training saves that step anew
  assert manager.all_steps() == [1, 2]
  manager.close()


def test_when_no_checkpoint_reads_each_failure_is_named_and_nothing_moved(tmp_path):
  manager = checkpoint.checkpoint_manager(tmp_path, keep_latest=3)
  save_steps(manager, [1, 2])
  other_model = {'weights': jax.ShapeDtypeStruct((7,), np.float32),
                 'bias': jax.ShapeDtypeStruct((3,), np.float32)}
  with pytest.raises(WorkdirError, match=r'no checkpoint in .* could be read: step 2: .*; step 1: '
                                         r".*use that config \(the run's config.json\)"):
    checkpoint.restore_newest_readable(manager, other_model, print)
  assert manager.all_steps() == [1, 2] and not (tmp_path / 'damaged_checkpoints').exists()
  manager.close()


def test_eval_restore_falls_back_from_a_damaged_checkpoint_and_says_so(tmp_path, caplog):
  config = demo.get_config('unet')
  config.model.update(SMALL)
  model = build_model(config.model)
  tx = train_state.make_optimizer(config, 1)
  state = train_state.create_train_state(model, tx, 0)
  manager = checkpoint.checkpoint_manager(tmp_path, keep_latest=2)
  for step in (1, 2):
    checkpoint.save(manager, step, state.replace(step=jnp.asarray(step)))
  checkpoint.wait_until_finished(manager)
  manager.close()
  damage(tmp_path / 'checkpoints' / '2')
  with caplog.at_level('WARNING', logger='ecm_jax'):
    step, variables = checkpoint.restore_variables(tmp_path, config, 'latest')
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, variables['params'], state.params)
  assert f'checkpoint 2 ({tmp_path / "checkpoints" / "2"}) is damaged' in caplog.text
  assert 'using checkpoint 1 instead' in caplog.text
  # A step asked for by number is not replaced by another.
  with pytest.raises(WorkdirError, match=r'could be read: step 2: .*OUT_OF_RANGE'):
    checkpoint.restore_variables(tmp_path, config, '2')
  assert (tmp_path / 'checkpoints' / '2').is_dir()  # eval never moves anything


def test_a_second_trainer_on_a_workdir_is_refused_while_the_first_holds_it(tmp_path):
  config = demo.get_config('unet')
  with workdir_lib.WorkdirLock(tmp_path):
    with pytest.raises(WorkdirError, match=rf'{tmp_path} is in use by another training process '
                                           rf'\(pid {os.getpid()} on .*, since .*\): wait'):
      trainer.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / 'config.json').exists()
  with workdir_lib.WorkdirLock(tmp_path):  # released on exit from the block
    pass


def test_a_lock_is_released_when_its_holder_is_killed(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from ecm_jax.train import workdir; '
       'lock = workdir.WorkdirLock(sys.argv[1]).__enter__(); print("held", flush=True); '
       'time.sleep(600)', str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(WorkdirError, match=f'pid {holder.pid}'):
      workdir_lib.WorkdirLock(tmp_path).__enter__()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lib.WorkdirLock(tmp_path):  # a dead holder's lock is no lock
    pass


def test_read_only_folders_are_refused_before_any_work(tmp_path):
  with tmpfs(tmp_path / 'ro', 'ro,size=64k') as read_only:
    with pytest.raises(StorageError, match=rf'--workdir {read_only}/run is not writable '
                                           r'\(Read-only file system\): choose a writable folder'):
      files.check_writable(read_only / 'run', '--workdir')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    commands = {
        'train': [sys.executable, 'train.py', '--config', 'configs/demo.py',
                  f'--workdir={read_only}/run'],
        'predict': [sys.executable, 'eval.py', f'--workdir={tmp_path}/no-run',
                    f'--predict={tmp_path}', f'--output={read_only}/masks'],
    }
    for name, command in commands.items():
      result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
      assert result.returncode == 2, (name, result.stderr)
      assert result.stderr.strip().splitlines()[-1].startswith('error: --')
      assert 'Read-only file system' in result.stderr and 'Traceback' not in result.stderr


def test_the_free_space_check_names_the_folder_and_the_sizes(tmp_path):
  with pytest.raises(StorageError, match=rf'--workdir {tmp_path}: .* MiB free, but about '
                                         r'.* MiB are needed'):
    files.check_free_space(tmp_path, 2**60, '--workdir')
  files.check_free_space(tmp_path, 1, '--workdir')


@pytest.mark.parametrize('key, value, error, message', [
    ('train.learning_rate', -1e-3, ConfigError, 'config.train.learning_rate must be > 0'),
    ('train.learning_rate', 0.0, ConfigError, 'config.train.learning_rate must be > 0'),
    ('train.weight_decay', -1e-4, ConfigError, 'config.train.weight_decay must be >= 0'),
    ('train.num_epochs', 0, ConfigError, 'config.train.num_epochs must be >= 1'),
    ('train.batch_size', 3, ConfigError, 'config.train.batch_size=3 is not divisible by the 2'),
    ('loss.alpha', 1.5, ConfigError, r'config.loss.alpha must be in \[0, 1\]'),
    ('data.flip_prob', 1.5, DataError, r'config.data.flip_prob=1.5: a probability, must be in'),
    ('data.blur_prob', -0.1, DataError, 'config.data.blur_prob=-0.1: a probability'),
    ('data.blur_sigma', (2.0, 1.0), DataError, r'config.data.blur_sigma=\(2.0, 1.0\)'),
    ('data.dataset', 'kits', DataError, r"config.data.dataset='kits': choose one of"),
    ('model.name', 'unet3d', ConfigError, r"config.model.name must be one of .*got 'unet3d'"),
    ('model.fusion', 'concat', ConfigError, 'config.model.fusion must be one of'),
    ('model.name', 'cenet', ConfigError,
     r"config.data.image_size=64: model.name='cenet' needs a multiple of 32, at least 192"),
])
def test_config_values_are_checked_before_anything_is_read(tmp_path, key, value, error, message):
  config = demo.get_config()
  if key == 'model.name':
    config.model.dws = False
  config.update_from_flattened_dict({key: value})
  with pytest.raises(error, match=message):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_train_py_on_a_disk_that_fills_mid_run_ends_in_one_line_keeping_its_checkpoint(tmp_path):
  """The first checkpoint (step 3, 1.2 MB) fits on the 2.3 MB disk, the second does not."""
  with tmpfs(tmp_path / 'disk', 'size=2300k') as disk:
    command = [sys.executable, 'train.py', '--config', 'configs/demo.py',
               f'--workdir={disk}/run', f'--config.data.cache_dir={tmp_path}/cache',
               '--config.data.image_size=32', '--config.model.features=(4,8,8,16,16)',
               '--config.model.mus_channels=4', '--config.model.side_features=(4,4,4)',
               '--config.model.conv_impl=xla', '--config.train.max_steps=6',
               '--config.train.checkpoint_every_steps=3']
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')  # one device: the sizes above
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: could not write') and 'No space left on device' in last
    assert 'Traceback' not in result.stderr
    manager = checkpoint.checkpoint_manager(disk / 'run', 2, read_only=True)
    assert manager.all_steps() == [3]
    manager.close()
