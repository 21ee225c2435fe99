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
import os
import pathlib
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# Config keys that may change between a run and its restart: they do not change what is computed.
RESTART_TOLERANT_KEYS = ('data.num_workers', 'data.prefetch', 'train.log_every_steps')


class WorkdirError(ValueError):
  """The workdir cannot be used for this run (different config, missing checkpoint, ...)."""


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def config_differences(old: dict, new: dict) -> list[str]:
  """Human-readable `key: old -> new` lines for the keys that differ (ignoring tolerant ones)."""
  a, b = _flatten(old), _flatten(new)
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in RESTART_TOLERANT_KEYS]


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes via a temporary file and a rename: readers see the old or the new file, never half."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def guard_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         allow_config_change: bool) -> None:
  """Refuses to reuse a workdir that holds a run of another config; then records this config."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / 'config.json'
  new = config_to_dict(config)
  if path.exists() and not allow_config_change:
    diff = config_differences(json.loads(path.read_text()), new)
    if diff:
      raise WorkdirError(
          f'{workdir} holds a run with a different config ({path}):\n  ' + '\n  '.join(diff) +
          '\nUse another --workdir, or pass --allow_config_change to continue this run with the '
          'new config.')
  if jax.process_index() == 0:
    write_json_atomic(path, new)


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
