"""Orbax checkpoints of a run's train state in `<workdir>/checkpoints/<step>`.

The data iterator needs no checkpoint: its position is the step (`ecm_jax.data.pipeline`), so a run
resumes with any number of processes. Every process takes part in each save and restore.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact and no half checkpoint is ever restored. A
checkpoint damaged later (a truncated or lost file) is reported by step and path when it fails to
read, and the next older one is used (`restore_newest_readable`, `restore_variables`). A save that
fails for lack of space (or any write error) ends in a `StorageError` saying which checkpoints are
still there (`save`, `wait_until_finished`).
"""

from collections.abc import Callable
import functools
import logging
import pathlib
import shutil

import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ecm_jax.errors import StorageError, WorkdirError
from ecm_jax.models.networks import build_model
from ecm_jax.train import train_state


@functools.cache
def _write_arrays_whole() -> None:
  """Each array is written whole by its first replica, on every backend (orbax's default on GPUs).

  Elsewhere orbax defaults to "replica-parallel" writes: each replicated array is cut into one slice
  per device by an eager device op, which made every save take seconds longer on the CPU (~600
  arrays for this model's state, most of them small) to share writing the largest of them. Orbax
  keeps one handler registry per process: this holds for every orbax save of the process."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def checkpoint_manager(workdir: pathlib.Path, keep_latest: int, read_only: bool = False):
  """Keeps the latest `keep_latest` checkpoints plus the one with the best val Dice."""
  _write_arrays_whole()
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(keep_latest),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m['val_dice'], n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=lambda m: m['val_dice'], best_mode='max',
      read_only=read_only, create=not read_only,
      cleanup_tmp_directories=not read_only,  # what a failed save left behind
      save_interval_steps=0 if read_only else 1)  # orbax warns about a read-only interval > 0
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints', options=options)


_log = logging.getLogger(__name__)
DAMAGED_FOLDER = 'damaged_checkpoints'
# The OS's words for a failed write, as tensorstore quotes them inside its ValueErrors.
_WRITE_FAILURES = ('No space left on device', 'Read-only file system', 'File too large',
                   'Disk quota exceeded', 'Permission denied')


def _short(error: BaseException) -> str:
  """The first line of the innermost cause (tensorstore's own words, e.g. 'OUT_OF_RANGE: Error
  reading ...', rather than orbax's wrapper)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).splitlines()[0][:240] if str(error) else type(error).__name__
  return text if ':' in text else f'{type(error).__name__}: {text}'


def _write_failure_reason(error: BaseException | None) -> str | None:
  """The OS's words if `error` or one of its causes is a failed write (not a bug), else None."""
  while error is not None:
    if isinstance(error, OSError):
      return error.strerror or str(error)
    for words in _WRITE_FAILURES:
      if words in str(error):
        return words
    error = error.__cause__ or error.__context__
  return None


def _write_failure(reason: str, step: int | None, manager) -> StorageError:
  kept = ', '.join(map(str, manager.all_steps())) or 'none'
  what = f'checkpoint {step}' if step is not None else 'a checkpoint'
  return StorageError(
      f'could not write {what} to {manager.directory} ({reason}). The checkpoints there are '
      f'intact (steps: {kept}); free space in that file system and rerun the same command to '
      'resume from the latest.')


def save(manager, step: int, state, metrics: dict | None = None) -> None:
  """Starts saving checkpoint `step` (orbax finishes it in the background); a write error of this
  or of the previous save raises StorageError."""
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                 metrics=metrics, force=True)
  except Exception as e:  # pylint: disable=broad-except  (tensorstore raises plain ValueErrors)
    reason = _write_failure_reason(e)
    if reason:
      raise _write_failure(reason, step, manager) from e
    raise


def wait_until_finished(manager) -> None:
  """Waits for a background save; its write error raises StorageError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    reason = _write_failure_reason(e)
    if reason:
      raise _write_failure(reason, None, manager) from e
    raise


def restore(manager, step: int, abstract_state):
  """Restores the state with the shapes, dtypes and shardings of `abstract_state`."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
      'state']


