"""Trains and evaluates rows x seeds of a config, then writes the table (docs/reproduce.md).

  python -m ecm_jax.sweep --config configs/msd_heart.py --rows unet,unet+cc,ec_cam_unet \
      --seeds 0,1,2 --out sweeps/NAME [--baseline unet] [--config.key=value ...]
  ... --local_devices 0,1,2,3                      # one run at a time per local GPU
  ... --launcher slurm --slurm_partition gpu       # SLURM, through submitit: an array job

Each (row, seed) is `train.py --config CONFIG:ROW --config.seed=SEED` and `eval.py` in
`<out>/runs/<row>/seed_<seed>/`. Run the same command again to resume: finished runs are
skipped, interrupted ones resume from their checkpoint; more rows or seeds may be added later,
the config and the overrides may not change. The table is written from the finished runs
whatever happened to the others: `<out>/table.md`, `table.csv`, `table.json`, `dice.png`.
"""

import json
import pathlib
import shlex
import shutil
import sys

from absl import flags
from ml_collections import config_flags

from configs.default import VARIANTS
from ecm_jax import cli, files
from ecm_jax.errors import UserError
from ecm_jax.sweep import launchers
from ecm_jax.sweep import runs as runs_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Dataset config file, without a variant (the rows are --rows); '
    '--config.key=value overrides go to every run.', lock_config=True)
