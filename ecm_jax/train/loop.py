"""The training loop around the pure step functions: data, validation, checkpoints and logs.

`train_and_evaluate(config, workdir)` is what `train.py` runs. Host work per step is fetching the
next batch and dispatching the jitted step; metrics are pulled from the devices only every
`train.log_every_steps` steps (and before each checkpoint, so a NaN is never saved).

In a multi-process job every process runs this loop on its share of each global batch; the run
is the same whatever the number of processes (`ecm_jax.data.pipeline`), they stop at the same step
(`preemption`), and process 0 alone writes the run's files besides the checkpoints.
"""

import contextlib
import pathlib
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ecm_jax import data, files, runtime
from ecm_jax.errors import ConfigError, NonFiniteLossError
from ecm_jax.evaluate import metrics as metrics_lib
from ecm_jax.evaluate import plots
from ecm_jax.models import networks
from ecm_jax.train import checkpoint, logs, losses, preemption, sharding, train_state
from ecm_jax.train import workdir as workdir_lib


def validate_config(config: ml_collections.ConfigDict, mesh=None) -> nn.Module:
  """Checks every section of `config` before anything is read or written; returns the model.

  Raises ConfigError (or DataError for `config.data`) naming the key and the accepted values.
  mesh: the devices the batches are split over (divisibility); default every device.
  """
  try:
    model = networks.build_model(config.model)
  except ValueError as e:
    raise ConfigError(f'config.{e}' if str(e).startswith('model.') else str(e)) from e
  data.check_config(config.data)
  size, multiple, smallest = config.data.image_size, model.input_multiple(), model.smallest_input()
  if size % multiple or size < smallest:
    raise ConfigError(f'config.data.image_size={size}: model.name={config.model.name!r} needs a '
                      f'multiple of {multiple}, at least {smallest}')
  if config.loss.main not in losses.MAIN_LOSSES:
    raise ConfigError(f'config.loss.main must be one of {losses.MAIN_LOSSES}, got '
                      f'{config.loss.main!r}')
  if config.loss.alpha is not None and not 0.0 <= config.loss.alpha <= 1.0:
    raise ConfigError(f'config.loss.alpha must be in [0, 1] or None, got {config.loss.alpha}')
  if config.loss.dice_smooth < 0:
    raise ConfigError(f'config.loss.dice_smooth must be >= 0, got {config.loss.dice_smooth}')
  t = config.train
  for key in ('batch_size', 'eval_batch_size', 'num_epochs', 'eval_every_epochs',
              'checkpoint_keep', 'log_every_steps', 'checkpoint_every_steps'):
    if t[key] < 1:
      raise ConfigError(f'config.train.{key} must be >= 1, got {t[key]}')
  if t.max_steps is not None and t.max_steps < 1:
    raise ConfigError(f'config.train.max_steps must be >= 1, got {t.max_steps}')
  if not t.learning_rate > 0:
    raise ConfigError(f'config.train.learning_rate must be > 0, got {t.learning_rate}')
  if not t.weight_decay >= 0:
    raise ConfigError(f'config.train.weight_decay must be >= 0, got {t.weight_decay}')
  mesh = mesh if mesh is not None else sharding.make_mesh()
  sharding.check_batch_divisible(t.batch_size, mesh)
  sharding.check_batch_divisible(t.eval_batch_size, mesh, 'train.eval_batch_size')
  return model