def _first_readable(manager, steps, read: Callable[[int], object], hint: str):
  """(step, read(step), [(newer step, its error)]) for the first of `steps` that `read` restores;
  WorkdirError listing every failure when none does."""
  failures = []
  for step in steps:
    try:
      return step, read(step), failures
    except Exception as e:  # pylint: disable=broad-except  (tensorstore, json, missing files)
      failures.append((step, e))
  raise WorkdirError(f'no checkpoint in {manager.directory} could be read: ' + '; '.join(
      f'step {step}: {_short(error)}' for step, error in failures) + hint)


_CONFIG_HINT = ('. If they were written under another config, use that config (the run\'s '
                'config.json).')


def restore_newest_readable(manager, abstract_state,
                            report: Callable[[str], None]) -> tuple[int, object]:
  """(step, state) of the newest checkpoint that reads (as `restore`).

  Checkpoints newer than that one failed to read while an older one of the same run read: they
  are damaged, reported through `report` by step, path and error, and moved to
  `<workdir>/damaged_checkpoints/` (kept for inspection; training then saves those steps anew).
  When none reads (e.g. none fits this config's model), nothing is moved and WorkdirError lists
  each failure.
  """
  step, state, failures = _first_readable(
      manager, sorted(manager.all_steps(), reverse=True),
      lambda step: restore(manager, step, abstract_state), _CONFIG_HINT)
  damaged_root = pathlib.Path(manager.directory).parent / DAMAGED_FOLDER
  for bad_step, error in failures:
    source, target = pathlib.Path(manager.directory) / str(bad_step), damaged_root / str(bad_step)
    if jax.process_index() == 0:  # the workdir is shared: one process moves
      damaged_root.mkdir(exist_ok=True)
      shutil.rmtree(target, ignore_errors=True)  # an older copy of that same step
      shutil.move(source, target)
    report(f'checkpoint {bad_step} ({source}) is damaged ({_short(error)}); moved it to {target} '
           f'and resumed from checkpoint {step}')
  if failures:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('ecm_jax: damaged checkpoints moved')
    manager.reload()
  return step, state


def resolve_step(manager, which: str) -> int:
  """'best' | 'latest' | an integer step -> a step that exists in `manager`."""
  steps = manager.all_steps()
  if not steps:
    raise WorkdirError(f'no checkpoint in {manager.directory}')
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    best = manager.best_step()
    return best if best is not None else manager.latest_step()
  if not which.isdigit() or int(which) not in steps:
    raise WorkdirError(f'no checkpoint {which!r} in {manager.directory}; '
                       f'have best, latest, {", ".join(map(str, steps))}')
  return int(which)


def restore_variables(workdir: pathlib.Path, config: ml_collections.ConfigDict, which: str = 'best',
                      sharding: jax.sharding.Sharding | None = None) -> tuple[int, dict]:
  """(step, {'params', 'batch_stats'}) of the run's checkpoint `which` (best | latest | a step),
  restored for `config`'s model onto `sharding` (default: as saved). For evaluation, inference and
  the parity report; training restores its whole state with `restore`."""
  model = build_model(config.model)
  abstract = train_state.abstract_train_state(model, train_state.make_optimizer(config, 1))
  if sharding is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            abstract)
  manager = checkpoint_manager(workdir, 1, read_only=True)
  try:
    step = resolve_step(manager, which)
    # 'best' / 'latest' fall back to the next older readable checkpoint; a given step does not.
    steps = [step] + ([other for other in sorted(manager.all_steps(), reverse=True)
                       if other != step] if which in ('best', 'latest') else [])
    step, state, failures = _first_readable(manager, steps,
                                            lambda step: restore(manager, step, abstract),
                                            _CONFIG_HINT)
    for bad_step, error in failures:
      _log.warning('checkpoint %d (%s) is damaged (%s); using checkpoint %d instead', bad_step,
                   pathlib.Path(manager.directory) / str(bad_step), _short(error), step)
  finally:
    manager.close()
  return step, {'params': state.params, 'batch_stats': state.batch_stats}
