"""train.py end to end on the built-in synthetic data: exact resume after SIGKILL and from behind a
damaged checkpoint, clean stop on SIGTERM, refusal of a workdir holding another config, NaN stop,
and config errors; two-process jobs: the same run, SIGTERM to one process, a lost process, a
workdir that is not shared, sharded evaluation (more faults: tests/test_faults.py)."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from ecm_jax import runtime
from ecm_jax.cpu import host_memory
from ecm_jax.train import checkpoint, step
from ecm_jax.train import loop as trainer
from helpers import REPO, tensorboard_events  # noqa: E402

# A tiny full EC-CaM-UNet on the synthetic demo data: every feature on, a few seconds a step.
TINY = {
    'data.image_size': 32,
    'data.num_workers': 0,
    'model.features': (4, 8, 8, 16, 16),
    'model.mus_channels': 4,
    'model.side_features': (8, 4, 4),
    'model.cc_hidden': 2,
    'model.conv_impl': 'xla',  # compiles ~2x faster than CPU's 'gemm' (tests/test_ops.py covers it)
    'train.batch_size': 2,
    'train.eval_batch_size': 8,
    'train.max_steps': 12,
    'train.checkpoint_every_steps': 3,
    'train.log_every_steps': 1,
    'train.learning_rate': 1e-3,
}


def _train_cmd(tmp, workdir, *extra):
  flags = [f'--config.{k}={v}' for k, v in TINY.items()]
  return [sys.executable, str(REPO / 'train.py'), '--config', str(REPO / 'configs/demo.py'),
          '--workdir', str(workdir), f'--config.data.cache_dir={tmp / "cache"}', *flags, *extra]


def _env(tmp):
  """Two simulated devices; one compilation cache for the runs of a test module."""
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
              JAX_COMPILATION_CACHE_DIR=str(tmp / 'xla-cache'))


def _losses(workdir):
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return {r['step']: r['train/loss'] for r in map(json.loads, lines) if 'train/loss' in r}


def _final_params(workdir):
  manager = checkpoint.checkpoint_manager(pathlib.Path(workdir), 2, read_only=True)
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored['state']['params']


def _start(cmd, tmp, log_path):
  """train.py in the background, its output to a file (a full pipe would block it)."""
  with open(log_path, 'w') as log:
    return subprocess.Popen(cmd, env=_env(tmp), stdout=subprocess.DEVNULL, stderr=log, text=True)


def _wait_for_step(workdir, step, proc, log_path, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'train.py exited early:\n{pathlib.Path(log_path).read_text()}')
    path = pathlib.Path(workdir) / 'metrics.jsonl'
    if path.exists() and max(_losses(workdir), default=0) >= step:
      return
    time.sleep(0.2)
  raise AssertionError(f'step {step} not reached')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('run')
  workdir = tmp / 'full'
  subprocess.run(_train_cmd(tmp, workdir), env=_env(tmp), check=True, capture_output=True, text=True)
  return tmp, workdir


def test_uninterrupted_run_writes_everything(uninterrupted):
  _, workdir = uninterrupted
  assert sorted(_losses(workdir)) == list(range(1, 13))
  for name in ('config.json', 'splits.json', 'metrics.jsonl', 'learning_curves.png'):
    assert (workdir / name).exists(), name
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('val/dice' in r for r in records)
  assert json.loads((workdir / 'config.json').read_text())['train']['max_steps'] == 12


def test_tensorboard_holds_the_metrics_and_throughput(uninterrupted):
  _, workdir = uninterrupted
  scalars = tensorboard_events(workdir)['scalars']
  losses = _losses(workdir)
  # The same values as metrics.jsonl (TensorBoard stores float32).
  assert [(s, pytest.approx(v, rel=1e-6)) for s, v in scalars['train/loss']] == \
      [(s, losses[s]) for s in sorted(losses)]
  for tag in ('train/lr', 'train/grad_norm', 'train/loss_main', 'val/dice'):
    assert scalars[tag], tag
  assert [s for s, _ in scalars['val/dice']] == [
      json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
      if 'val/dice' in l]
  for tag in ('perf/images_per_s', 'perf/step_s'):
    assert all(v > 0 for _, v in scalars[tag]), tag
  assert all(0 <= v <= 1 for _, v in scalars['perf/data_wait_share'])


def test_progress_is_one_line_per_log_step_without_a_terminal(uninterrupted, tmp_path):
  tmp, _ = uninterrupted
  # Two grain workers: their shared memory is released when the run ends (no leak warning).
  result = subprocess.run(_train_cmd(tmp, tmp_path / 'w', '--config.train.max_steps=4',
                                     '--config.train.log_every_steps=2',
                                     '--config.data.num_workers=2'),
                          env=_env(tmp), capture_output=True, text=True, check=True)
  assert '\r' not in result.stderr
  lines = [l for l in result.stderr.splitlines() if ' steps/s, ETA ' in l]
  assert [l.split(':')[0].split()[-1] for l in lines] == ['2/4', '4/4'], result.stderr
  assert all('loss ' in l and 'data wait ' in l for l in lines)
  # Our INFO lines are shown; library noise is not.
  assert 'preprocessing cache' in result.stderr
  for noise in ('tracked_metric', 'read only', 'leaked shared_memory', 'Traceback'):
    assert noise not in result.stderr, noise


def test_sigkill_then_resume_gives_the_same_run(uninterrupted):
  tmp, full = uninterrupted
  workdir = tmp / 'killed'
  proc = _start(_train_cmd(tmp, workdir), tmp, tmp / 'killed.log')
  _wait_for_step(workdir, 7, proc, tmp / 'killed.log')  # past the checkpoint of step 6, before that of step 9
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(_train_cmd(tmp, workdir), env=_env(tmp), check=True, capture_output=True, text=True)
  expected, got = _losses(full), _losses(workdir)
  assert sorted(got) == list(range(1, 13))
  np.testing.assert_array_equal([got[s] for s in range(1, 13)], [expected[s] for s in range(1, 13)])
  step_a, params_a = _final_params(full)
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b == 12
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_cleanly(uninterrupted):
  tmp, _ = uninterrupted
  workdir = tmp / 'terminated'
  log = tmp / 'terminated.log'
  proc = _start(_train_cmd(tmp, workdir, '--config.train.checkpoint_every_steps=100'), tmp, log)
  _wait_for_step(workdir, 2, proc, log)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  err = log.read_text()
  assert proc.returncode == 0, err
  assert 'SIGTERM: saved step' in err
  step, _ = _final_params(workdir)
  assert 2 <= step < 12


def test_workdir_with_another_config_is_refused(uninterrupted):
  tmp, full = uninterrupted
  before = sorted(p.name for p in (full / 'checkpoints').iterdir())
  result = subprocess.run(_train_cmd(tmp, full, '--config.train.learning_rate=0.5'), env=_env(tmp),
                          capture_output=True, text=True)
  assert result.returncode == 2
  assert 'holds a run with a different config' in result.stderr
  assert 'train.learning_rate: 0.001 -> 0.5' in result.stderr
  assert sorted(p.name for p in (full / 'checkpoints').iterdir()) == before


def test_unknown_config_key_is_one_line_with_the_suggestion(tmp_path):
  result = subprocess.run(_train_cmd(tmp_path, tmp_path / 'w', '--config.train.learnin_rate=1'),
                          env=_env(tmp_path), capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      "error: --config.train.learnin_rate: the config has no key 'learnin_rate'. "
      'Did you mean "learning_rate" instead of "learnin_rate"?')
  assert not (tmp_path / 'w').exists()


def test_a_damaged_latest_checkpoint_is_reported_and_the_run_resumes_from_the_one_before(
    uninterrupted):
  """The same run as the uninterrupted one, from checkpoint 9 when checkpoint 12 is damaged."""
  tmp, full = uninterrupted
  workdir = tmp / 'damaged'
  shutil.copytree(full, workdir)
  largest = max((p for p in (workdir / 'checkpoints' / '12').rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  os.truncate(largest, 100)
  result = subprocess.run(_train_cmd(tmp, workdir), env=_env(tmp), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert (f'checkpoint 12 ({workdir / "checkpoints" / "12"}) is damaged' in result.stderr
          and 'resumed from checkpoint 9' in result.stderr)
  assert (workdir / 'damaged_checkpoints' / '12').is_dir()
  step_a, params_a = _final_params(full)
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b == 12
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  """A loss that turns NaN at step 5 stops the run; the checkpoint of step 3 stays the latest."""
  config = demo.get_config('unet')  # the cheapest graph: this test is about the loop
  config.update_from_flattened_dict(dict(TINY, **{'data.cache_dir': str(tmp_path / 'cache')}))
  real_train_step = step.train_step

  def diverging_step(state, batch, **kw):
    state, m = real_train_step(state, batch, **kw)
    m['loss'] = jnp.where(state.step >= 5, jnp.nan, m['loss'])
    return state, m

  monkeypatch.setattr(step, 'train_step', diverging_step)
  with pytest.raises(trainer.NonFiniteLossError, match=r'non-finite loss nan at step 5'):
    trainer.train_and_evaluate(config, tmp_path / 'w')
  manager = checkpoint.checkpoint_manager(tmp_path / 'w', 2, read_only=True)
  assert manager.latest_step() == 3


def test_trainer_fits_host_memory_to_its_compiled_step(tmp_path, monkeypatch, capsys):
  """On a CPU process configured for host memory, the trainer hands its compiled step's
  temporaries to `host_memory.fit_to_memory` once, before the first step, prints what it says,
  and trains with that compiled step."""
  config = demo.get_config('unet')
  config.update_from_flattened_dict(dict(TINY, **{'data.cache_dir': str(tmp_path / 'cache'),
                                                  'train.max_steps': 2}))
  seen = []
  monkeypatch.setattr(runtime, '_host_memory', host_memory)  # as runtime.start leaves a CPU process
  monkeypatch.setattr(host_memory, 'fit_to_memory',
                      lambda temp_bytes: seen.append(temp_bytes) or 'host memory: (test) stopped')
  trainer.train_and_evaluate(config, tmp_path / 'w')
  assert len(seen) == 1 and 0 < seen[0] < 2**30  # a tiny step's temporaries: some, below a GiB
  assert 'host memory: (test) stopped' in capsys.readouterr().err
  assert set(_losses(tmp_path / 'w')) == {1, 2}


# Multi-process jobs: two processes on this machine through the documented variables (one
# simulated device each, CPU collectives) against the uninterrupted 1-process 2-device run.
# Losses agree to float32 summation order (the same global batches, BatchNorm over the same rows).
PROCESS_RTOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_job(tmp, workdirs, name, *extra):
  """Two train.py processes of one job (`workdirs`: one per process, normally the same); returns
  their Popen objects and log paths."""
  port = _free_port()
  procs, logs = [], []
  for process_id, workdir in enumerate(workdirs):
    log_path = tmp / f'{name}.{process_id}.log'
    env = dict(_env(tmp), XLA_FLAGS='--xla_force_host_platform_device_count=1',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(process_id))
    with open(log_path, 'w') as log:
      procs.append(subprocess.Popen(_train_cmd(tmp, workdir, *extra), env=env,
                                    stdout=subprocess.DEVNULL, stderr=log, text=True))
    logs.append(log_path)
  return procs, logs


def _resume(tmp, workdir, *extra):
  result = subprocess.run(_train_cmd(tmp, workdir, *extra), env=_env(tmp), capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr


def _assert_losses_match(workdir, reference, steps):
  got, expected = _losses(workdir), _losses(reference)
  assert sorted(got) == list(steps)
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps],
                             rtol=PROCESS_RTOL)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_one_process_resumes(
    uninterrupted):
  tmp, full = uninterrupted
  workdir = tmp / 'two'
  rarely = '--config.train.checkpoint_every_steps=100'
  procs, logs = _start_job(tmp, [workdir, workdir], 'two', rarely)
  _wait_for_step(workdir, 3, procs[0], logs[0])
  procs[1].send_signal(signal.SIGTERM)  # a scheduler preempting one host
  for proc, log in zip(procs, logs):
    proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()
  saved = checkpoint.checkpoint_manager(workdir, 2, read_only=True).latest_step()
  assert 3 <= saved < 12
  assert f'saved step {saved} to' in logs[0].read_text()
  _assert_losses_match(workdir, full, range(1, saved + 1))
  # The job's checkpoint, resumed by one process (2 devices), continues the same run.
  _resume(tmp, workdir, rarely)
  _assert_losses_match(workdir, full, range(1, 13))


def test_a_process_that_dies_stops_the_other_and_the_run_resumes(uninterrupted):
  tmp, full = uninterrupted
  workdir = tmp / 'lost'
  procs, logs = _start_job(tmp, [workdir, workdir], 'lost', '--cluster_timeout=20')
  _wait_for_step(workdir, 4, procs[0], logs[0])  # past the checkpoint of step 3
  procs[1].send_signal(signal.SIGKILL)
  started = time.time()
  procs[0].wait(timeout=120)
  assert procs[0].returncode != 0
  assert time.time() - started < 90, 'the survivor must stop soon after the heartbeat timeout'
  _resume(tmp, workdir)
  _assert_losses_match(workdir, full, range(1, 13))


def test_a_workdir_that_is_not_shared_is_refused_by_every_process(uninterrupted):
  tmp, _ = uninterrupted
  workdirs = [tmp / 'host0', tmp / 'host1']
  procs, logs = _start_job(tmp, workdirs, 'unshared')
  for proc, log in zip(procs, logs):
    proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == 2, err
    assert 'is not shared between the processes of this job: process(es) 1 do not see' in err
  assert not any((w / 'checkpoints').exists() for w in workdirs)


def test_eval_on_two_processes_gives_the_one_process_figures(uninterrupted):
  tmp, full = uninterrupted
  port = _free_port()
  cmd = lambda out: [sys.executable, str(REPO / 'eval.py'), '--workdir', str(out), '--split',
                     'train']  # six cases: three per process
  one = tmp / 'eval_one'
  shutil.copytree(full, one, ignore=shutil.ignore_patterns('eval'))
  subprocess.run(cmd(one), env=_env(tmp), check=True, capture_output=True, text=True)
  procs = [subprocess.Popen(cmd(full), env=dict(
      _env(tmp), XLA_FLAGS='--xla_force_host_platform_device_count=1',
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [proc.communicate(timeout=300) for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0], outputs
  assert 'per case (3D)' in outputs[0][0] and 'per case' not in outputs[1][0]  # process 0 reports
  for name in ('per_case.csv', 'metrics.json'):
    assert ((full / 'eval' / 'train' / name).read_text()
            == (one / 'eval' / 'train' / name).read_text()), name
