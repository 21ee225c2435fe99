"""Configs as plain data: the JSON form a run records, and the differences between two configs.

A config is compared as JSON (`to_dict`), so a tuple in a config file and the list that
config.json holds for it are the same value.
"""

import json

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
