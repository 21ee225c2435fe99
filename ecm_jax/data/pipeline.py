"""grain input pipelines over a PreparedDataset: augmented training batches, ordered eval batches.

Training order and augmentation are pure functions of (seed, element index): grain shuffles each
epoch with a seed folded with the epoch number and seeds each element's augmentation from its
index, so the batches are the same with 0 or N worker processes and after a restore.
"""

import grain
import numpy as np

from ecm_jax.data import augment
from ecm_jax.errors import DataError


class Augment(grain.transforms.RandomMap):
  """The paper's augmentation of one slice record; drops 'case' and 'slice'."""

  def __init__(self, config):
    self._options = dict(flip_prob=config.flip_prob, rotate_degrees=config.rotate_degrees,
                         blur_prob=config.blur_prob, blur_sigma=tuple(config.blur_sigma))

  def random_map(self, element, rng: np.random.Generator):
    transform = augment.draw(rng, **self._options)
    image, label = augment.apply(element['image'], element['label'], transform)
    return {'image': image, 'label': label}


def steps_per_epoch(ds, batch_size: int, shard_count: int = 1) -> int:
  """Steps in which every process sees (about) its shard of the train slices once (0 when the
  split holds less than one batch per process)."""
  return len(ds.source('train')) // (batch_size * shard_count)


def train_iterator(ds, config, *, batch_size: int, seed: int, shard_index: int = 0,
                   shard_count: int = 1):
  """Endless augmented train batches {'image': (B, S, S, 1) float32, 'label': (B, S, S) uint8}.

  `batch_size` is per process; process `shard_index` of `shard_count` reads every
  `shard_count`-th slice. Batches run on across epoch boundaries (each epoch reshuffled). The
  iterator supports get_state()/set_state() and grain.checkpoint.CheckpointSave/Restore.
  """
  source = ds.source('train')
  if len(source) < shard_count:
    raise DataError(f'{ds.cache_path}: {len(source)} train slices cannot feed {shard_count} '
                    'processes')
  shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
  dataset = (grain.MapDataset.source(source)[shard_index::shard_count]
             .shuffle(seed=int(shuffle_seed))
             .repeat(None)
             .random_map(Augment(config), seed=int(augment_seed))
             .batch(batch_size, drop_remainder=True))
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch))
  if config.num_workers:
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.num_workers)).map(_owned)
  return iter(iter_dataset)


def _owned(batch: dict) -> dict:
  """A worker's batch copied out of its shared memory, which is then released at once: a batch
  still held at exit (the device may keep a view of it) would leak the segment."""
  return {key: np.array(value) for key, value in batch.items()}


def eval_batches(ds, split: str, batch_size: int):
  """Unaugmented batches of every slice of `split`, in (case, slice) order.

  Each batch has 'image', 'label', 'case' (index into ds.case_ids), 'slice' and 'valid' (B,) bool;
  the last batch is padded with zero images, case and slice -1, valid False.
  """
  source = ds.source(split)
  for start in range(0, len(source), batch_size):
    elements = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    padding = {'image': np.zeros_like(elements[0]['image']),
               'label': np.zeros_like(elements[0]['label']),
               'case': np.int32(-1), 'slice': np.int32(-1)}
    valid = len(elements)
    elements += [padding] * (batch_size - valid)
    batch = {key: np.stack([element[key] for element in elements]) for key in padding}
    batch['valid'] = np.arange(batch_size) < valid
    yield batch
