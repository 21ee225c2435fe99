"""grain input pipelines over a PreparedDataset: augmented training batches, ordered eval batches.

Training order and augmentation are pure functions of (seed, element index): grain shuffles each
epoch with a seed folded with the epoch number and seeds each element's augmentation from its
index. Global batch `s` is elements [s*B, (s+1)*B) of that stream, and process `p` of `P` reads
rows [p*B/P, (p+1)*B/P) of it: the batches are the same with 0 or N worker processes, with any
number of processes, and when a run resumes at step `s` (the iterator starts there; it has no state
of its own to save).
"""

import grain
import numpy as np

from ecm_jax.config import resolve_num_workers
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


def steps_per_epoch(ds, batch_size: int) -> int:
  """Global batches of `batch_size` in one pass over the train slices (0 when fewer)."""
  return len(ds.source('train')) // batch_size


def _process_rows(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise DataError(f'a global batch of {batch_size} cannot be split over {process_count} '
                    'processes: use a multiple of the process count')
  return batch_size // process_count


def train_iterator(ds, config, *, batch_size: int, seed: int, start_step: int = 0,
                   process_index: int = 0, process_count: int = 1):
  """Endless augmented train batches {'image': (b, S, S, 1) float32, 'label': (b, S, S) uint8}:
  this process's b = batch_size / process_count rows of the global batches `start_step`,
  `start_step` + 1, ... (module doc). Batches run on across epoch boundaries (each epoch
  reshuffled)."""
  rows = _process_rows(batch_size, process_count)
  shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
  dataset = (grain.MapDataset.source(ds.source('train'))
             .shuffle(seed=int(shuffle_seed))
             .repeat(None)
             .random_map(Augment(config), seed=int(augment_seed))
             .batch(rows, drop_remainder=True))
  dataset = dataset[start_step * process_count + process_index::process_count]
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch))
  num_workers = resolve_num_workers(config.num_workers)
  if num_workers:
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers)).map(_owned)
  return iter(iter_dataset)


def _owned(batch: dict) -> dict:
  """A worker's batch copied out of its shared memory, which is then released at once: a batch
  still held at exit (the device may keep a view of it) would leak the segment."""
  return {key: np.array(value) for key, value in batch.items()}


def eval_batches(ds, split: str, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1):
  """Unaugmented global batches of `batch_size` over every slice of `split`, in (case, slice)
  order; this process's rows of each (it reads only those).

  Each batch has 'image', 'label', 'case' (index into ds.case_ids), 'slice' and 'valid' (b,) bool;
  the rows past the split's end are zero images, case and slice -1, valid False.
  """
  source = ds.source(split)
  rows = _process_rows(batch_size, process_count)
  first = source[0] if len(source) else None
  for start in range(0, len(source), batch_size):
    indices = range(start + process_index * rows, start + (process_index + 1) * rows)
    elements = [source[i] for i in indices if i < len(source)]
    padding = {'image': np.zeros_like(first['image']), 'label': np.zeros_like(first['label']),
               'case': np.int32(-1), 'slice': np.int32(-1)}
    valid = len(elements)
    elements += [padding] * (rows - valid)
    batch = {key: np.stack([element[key] for element in elements]) for key in padding}
    batch['valid'] = np.arange(rows) < valid
    yield batch
