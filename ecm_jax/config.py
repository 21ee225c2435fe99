"""Configs as plain data: the JSON form a run records, and the differences between two configs.

A config is compared as JSON (`to_dict`), so a tuple in a config file and the list that
config.json holds for it are the same value.
"""

import json
import os

import ml_collections

# Keys that may change between a run and its restart: they do not change what is computed.
RESTART_TOLERANT_KEYS = ('data.num_workers', 'data.prefetch', 'train.log_every_steps')


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as JSON data (tuples become lists), as config.json stores it."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def differences(old: dict, new: dict) -> list[str]:
  """`key: old -> new` lines for the keys of two `to_dict` configs that differ (not the tolerant
  ones), values as JSON."""
  a, b = _flatten(old), _flatten(new)
  show = lambda flat, key: json.dumps(flat[key]) if key in flat else '<absent>'
  return [f'{k}: {show(a, k)} -> {show(b, k)}' for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in RESTART_TOLERANT_KEYS]


def available_cpus() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def resolve_num_workers(num_workers: int, *, local_devices: int | None = None,
                        cpus: int | None = None, platform: str | None = None) -> int:
  """`config.data.num_workers` as the pipeline should use it: the value itself when >= 0; -1 is
  auto, sized to the host:
    on GPU/TPU hosts  cpus - local_devices (one core kept per local device for the training
                      process's dispatch), at least 1: augmentation costs ~14 ms per 512x512
                      slice per core (docs/accelerators.md), and one GPU consumes ~100 slices/s
                      of the full model, so every other core goes to the workers;
    on the CPU        min(2, cpus): the XLA:CPU step itself runs on every core (2 workers
                      measured best on 2 cores; more only slow the step).
  local_devices / cpus / platform default to this process's (`jax.local_device_count()`,
  `available_cpus()`, `jax.default_backend()`)."""
  if num_workers >= 0:
    return num_workers
  if num_workers != -1:
    raise ValueError(f'data.num_workers must be >= 0, or -1 (auto), got {num_workers}')
  import jax  # pylint: disable=g-import-not-at-top  (configs stay importable without jax)
  cpus = cpus or available_cpus()
  if (platform or jax.default_backend()) == 'cpu':
    return min(2, cpus)
  return max(1, cpus - (local_devices or jax.local_device_count()))
