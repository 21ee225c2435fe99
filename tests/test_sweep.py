"""python -m ecm_jax.sweep end to end on the synthetic demo data at a tiny size: 2 rows x 2 seeds.

The `unet` runs go through submitit's local executor (the SLURM path), one of them interrupted by
the signal SLURM sends before a time limit, requeued and resumed from its checkpoint; the other
row runs on this machine, one run per local 'device'. The table's figures are checked against the
runs' own metrics.json / per_case.csv / sweep_run.json, and a rerun must start nothing.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from ecm_jax.sweep import runs as runs_lib
from ecm_jax.sweep import table
from helpers import REPO

ROWS, SEEDS = ('unet', 'unet+dws'), (0, 1)
STEPS = 150
TINY = {
    'data.image_size': 32,
    'data.num_workers': 0,
    'data.split': (5, 1, 2),  # two test cases to pair
    'model.features': (4, 8, 8, 16, 16),
    'model.side_features': (8, 4, 4),
    'model.conv_impl': 'xla',
    'train.batch_size': 2,
    'train.eval_batch_size': 8,
    'train.max_steps': STEPS,
    'train.log_every_steps': 1,
    'train.learning_rate': 1e-3,
}


def _sweep_cmd(tmp, rows, *extra):
  overrides = [f'--config.{k}={v}' for k, v in TINY.items()]
  return [sys.executable, '-m', 'ecm_jax.sweep', '--config', str(REPO / 'configs/demo.py'),
          '--rows', ','.join(rows), '--seeds', ','.join(map(str, SEEDS)), '--out',
          str(tmp / 'sweep'), f'--config.data.cache_dir={tmp / "cache"}', *overrides, *extra]


def _env(tmp):
  """One CPU device per run (not the test session's two); one compilation cache for the module."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return dict(env, JAX_COMPILATION_CACHE_DIR=str(tmp / 'xla-cache'))


def _folder(tmp, row, seed):
  return runs_lib.run_folder(tmp / 'sweep', row, seed)


def _logged_steps(folder):
  lines = (folder / 'metrics.jsonl').read_text().splitlines()
  return [r['step'] for r in map(json.loads, lines) if 'train/loss' in r]


def _interrupt_when_training(folder, sweep, timeout=300):
  """SIGUSR2, as SLURM sends before the time limit, to the submitit job training `folder` (the
  parent of its train.py, whose pid the workdir lock holds), once it has logged a step."""
  deadline = time.time() + timeout
  while time.time() < deadline and sweep.poll() is None:
    lock, log = folder / '.lock', folder / 'metrics.jsonl'
    if lock.exists() and log.exists() and _logged_steps(folder):
      pid = int(re.match(r'pid (\d+)', lock.read_text()).group(1))
      job = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])
      os.kill(job, signal.SIGUSR2)
      return
    time.sleep(0.05)
  raise AssertionError('the submitit run never started training')


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('sweep')
  with open(tmp / 'submitit_sweep.log', 'w') as log:
    first = subprocess.Popen(
        _sweep_cmd(tmp, ROWS[:1], '--launcher=submitit_local', '--slurm_gpus_per_run=0'),
        cwd=REPO, env=_env(tmp), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
      _interrupt_when_training(_folder(tmp, ROWS[0], 0), first)
      assert first.wait(timeout=600) == 0, (tmp / 'submitit_sweep.log').read_text()
    finally:
      if first.poll() is None:
        first.kill()
  second = subprocess.run(_sweep_cmd(tmp, ROWS, '--local_devices=0,1'), cwd=REPO, env=_env(tmp),
                          capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stdout + second.stderr
  return tmp, second.stdout


def _eval_metrics(folder):
  return json.loads((folder / 'eval' / 'test' / 'metrics.json').read_text())


def _case_dice(folder):
  with open(folder / 'eval' / 'test' / 'per_case.csv', newline='') as f:
    return {r['case']: 100 * float(r['dice']) for r in csv.DictReader(f)}


def test_the_interrupted_submitit_run_was_requeued_and_resumed(sweep):
  tmp, _ = sweep
  folder = _folder(tmp, ROWS[0], 0)
  state = runs_lib.read_state(folder)
  assert state['train_attempts'] == 2 and state['trained'] and state['evaluated']
  assert (folder / 'train.log').read_text().count('\n=== ') == 2
  assert _logged_steps(folder) == list(range(1, STEPS + 1))  # resumed where it stopped, no gap
  assert runs_lib.read_state(_folder(tmp, ROWS[0], 1))['train_attempts'] == 1


def test_the_second_sweep_skipped_the_finished_runs(sweep):
  _, output = sweep
  assert '2 of 4 runs finished already' in output
  started = re.findall(r'^(.+) seed \d.*: started', output, re.MULTILINE)
  assert started == ['unet+dws', 'unet+dws']


def test_the_table_holds_the_runs_own_figures(sweep):
  tmp, _ = sweep
  out = tmp / 'sweep'
  document = json.loads((out / 'table.json').read_text())
  rows = {r['row']: r for r in document['rows']}
  assert list(rows) == list(ROWS)
  markdown = (out / 'table.md').read_text()
  for row in ROWS:
    folders = [_folder(tmp, row, seed) for seed in SEEDS]
    metrics = [_eval_metrics(f) for f in folders]
    expected = {'dsc': [100 * m['pooled']['dice'] for m in metrics],
                'dice_3d': [100 * m['per_case']['dice']['mean'] for m in metrics]}
    for key, values in expected.items():
      assert rows[row][key]['mean'] == pytest.approx(np.mean(values))
      assert rows[row][key]['sd'] == pytest.approx(np.std(values, ddof=1))
      assert f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}' in markdown
    train_minutes = [runs_lib.read_state(f)['train_seconds'] / 60 for f in folders]
    assert rows[row]['train_minutes']['mean'] == pytest.approx(np.mean(train_minutes))
    assert rows[row]['seeds'] == list(SEEDS)
  assert rows['unet+dws']['params'] > rows['unet']['params'] > 0

  cases = {row: [_case_dice(_folder(tmp, row, seed)) for seed in SEEDS] for row in ROWS}
  names = sorted(cases['unet'][0])
  d = np.array([np.mean([c[n] for c in cases['unet+dws']]) - np.mean([c[n] for c in cases['unet']])
                for n in names])
  delta = rows['unet+dws']['vs_baseline']
  assert rows['unet']['vs_baseline'] is None and delta['cases'] == len(names) == 2
  assert delta['mean'] == pytest.approx(d.mean())
  assert delta['p_wilcoxon'] == pytest.approx(stats.wilcoxon(d).pvalue if d.any() else 1.0)
  assert d.min() - 1e-9 <= delta['ci95'][0] <= delta['mean'] <= delta['ci95'][1] <= d.max() + 1e-9
  with open(out / 'table.csv', newline='') as f:
    lines = list(csv.DictReader(f))
  assert [line['row'] for line in lines] == list(ROWS)
  assert float(lines[1]['delta_dice_3d']) == pytest.approx(d.mean())
  assert (out / 'dice.png').stat().st_size > 0


def test_a_rerun_starts_nothing(sweep):
  tmp, _ = sweep
  watched = [_folder(tmp, row, seed) / name for row in ROWS for seed in SEEDS
             for name in ('sweep_run.json', 'train.log', 'eval.log')]
  before = {path: path.stat().st_mtime_ns for path in watched}
  rerun = subprocess.run(_sweep_cmd(tmp, ROWS), cwd=REPO, env=_env(tmp), capture_output=True,
                         text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert '4 of 4 runs finished already' in rerun.stdout and 'started' not in rerun.stdout
  assert {path: path.stat().st_mtime_ns for path in watched} == before


def test_statistics_of_few_values():
  assert table.mean_sd([0.5, None]) == {'mean': 0.5, 'sd': None, 'n': 1}
  assert table.mean_sd([1.0, 3.0])['sd'] == pytest.approx(np.sqrt(2))

  def figures(row, dice):
    return table.RunFigures(row, 0, '', {}, dice, 0.0, 0.0, len(dice))

  same = table.paired_difference([figures('b', {'a': 50.0, 'b': 60.0})],
                                 [figures('a', {'a': 50.0, 'b': 60.0, 'c': 1.0})])
  assert same == {'cases': 2, 'mean': 0.0, 'ci95': [0.0, 0.0], 'p_wilcoxon': 1.0}


def test_a_config_override_of_the_seed_is_refused(tmp_path):
  result = subprocess.run(_sweep_cmd(tmp_path, ROWS, '--config.seed=3'), cwd=REPO,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: --config.seed=3: the sweep sets it for each run; use --seeds and --rows')


def test_the_title_names_the_data_folder_and_its_labels():
  describe = table._data_description  # pylint: disable=protected-access
  assert describe({'dataset': 'msd', 'root': '/data/chaos_mri/', 'foreground_labels': (2, 3)}) == (
      'chaos_mri (msd, foreground labels 2, 3)')
  assert describe({'dataset': 'synthetic', 'root': None, 'foreground_labels': (1, 2)}) == (
      'SYNTHETIC demo data')
