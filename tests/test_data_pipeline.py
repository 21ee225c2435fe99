"""grain pipelines: batch contents, epochs, processes, determinism across workers, resume."""

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


def test_global_batches_do_not_depend_on_the_process_count(ds, config):
  one = _take(data.train_iterator(ds, config, batch_size=4, seed=0), 5)
  shares = [_take(data.train_iterator(ds, config, batch_size=4, seed=0, process_index=p,
                                      process_count=2), 5) for p in range(2)]
  joined = [{key: np.concatenate([shares[0][k][key], shares[1][k][key]]) for key in one[k]}
            for k in range(5)]
  _assert_same_batches(joined, one)
  with pytest.raises(data.DataError, match='global batch of 4 cannot be split over 3 processes'):
    data.train_iterator(ds, config, batch_size=4, seed=0, process_count=3)


def test_seed_changes_order_and_augmentation(ds, config):
  a = next(data.train_iterator(ds, config, batch_size=4, seed=0))
  b = next(data.train_iterator(ds, config, batch_size=4, seed=1))
  assert not np.array_equal(a['image'], b['image'])


def test_same_batches_with_0_or_2_worker_processes_and_from_a_start_step(ds, config):
  reference = _take(data.train_iterator(ds, config, batch_size=4, seed=3), 6)
  config = config.copy_and_resolve_references()
  config.num_workers = 2
  iterator = data.train_iterator(ds, config, batch_size=4, seed=3)
  _assert_same_batches(_take(iterator, 6), reference)
  iterator.close()
  resumed = data.train_iterator(ds, config, batch_size=4, seed=3, start_step=3, process_index=1,
                                process_count=2)  # a resume across an epoch boundary, 2 processes
  _assert_same_batches(_take(resumed, 3), [{key: batch[key][2:] for key in batch}
                                           for batch in reference[3:]])
  resumed.close()


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


def test_eval_batches_of_two_processes_are_the_halves_of_the_global_batches(ds):
  whole = list(data.eval_batches(ds, 'val', batch_size=6))  # 8 slices: one padded batch
  halves = [list(data.eval_batches(ds, 'val', batch_size=6, process_index=p, process_count=2))
            for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(whole)
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]),
                                    batch[key])
