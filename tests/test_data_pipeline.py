"""grain pipelines: batch contents, epochs, sharding, determinism across workers, save/restore."""

import json

import grain
import numpy as np
import pytest

from configs import default
from ecm_jax import data

NO_AUGMENTATION = dict(flip_prob=0.0, rotate_degrees=0.0, blur_prob=0.0)


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  config = default.get_config().data
  config.update(dict(
      dataset='synthetic', cache_dir=str(tmp_path_factory.mktemp('pipeline') / 'cache'),
      synthetic_cases=4, synthetic_slices=8, synthetic_size=32, image_size=32, split=(2, 1, 1),
      num_workers=0))
  return config


@pytest.fixture(scope='module')
def ds(config, tmp_path_factory):
  return data.prepare(config, split_file=tmp_path_factory.mktemp('run') / 'splits.json')


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for batch_a, batch_b in zip(a, b):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key])


def _slice_ids(ds, split):
  """Bytes of every slice image of a split -> its position in the split's source."""
  source = ds.source(split)
  return {source[i]['image'].tobytes(): i for i in range(len(source))}


def test_train_batches_have_the_contract_shapes_and_values(ds, config):
  batch = next(data.train_iterator(ds, config, batch_size=4, seed=0))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (4, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 32, 32) and batch['label'].dtype == np.uint8
  assert np.isfinite(batch['image']).all()
  assert set(np.unique(batch['label'])) <= {0, 1}


def test_an_epoch_covers_every_train_slice_once_and_epochs_are_reshuffled(ds, config):
  config = config.copy_and_resolve_references()
  config.update(NO_AUGMENTATION)
  ids = _slice_ids(ds, 'train')
  steps = data.steps_per_epoch(ds, 4)
  assert steps == 2 * 8 // 4  # two train cases of eight slices
  batches = _take(data.train_iterator(ds, config, batch_size=4, seed=0), 2 * steps)
  order = [ids[image.tobytes()] for batch in batches for image in batch['image']]
  first, second = order[:len(ids)], order[len(ids):]
  assert sorted(first) == sorted(second) == list(range(len(ids)))
  assert first != second


def test_process_shards_are_disjoint_and_cover_the_train_slices(ds, config):
  config = config.copy_and_resolve_references()
  config.update(NO_AUGMENTATION)
  ids = _slice_ids(ds, 'train')
  seen = []
  for shard_index in range(2):
    assert data.steps_per_epoch(ds, 2, shard_count=2) == 4
    batches = _take(data.train_iterator(ds, config, batch_size=2, seed=0, shard_index=shard_index,
                                        shard_count=2), 4)
    seen.append({ids[image.tobytes()] for batch in batches for image in batch['image']})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(len(ids)))


def test_seed_changes_order_and_augmentation(ds, config):
  a = next(data.train_iterator(ds, config, batch_size=4, seed=0))
  b = next(data.train_iterator(ds, config, batch_size=4, seed=1))
  assert not np.array_equal(a['image'], b['image'])


def test_same_batches_with_0_or_2_worker_processes_and_after_restore(ds, config):
  reference = _take(data.train_iterator(ds, config, batch_size=4, seed=3), 6)
  config = config.copy_and_resolve_references()
  config.num_workers = 2
  iterator = data.train_iterator(ds, config, batch_size=4, seed=3)
  first = _take(iterator, 3)
  state = iterator.get_state()
  _assert_same_batches(first + _take(iterator, 3), reference)
  iterator.close()
  restored = data.train_iterator(ds, config, batch_size=4, seed=3)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 3), reference[3:])
  restored.close()


def test_state_restores_the_uninterrupted_sequence_in_process(ds, config):
  iterator = data.train_iterator(ds, config, batch_size=4, seed=5)
  _take(iterator, 5)  # crosses an epoch boundary (4 steps per epoch)
  state = json.loads(json.dumps(iterator.get_state()))  # JSON-able, as orbax stores it
  uninterrupted = _take(iterator, 4)
  restored = data.train_iterator(ds, config, batch_size=4, seed=5)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 4), uninterrupted)


def test_orbax_checkpoints_the_iterator(ds, config, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (slow; this test only)
  iterator = data.train_iterator(ds, config, batch_size=4, seed=7)
  _take(iterator, 2)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    uninterrupted = _take(iterator, 3)
    restored = data.train_iterator(ds, config, batch_size=4, seed=7)
    manager.restore(2, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same_batches(_take(restored, 3), uninterrupted)


def test_eval_batches_are_ordered_unaugmented_and_padded(ds):
  batches = list(data.eval_batches(ds, 'val', batch_size=3))
  (case_id,) = ds.split_cases('val')
  images, labels = ds.case_arrays(case_id)
  assert len(batches) == 3  # 8 slices: 3 + 3 + 2 and one pad
  valid = np.concatenate([b['valid'] for b in batches])
  np.testing.assert_array_equal(valid, [True] * 8 + [False])
  cases = np.concatenate([b['case'] for b in batches])
  slices = np.concatenate([b['slice'] for b in batches])
  np.testing.assert_array_equal(cases, [ds.case_ids.index(case_id)] * 8 + [-1])
  np.testing.assert_array_equal(slices, list(range(8)) + [-1])
  stacked = {key: np.concatenate([b[key] for b in batches]) for key in ('image', 'label')}
  np.testing.assert_array_equal(stacked['image'][:8], images)
  np.testing.assert_array_equal(stacked['label'][:8], labels)
  assert not stacked['image'][8].any() and not stacked['label'][8].any()
  assert batches[0]['image'].dtype == np.float32 and batches[0]['label'].dtype == np.uint8