def evaluate(state, ds, split: str, eval_step, mesh, batch_size: int) -> dict:
  """Pooled Dice / sensitivity / precision (eqs. 14-16) over every slice of `split`; each process
  reads its rows of each batch."""
  counts = [eval_step(state, sharding.shard_batch(batch, mesh))
            for batch in data.eval_batches(ds, split, batch_size,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())]
  return metrics_lib.pooled_metrics(metrics_lib.pool_counts(jax.device_get(counts)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
                       stop: preemption.StopSignals | None = None,
                       allow_config_change: bool = False) -> train_state.TrainState:
  """Trains (or resumes) the run in `workdir` to `total_steps`; returns the final state.

  stop: checked after every step; when it says so, the step is saved and training ends.
  """
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh()
  model = validate_config(config, mesh)
  files.check_writable(workdir, '--workdir')
  workdir_lib.check_shared(workdir)
  # One process holds the lock for the job (the workdir is shared by all of them).
  lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train(config, workdir, model, mesh, stop, allow_config_change)


def _train(config, workdir, model, mesh, stop, allow_config_change) -> train_state.TrainState:
  manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_keep)
  workdir_lib.record_config(workdir, config, has_checkpoint=bool(manager.all_steps()),
                            allow_config_change=allow_config_change,
                            write=jax.process_index() == 0)
  # Room for one more checkpoint beside the kept ones, checked before any work is done.
  state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(
      train_state.abstract_train_state(model, train_state.make_optimizer(config, 1))))
  files.check_free_space(workdir, 2 * state_bytes, '--workdir')

  ds = data.prepare(config.data, split_file=workdir / 'splits.json',
                    write_split=jax.process_index() == 0)
  global_batch = config.train.batch_size
  steps_per_epoch = data.steps_per_epoch(ds, global_batch)
  if steps_per_epoch < 1:
    raise data.DataError(f'the train split has {len(ds.source("train"))} slices, fewer than one '
                         f'batch of {global_batch}')
  total_steps = config.train.max_steps or config.train.num_epochs * steps_per_epoch
  eval_every = steps_per_epoch * config.train.eval_every_epochs

  tx = train_state.make_optimizer(config, total_steps)
  schedule = train_state.learning_rate_schedule(config, total_steps)
  state = sharding.replicate(train_state.create_train_state(model, tx, config.seed), mesh)
  train_step = sharding.jit_train_step(mesh, model=model, tx=tx, loss_config=config.loss,
                                       schedule=schedule, seed=config.seed)
  eval_step = sharding.jit_eval_step(mesh, model=model)

  start_step, damaged = 0, []
  if manager.all_steps():
    start_step, state = checkpoint.restore_newest_readable(manager, state, damaged.append)
  iterator = data.train_iterator(
      ds, config.data, batch_size=global_batch, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  log = logs.RunLog(workdir, start_step=start_step, total_steps=total_steps,
                    batch_size=global_batch, enabled=jax.process_index() == 0)
  for message in damaged:
    log.message(message)
  if start_step:
    log.message(f'resumed from {manager.directory} at step {start_step}')
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.message(f'{config.model.name} ({config.variant}): {num_params:,} params on '
              f'{mesh.devices.size} device(s); {ds}: {len(ds.source("train"))} train slices, '
              f'{steps_per_epoch} steps/epoch, {total_steps} steps')

  pending = []  # step metrics still on device
  last_saved = start_step

  def flush(step: int) -> float | None:
    """Pulls pending step metrics to the host, logs them, stops on a non-finite loss; returns the
    last loss (None if nothing was pending)."""
    nonlocal pending
    if not pending:
      return None
    fetched = jax.device_get(pending)
    pending = []
    first = step - len(fetched) + 1
    for offset, m in enumerate(fetched):
      record = {'step': first + offset, **{f'train/{k}': float(v) for k, v in m.items()}}
      if not np.isfinite(record['train/loss']):
        raise NonFiniteLossError(
            f'non-finite loss {record["train/loss"]} at step {record["step"]}; stopping. The last '
            f'good checkpoint (step {manager.latest_step()}) is in {manager.directory}.')
      log.write(record)
    return record['train/loss']

  def save(step: int, val_metrics: dict | None = None) -> None:
    nonlocal last_saved
    flush(step)
    checkpoint.save(manager, step, state,
                    None if val_metrics is None else {'val_dice': val_metrics['dice']})
    last_saved = step

  try:
    for step in range(start_step + 1, total_steps + 1):
      waiting = time.perf_counter()
      batch = sharding.shard_batch(next(iterator), mesh)
      log.waited(time.perf_counter() - waiting)
      if step == start_step + 1:  # compiled ahead of time, for its memory analysis
        train_step = train_step.lower(state, batch).compile(
            compiler_options=networks.compiler_options(config.model))
        message = runtime.fit_host_memory(sharding.host_temp_bytes(train_step))
        if message:
          log.message(message)
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      log.stepped()
      if step % config.train.log_every_steps == 0 or step == total_steps:
        log.progress(step, flush(step))
      if step % eval_every == 0 or step == total_steps:
        flush(step)
        val = evaluate(state, ds, 'val', eval_step, mesh, config.train.eval_batch_size)
        log.write({'step': step, **{f'val/{k}': v for k, v in val.items()}})
        log.message(f'step {step}: val dice {val["dice"]:.4f}')
        save(step, val)
        if jax.process_index() == 0:
          plots.learning_curves(log.path, workdir / 'learning_curves.png')
      elif step % config.train.checkpoint_every_steps == 0:
        save(step)
      if stop is not None and stop.should_stop(step):
        if last_saved != step:
          save(step)
        log.message(f'{stop.reason()}: saved step {step} to {manager.directory}; exiting.')
        break
    checkpoint.wait_until_finished(manager)
  except OSError as e:
    if e.errno in files.STORAGE_ERRNOS:  # e.g. a picture on a disk a checkpoint has just filled
      checkpoint.wait_until_finished(manager)  # that checkpoint's failure is the one to report
    raise
  finally:
    log.close()
    iterator.close()  # stops grain's worker processes and frees their shared memory
    try:
      manager.wait_until_finished()  # after an error: a save still running is not lost
    except Exception:  # pylint: disable=broad-except  (the first error is the one raised)
      pass
    manager.close()
  return state
