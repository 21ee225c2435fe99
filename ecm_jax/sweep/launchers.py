"""Where the runs of a sweep go: this machine (one after another, or one at a time per local
device), or a SLURM cluster through submitit (one job per run, or an array job).

Each launcher returns, per run it started, None when it finished or why not ('interrupted ...',
the failure of train.py or eval.py).

On SLURM each job runs `runs.execute` of one run in one task (train.py drives every GPU the job
has). Before the time limit (submitit asks SLURM for USR2 `signal_delay_s` ahead) or on a
preemption that signals it, submitit calls `SubmittedRun.checkpoint`: train.py is sent SIGTERM,
saves its step and exits, and the job is requeued; the requeued job resumes from that checkpoint.
A SIGTERM from SLURM (preemption, scancel) reaches train.py itself, which saves the same way.
"""

from collections.abc import Mapping, Sequence
import contextlib
import os
import pathlib
import signal
import threading
import time

from ecm_jax.sweep import runs as runs_lib

INTERRUPTED = 'interrupted before it finished: run the sweep again to resume it'


def _outcome(run: runs_lib.Run, processes: runs_lib.Processes, env=None) -> str | None:
  try:
    return None if runs_lib.execute(run, processes, env) else INTERRUPTED
  except runs_lib.RunFailed as e:
    return str(e)


@contextlib.contextmanager
def _stop_on_signals(processes: runs_lib.Processes):
  """SIGINT / SIGTERM: the running train.py processes save and exit, no further run starts."""
  def handle(signum, frame):
    del frame
    name = signal.Signals(signum).name
    print(f'{name}: stopping; the running runs save a checkpoint and exit', flush=True)
    processes.stop(name)

  previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def run_here(planned: Sequence[runs_lib.Run], devices: Sequence[str] = ()
             ) -> dict[runs_lib.Run, str | None]:
  """The runs on this machine: one after another, each on every visible device; with `devices`,
  one at a time per device, each seeing only its own (CUDA_VISIBLE_DEVICES=device)."""
  processes = runs_lib.Processes()
  todo = list(planned)  # taken by the workers; list.pop is atomic
  outcomes = {}

  def work(device):
    env = None if device is None else dict(os.environ, CUDA_VISIBLE_DEVICES=device)
    where = '' if device is None else f' on device {device}'
    while not processes.stopped:
      try:
        run = todo.pop(0)
      except IndexError:
        return
      print(f'{run.name}{where}: started (logs in {run.folder})', flush=True)
      started = time.monotonic()
      outcomes[run] = _outcome(run, processes, env)
      print(f'{run.name} ({time.monotonic() - started:.0f} s): {outcomes[run] or "finished"}',
            flush=True)

  with _stop_on_signals(processes):
    workers = [threading.Thread(target=work, args=(device,), daemon=True)
               for device in (devices or [None])]
    for worker in workers:
      worker.start()
    while any(worker.is_alive() for worker in workers):  # the main thread handles the signals
      time.sleep(0.2)
  return outcomes


class SubmittedRun:
  """What a submitit job calls: `runs.execute` of one run, requeued by `checkpoint` (module doc)."""

  def __init__(self):
    self._processes = runs_lib.Processes()

  def __call__(self, run: runs_lib.Run) -> str | None:
    # SLURM's SIGTERM reaches train.py too; a second one would make it stop before saving.
    signal.signal(signal.SIGTERM, lambda signum, frame: self._processes.stop('SIGTERM', False))
    return _outcome(run, self._processes)

  def checkpoint(self, run: runs_lib.Run):
    import submitit  # pylint: disable=g-import-not-at-top
    self._processes.stop('requeued')
    self._processes.wait_stopped()
    return submitit.helpers.DelayedSubmission(SubmittedRun(), run)


def submit(planned: Sequence[runs_lib.Run], cluster: str, folder: pathlib.Path,
           parameters: Mapping, *, array: bool, max_requeues: int
           ) -> dict[runs_lib.Run, str | None]:
  """The runs as submitit jobs on `cluster` ('slurm', or 'local': submitit's local executor, every
  run at once), one per run or one array job; waits for them. `parameters`: submitit's
  `update_parameters` (timeout_min, gpus_per_node, slurm_partition, ...); `max_requeues`: how
  many times a job that reaches its time limit is requeued. submitit's logs go to `folder`."""
  import submitit  # pylint: disable=g-import-not-at-top
  executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                   **{f'{cluster}_max_num_timeout': max_requeues})
  executor.update_parameters(**parameters)
  with executor.batch() if array else contextlib.nullcontext():
    jobs = [executor.submit(SubmittedRun(), run) for run in planned]
  for run, job in zip(planned, jobs):
    print(f'{run.name}: submitted as job {job.job_id} (logs in {folder})', flush=True)
  outcomes = {}
  for run, job in zip(planned, jobs):
    try:
      outcomes[run] = job.result()
    except submitit.core.utils.UncompletedJobError as e:
      outcomes[run] = f'job {job.job_id} did not complete ({str(e).strip().splitlines()[-1]})'
    print(f'{run.name}: {outcomes[run] or "finished"}', flush=True)
  return outcomes
