"""Run directories: the resolved config guard and orbax checkpoints (train state + data iterator).

Layout of a workdir:
  config.json        the resolved config of the run (a restart must match it)
  splits.json        the case-level split (written once, honoured afterwards)
  checkpoints/<step> orbax checkpoints: the latest `train.checkpoint_keep` and the best by val Dice
  metrics.jsonl      one JSON object per logged step / validation
Orbax writes each checkpoint into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact and no half checkpoint is ever restored.
"""

import json
import pathlib

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ecm_jax import config as config_lib
from ecm_jax import files
from ecm_jax.errors import WorkdirError
from ecm_jax.models.networks import build_model
from ecm_jax.train import train_state


def guard_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         allow_config_change: bool) -> None:
  """Refuses to reuse a workdir that holds a run of another config; then records this config."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / 'config.json'
  new = config_lib.to_dict(config)
  if path.exists() and not allow_config_change:
    diff = config_lib.differences(json.loads(path.read_text()), new)
    if diff:
      raise WorkdirError(
          f'{workdir} holds a run with a different config ({path}):\n  ' + '\n  '.join(diff) +
          '\nUse another --workdir, or pass --allow_config_change to continue this run with the '
          'new config.')
  if jax.process_index() == 0:
    files.write_json(path, new)


def load_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config a run recorded, as a ConfigDict (for eval and inference)."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.exists():
    raise WorkdirError(f'{workdir} is not a training run: {path} is missing.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def checkpoint_manager(workdir: pathlib.Path, keep_latest: int, read_only: bool = False):
  """Keeps the latest `keep_latest` checkpoints plus the one with the best val Dice."""
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(keep_latest),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m['val_dice'], n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=lambda m: m['val_dice'], best_mode='max',
      read_only=read_only, create=not read_only,
      save_interval_steps=0 if read_only else 1)  # orbax warns about a read-only interval > 0
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints', options=options)


def save(manager, step: int, state, data_iterator, metrics: dict | None = None) -> None:
  args = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    args['data_iter'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)


def restore(manager, step: int, abstract_state, data_iterator=None):
  """Restores the state (with the shardings of `abstract_state`) and, if given, the iterator."""
  args = {'state': ocp.args.StandardRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state))}
  if data_iterator is not None:
    args['data_iter'] = grain.checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**args))['state']


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
    try:
      state = restore(manager, step, abstract)
    except (ValueError, KeyError, TypeError) as e:
      raise WorkdirError(
          f'checkpoint {step} in {manager.directory} does not fit the model of '
          f'{pathlib.Path(workdir) / "config.json"} ({type(e).__name__}: {e})') from e
  finally:
    manager.close()
  return step, {'params': state.params, 'batch_stats': state.batch_stats}
