"""Configs compared as values: a config file's tuples equal the lists config.json holds."""

import json

import pytest

from configs import default, demo
from ecm_jax import config as config_lib
from ecm_jax.errors import WorkdirError
from ecm_jax.train import workdir as workdir_lib


def _tuple_fields(config):
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')
      elif isinstance(value, tuple):
        flat[f'{prefix}{key}'] = value

  walk(config, '')
  return flat


def test_every_tuple_field_equals_its_json_list():
  config = demo.get_config()
  fields = _tuple_fields(config)
  assert {'model.features', 'model.mus_rates', 'data.window', 'data.split'} <= set(fields)
  stored = json.loads(json.dumps(config_lib.to_dict(config)))  # as config.json holds it
  assert config_lib.differences(stored, config_lib.to_dict(config)) == []
  for key, value in fields.items():
    changed = config.copy_and_resolve_references()
    section, name = key.split('.')
    changed[section][name] = tuple(v + 1 for v in value)
    diff = config_lib.differences(stored, config_lib.to_dict(changed))
    assert diff == [f'{key}: {json.dumps(list(value))} -> '
                    f'{json.dumps([v + 1 for v in value])}'], key


def test_restart_tolerant_keys_are_not_differences():
  a, b = default.get_config(), default.get_config()
  b.data.num_workers, b.train.log_every_steps = 7, 99
  assert config_lib.differences(config_lib.to_dict(a), config_lib.to_dict(b)) == []


def test_workdir_guard_accepts_its_own_config_and_names_changed_keys(tmp_path):
  config = demo.get_config()
  record = lambda c, **kw: workdir_lib.record_config(tmp_path, c, has_checkpoint=True, **kw)
  record(config, allow_config_change=False)
  record(demo.get_config(), allow_config_change=False)
  other = demo.get_config('unet')
  with pytest.raises(WorkdirError, match=r'different config.*\n  model.cc: true -> false'):
    record(other, allow_config_change=False)
  assert json.loads((tmp_path / 'config.json').read_text()) == config_lib.to_dict(config)
  record(other, allow_config_change=True)
  assert json.loads((tmp_path / 'config.json').read_text()) == config_lib.to_dict(other)


def test_a_workdir_without_a_checkpoint_takes_a_new_config_and_drops_its_split(tmp_path):
  first, corrected = demo.get_config(), demo.get_config()
  first.data.root = '/no/such/folder'
  workdir_lib.record_config(tmp_path, first, has_checkpoint=False, allow_config_change=False)
  (tmp_path / 'splits.json').write_text('{}')
  workdir_lib.record_config(tmp_path, corrected, has_checkpoint=False, allow_config_change=False)
  assert json.loads((tmp_path / 'config.json').read_text()) == config_lib.to_dict(corrected)
  assert not (tmp_path / 'splits.json').exists()