_ROWS = flags.DEFINE_list('rows', None, 'Rows of the table: VARIANTS of configs/default.py.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'config.seed of each repetition of a row.')
_OUT = flags.DEFINE_string('out', None, 'Sweep folder: the runs and the table.')
_BASELINE = flags.DEFINE_string('baseline', None, 'Row the others are compared with (default: the '
                                'first of --rows).')
_LAUNCHER = flags.DEFINE_enum(
    'launcher', 'local', ['local', 'slurm', 'submitit_local'],
    'local: on this machine; slurm: a SLURM job per run through submitit; submitit_local: the '
    'SLURM path on this machine (submitit\'s local executor, every run at once; for testing).')
_LOCAL_DEVICES = flags.DEFINE_list(
    'local_devices', [], 'local: one run at a time per device listed (CUDA_VISIBLE_DEVICES); '
    'empty: one run after another on every visible device.')
_TABULATE_ONLY = flags.DEFINE_bool('tabulate_only', False, 'Start nothing: only write the table '
                                   'of the runs finished so far.')
# The job of a run, for --launcher slurm (and submitit_local, but for the partition).
_PARTITION = flags.DEFINE_string('slurm_partition', None, 'SLURM partition.')
_GPUS = flags.DEFINE_integer('slurm_gpus_per_run', 1, 'GPUs of a run (one node).', lower_bound=0)
_CPUS = flags.DEFINE_integer('slurm_cpus_per_run', 8, 'CPU cores of a run.', lower_bound=1)
_MEM = flags.DEFINE_integer('slurm_mem_gb', 64, 'Memory of a run, GB.', lower_bound=1)
_TIME = flags.DEFINE_integer('slurm_time_min', 24 * 60, 'Time limit of a job, minutes: a run that '
                             'needs longer is requeued and resumes.', lower_bound=1)
_REQUEUES = flags.DEFINE_integer('slurm_max_requeues', 5, 'Requeues of a job that reached its time '
                                 'limit (preemptions do not count).', lower_bound=0)
_SIGNAL_DELAY = flags.DEFINE_integer('slurm_signal_delay_s', 180, 'Seconds before the time limit '
                                     'at which the run saves and the job is requeued.',
                                     lower_bound=30)
_ARRAY = flags.DEFINE_bool('slurm_array', True, 'One array job (else one job per run).')
_PARALLEL = flags.DEFINE_integer('slurm_array_parallelism', 64, 'Runs of the array job running at '
                                 'once.', lower_bound=1)
_EXTRA = flags.DEFINE_list('slurm_parameters', [], 'More sbatch options as key=value, e.g. '
                           'account=abc,qos=high,constraint=a100.')


class SweepError(UserError):
  """A sweep that cannot start (flags, --out) or whose runs did not all finish."""


def _config_arguments() -> tuple[str, list[str]]:
  """The config file (absolute) and the `--config.key=value` arguments of the command line."""
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  if ':' in config_file:
    raise SweepError(f'--config {config_file}: give the file without a variant; the rows are '
                     '--rows')
  overrides = []
  argv = sys.argv[1:]
  for i, arg in enumerate(argv):
    if arg.startswith('--config.'):
      overrides.append(arg if '=' in arg else f'{arg}={argv[i + 1]}')
  for override in overrides:
    if override.split('=')[0] in ('--config.seed', '--config.variant'):
      raise SweepError(f'{override}: the sweep sets it for each run; use --seeds and --rows')
  return str(pathlib.Path(config_file).resolve()), overrides


def _check_record(out: pathlib.Path, config_file: str, overrides: list[str]) -> None:
  """Records the config and overrides of the sweep in <out>/sweep.json; refuses other ones."""
  record = {'config': config_file, 'overrides': sorted(overrides)}
  path = out / 'sweep.json'
  if path.exists():
    before = json.loads(path.read_text())
    if before != record:
      differences = [f'config {before["config"]} -> {config_file}'] if (
          before['config'] != config_file) else []
      differences += [f'without {o}' for o in before['overrides'] if o not in record['overrides']]
      differences += [f'with {o}' for o in record['overrides'] if o not in before['overrides']]
      raise SweepError(f'--out {out} holds a sweep of another config ({path}; here '
                       f'{", ".join(differences)}): give its config and overrides to resume or '
                       'extend it, or another --out')
  else:
    files.write_json(path, record)


def _launch(todo: list[runs_lib.Run], out: pathlib.Path) -> dict:
  """The runs through --launcher; per run, None when finished, else why not."""
  if _LAUNCHER.value == 'local':
    return launchers.run_here(todo, _LOCAL_DEVICES.value)
  cluster = 'slurm' if _LAUNCHER.value == 'slurm' else 'local'
  parameters = {'name': f'sweep_{out.name}', 'timeout_min': _TIME.value,
                'gpus_per_node': _GPUS.value, 'cpus_per_task': _CPUS.value, 'mem_gb': _MEM.value,
                'nodes': 1, 'tasks_per_node': 1}
  if cluster == 'slurm':
    if not shutil.which('sbatch'):
      raise SweepError('--launcher slurm: sbatch not found; run the sweep where jobs are submitted '
                       '(a SLURM login node)')
    malformed = [p for p in _EXTRA.value if '=' not in p]
    if malformed:
      raise SweepError(f'--slurm_parameters {",".join(malformed)}: give key=value pairs')
    parameters.update(slurm_partition=_PARTITION.value, slurm_signal_delay_s=_SIGNAL_DELAY.value,
                      slurm_array_parallelism=_PARALLEL.value,
                      slurm_additional_parameters=dict(p.split('=', 1) for p in _EXTRA.value))
  return launchers.submit(todo, cluster, out / 'submitit', parameters, array=_ARRAY.value,
                          max_requeues=_REQUEUES.value)


def main(argv):
  del argv
  if not _ROWS.value or not _OUT.value:
    raise SweepError('give --rows (e.g. unet,ec_cam_unet) and --out (the sweep folder)')
  rows = list(dict.fromkeys(_ROWS.value))
  unknown = [row for row in rows if row not in VARIANTS]
  if unknown:
    raise SweepError(f'--rows: unknown {", ".join(unknown)}; choose from {", ".join(VARIANTS)}')
  try:
    seeds = list(dict.fromkeys(int(seed) for seed in _SEEDS.value))
  except ValueError:
    raise SweepError(f'--seeds {",".join(_SEEDS.value)}: give integers, e.g. 0,1,2') from None
  baseline = _BASELINE.value or rows[0]
  if baseline not in rows:
    raise SweepError(f'--baseline {baseline} is not one of --rows')
  if not (runs_lib.TRAIN.exists() and runs_lib.EVAL.exists()):
    raise SweepError(f'{runs_lib.TRAIN} not found: the sweep runs the train.py and eval.py of a '
                     'repository checkout; install it with `pip install -e .` there')
  out = files.check_writable(_OUT.value, '--out')
  config_file, overrides = _config_arguments()
  _check_record(out, config_file, overrides)
  flags_for_runs = [f'--host_memory={cli.HOST_MEMORY.value}'] + (
      ['--verbose'] if cli.VERBOSE.value else [])
  planned = runs_lib.plan(out, config_file, rows, seeds, overrides, flags_for_runs)

  todo = [run for run in planned if not runs_lib.finished(run.folder)]
  print(f'{len(planned) - len(todo)} of {len(planned)} runs finished already', flush=True)
  if _TABULATE_ONLY.value:
    outcomes = {run: 'not started (--tabulate_only)' for run in todo}
  else:
    outcomes = _launch(todo, out) if todo else {}

  finished = [run for run in planned if runs_lib.finished(run.folder)]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')  # this process only lowers models (GFLOPs)
  from ecm_jax.sweep import table  # pylint: disable=g-import-not-at-top
  command = shlex.join(['python', '-m', 'ecm_jax.sweep', *sys.argv[1:]])
  if finished:
    print(table.write(out, finished, rows, baseline, command))
    print(f'written to {out}/table.md, table.csv, table.json, dice.png')
  unfinished = [run for run in planned if run not in finished]
  if unfinished:
    reasons = '; '.join(f'{run.name}: {outcomes.get(run) or "not started"}' for run in unfinished)
    raise SweepError(f'{len(unfinished)} of {len(planned)} runs not finished (the table has the '
                     f'others; run the same command again to resume): {reasons}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run(main, UserError, compilation_cache=False)
