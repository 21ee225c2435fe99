"""One run of a sweep: a (row, seed) trained by train.py and evaluated by eval.py, as subprocesses.

A run's folder, `<out>/runs/<row>/seed_<seed>/`, is train.py's --workdir. Beside what train.py and
eval.py write there, the sweep keeps
  sweep_run.json   {"trained", "evaluated": what is done; "train_seconds", "train_attempts",
                   "eval_seconds": the wall time of the train.py / eval.py processes, summed over
                   attempts (start-up, data preparation, compilation, validation, saves included)};
  train.log, eval.log   the output of every attempt, appended.
`execute` does what is left: a trained run is not trained again, an evaluated one not evaluated
again, and an interrupted training resumes from its latest checkpoint (train.py's own resume).

Training counts as done when train.py exits 0, no stop reached this process meanwhile, and
metrics.jsonl ends with a validation record (train.py validates after its last step; a run that
a signal stopped ends with the training records of the step it saved).
"""

import dataclasses
import datetime
import json
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time

from ecm_jax import files
from ecm_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN, EVAL = REPO / 'train.py', REPO / 'eval.py'
SPLIT = 'test'  # the split the tables report
STATE_FILE = 'sweep_run.json'
_NEW_STATE = {'trained': False, 'evaluated': False, 'train_seconds': 0.0, 'train_attempts': 0,
              'eval_seconds': 0.0}


class RunFailed(UserError):
  """train.py or eval.py of a run exited with an error (the message quotes it and names the log)."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One (row, seed) of a sweep and the two commands that make it."""
  row: str
  seed: int
  folder: pathlib.Path
  train_command: tuple[str, ...]
  eval_command: tuple[str, ...]

  @property
  def name(self) -> str:
    return f'{self.row} seed {self.seed}'


def run_folder(out: pathlib.Path, row: str, seed: int) -> pathlib.Path:
  return pathlib.Path(out) / 'runs' / row.replace('+', '_') / f'seed_{seed}'


def plan(out: pathlib.Path, config_file: str, rows, seeds, overrides=(), flags=()) -> list[Run]:
  """The runs of rows x seeds (row-major). `config_file`: an absolute path without a variant;
  `overrides`: `--config.key=value` arguments for train.py; `flags`: for train.py and eval.py."""
  planned = []
  for row in rows:
    for seed in seeds:
      folder = run_folder(out, row, seed).resolve()
      train = (sys.executable, str(TRAIN), '--config', f'{config_file}:{row}', '--workdir',
               str(folder), *overrides, f'--config.seed={seed}', *flags)
      evaluate = (sys.executable, str(EVAL), '--workdir', str(folder), '--split', SPLIT, *flags)
      planned.append(Run(row, int(seed), folder, train, evaluate))
  return planned


def read_state(folder: pathlib.Path) -> dict:
  path = pathlib.Path(folder) / STATE_FILE
  return {**_NEW_STATE, **(json.loads(path.read_text()) if path.exists() else {})}


def finished(folder: pathlib.Path) -> bool:
  state = read_state(folder)
  return state['trained'] and state['evaluated']


class Processes:
  """The train.py / eval.py processes this process runs, and whether it was asked to stop.

  `stop` and `wait_stopped` take no lock, so a signal handler may call them while `run` waits.
  """

  def __init__(self):
    self.stopped = None  # why a stop was asked ('SIGINT', ...), None while none was
    self._live = set()

  def stop(self, reason: str, forward: bool = True) -> None:
    """Records the stop; `forward`: SIGTERM to each running process (train.py saves and exits)."""
    self.stopped = reason
    if forward:
      for process in tuple(self._live):
        process.send_signal(signal.SIGTERM)

  def wait_stopped(self) -> None:
    """Until every running process has exited."""
    while any(process.returncode is None for process in tuple(self._live)):
      time.sleep(0.1)

  def run(self, command, log_path: pathlib.Path, env=None) -> int:
    """Runs `command` (in this process's folder: relative paths in the overrides mean what they
    mean here), its output appended to `log_path`; its exit status.

    The process has its own session (a Ctrl-C reaches this process, which forwards a stop once)
    and SIGUSR2 blocked: SLURM signals every process of a job, and submitit's warning before the
    time limit (USR2) would kill train.py, whose checkpoint this process asks for with SIGTERM.
    A blocked signal stays blocked across exec.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, 'a') as log:
      started = datetime.datetime.now().isoformat(timespec='seconds')
      log.write(f'\n=== {started} {shlex.join(command)}\n')
      log.flush()
      mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
      try:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
      finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    self._live.add(process)
    threading.Thread(target=process.wait, daemon=True).start()  # sets process.returncode
    try:
      if self.stopped:
        process.send_signal(signal.SIGTERM)
      while process.returncode is None:
        time.sleep(0.1)
    finally:
      if process.returncode is None:  # this process is leaving on an exception: the run saves
        process.send_signal(signal.SIGTERM)
      self._live.discard(process)
    return process.returncode


def _ends_with_validation(folder: pathlib.Path) -> bool:
  path = folder / 'metrics.jsonl'
  lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
  return bool(lines) and any(key.startswith('val/') for key in json.loads(lines[-1]))


def _failure(run: Run, script: str, returncode: int, log_path: pathlib.Path) -> RunFailed:
  tail = log_path.read_text(errors='replace').splitlines()[-200:]
  errors = [line for line in tail if line.startswith('error:')]
  last = errors[-1] if errors else next((line for line in reversed(tail) if line.strip()), '')
  return RunFailed(f'{run.name}: {script} exited with status {returncode} ({last.strip()}); '
                   f'log: {log_path}')


def _attempt(run: Run, processes: Processes, state: dict, step: str, env) -> bool:
  """One train.py or eval.py process of `run` (step 'train' or 'eval'), timed into `state`;
  whether it completed. RunFailed when it failed without a stop."""
  command, script = ((run.train_command, 'train.py') if step == 'train'
                     else (run.eval_command, 'eval.py'))
  log_path = run.folder / f'{step}.log'
  started = time.monotonic()
  try:
    returncode = processes.run(command, log_path, env)
  finally:
    state[f'{step}_seconds'] += time.monotonic() - started
    if step == 'train':
      state['train_attempts'] += 1
    files.write_json(run.folder / STATE_FILE, state)
  if processes.stopped:
    return False
  if returncode:
    raise _failure(run, script, returncode, log_path)
  return step == 'eval' or _ends_with_validation(run.folder)


def execute(run: Run, processes: Processes, env=None) -> bool:
  """Trains and evaluates `run` as far as it is not yet; True when both are done, False when a
  stop came first (run it again to resume). RunFailed when train.py or eval.py fails."""
  state = read_state(run.folder)
  for step in ('train', 'eval'):
    done = 'trained' if step == 'train' else 'evaluated'
    if state[done]:
      continue
    if processes.stopped or not _attempt(run, processes, state, step, env):
      return False
    state[done] = True
    files.write_json(run.folder / STATE_FILE, state)
  return True
