"""`prepare`: a dataset on disk -> preprocessing cache + case split -> a `PreparedDataset`."""

import pathlib

import numpy as np

from ecm_jax.data import cache, readers, splits, synthetic
from ecm_jax.data import meta as meta_lib
from ecm_jax.errors import DataError

_CHOICES = {
    'dataset': tuple(readers.SLICING),
    'modality': ('ct', 'mri'),
    'other_labels': ('error', 'background'),
    'missing_labels': ('error', 'skip'),
    'slices': ('all', 'foreground'),
}


def check_config(config):
  """Reject a bad `config.data` before anything is read or written."""
  for field, choices in _CHOICES.items():
    if config[field] not in choices:
      raise DataError(f'config.data.{field}={config[field]!r}: choose one of {choices}')
  if config.image_size <= 0 or config.image_size % 16:
    raise DataError(f'config.data.image_size={config.image_size}: must be a positive multiple of '
                    '16 (the network halves the resolution four times)')
  if config.window[0] >= config.window[1]:
    raise DataError(f'config.data.window={tuple(config.window)}: low must be below high')
  if not config.foreground_labels or 0 in config.foreground_labels:
    raise DataError(f'config.data.foreground_labels={tuple(config.foreground_labels)}: '
                    'give one or more non-zero label values')
  if len(config.split) != 3 or min(config.split) < 0:
    raise DataError(f'config.data.split={tuple(config.split)}: give (train, val, test) case counts')
  for field in ('flip_prob', 'blur_prob', 'background_fraction'):
    if not 0.0 <= config[field] <= 1.0:
      raise DataError(f'config.data.{field}={config[field]}: a probability, must be in [0, 1]')
  if config.rotate_degrees < 0:
    raise DataError(f'config.data.rotate_degrees={config.rotate_degrees}: must be >= 0')
  if not 0.0 < config.blur_sigma[0] <= config.blur_sigma[1]:
    raise DataError(f'config.data.blur_sigma={tuple(config.blur_sigma)}: give (low, high) with '
                    '0 < low <= high')
  for field, least in (('num_workers', -1), ('read_threads', 1), ('prefetch', 1)):
    if config[field] < least:
      raise DataError(f'config.data.{field}={config[field]}: must be >= {least}'
                      + (' (-1: auto)' if field == 'num_workers' else ''))


class SliceSource:
  """grain random-access source over cached slices.

  Record `i` is `{'image': (S, S, 1) float32, 'label': (S, S) uint8, 'case': int32 index into
  `PreparedDataset.case_ids`, 'slice': int32 stack index}`. Arrays are memory-mapped on first use in
  each process (worker processes receive the source pickled, without open maps).
  """

  def __init__(self, cache_path, case_ids, records: np.ndarray):
    self._cache_path = pathlib.Path(cache_path)
    self._case_ids = tuple(case_ids)
    self.records = records  # (M, 2) int32: case index, slice index
    self._arrays = {}

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index) -> dict:
    case, slice_index = self.records[index]
    images, labels = self._case_arrays(case)
    return {'image': np.array(images[slice_index]), 'label': np.array(labels[slice_index]),
            'case': case, 'slice': slice_index}

  def _case_arrays(self, case):
    if case not in self._arrays:
      paths = cache.case_arrays_paths(self._cache_path, self._case_ids[case])
      self._arrays[case] = tuple(np.load(path, mmap_mode='r') for path in paths)
    return self._arrays[case]

  def __getstate__(self):
    return {**self.__dict__, '_arrays': {}}

  def __repr__(self) -> str:
    return f'SliceSource({self._cache_path}, {len(self)} slices)'


class PreparedDataset:
  """A dataset preprocessed into the cache, with its case-level train/val/test split."""

  def __init__(self, config, cache_path: pathlib.Path, metas, split: dict[str, list[str]]):
    self.cache_path = cache_path
    self.synthetic = config.dataset == 'synthetic'
    self.image_size = config.image_size
    self.case_ids = tuple(meta.case_id for meta in metas)  # sorted; records index into this
    self._metas = {meta.case_id: meta for meta in metas}
    self._split = split
    self._selection = (config.slices, config.background_fraction, config.split_seed)

  def split_cases(self, split: str) -> list[str]:
    if split not in splits.SPLITS:
      raise ValueError(f'unknown split {split!r}; choose one of {splits.SPLITS}')
    return list(self._split[split])

  def case_meta(self, case_id: str) -> meta_lib.CaseMeta:
    return self._metas[case_id]

  def case_arrays(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A case's cached (images (N, S, S, 1) float32, labels (N, S, S) uint8), memory-mapped."""
    return tuple(np.load(path, mmap_mode='r')
                 for path in cache.case_arrays_paths(self.cache_path, case_id))

  def source(self, split: str) -> SliceSource:
    """Every slice of the split's cases in (case, slice) order.

    With `data.slices='foreground'` the train split keeps the foreground slices plus a fixed random
    `background_fraction` of the others (drawn with `data.split_seed`).
    """
    rows, has_foreground = [], []
    for case_id in self.split_cases(split):
      meta = self._metas[case_id]
      slices = np.arange(meta.num_slices)
      rows.append(np.stack([np.full_like(slices, self.case_ids.index(case_id)), slices], axis=1))
      has_foreground.append(np.isin(slices, meta.foreground_slices))
    records = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 2), np.int32)
    slices_option, background_fraction, seed = self._selection
    if split == 'train' and slices_option == 'foreground' and rows:
      keep = np.concatenate(has_foreground)
      background = np.flatnonzero(~keep)
      count = round(background_fraction * len(background))
      keep[np.random.default_rng(seed).choice(background, count, replace=False)] = True
      records = records[keep]
    return SliceSource(self.cache_path, self.case_ids, records)

  def __repr__(self) -> str:
    counts = {name: len(cases) for name, cases in self._split.items()}
    kind = f'{synthetic.NAME}, ' if self.synthetic else ''
    return f'PreparedDataset({kind}{self.cache_path}, cases {counts})'


def prepare(config, *, split_file, write_split: bool = True) -> PreparedDataset:
  """Build (or reuse) the preprocessing cache of `config.data` and the split at `split_file`.

  An existing split file is honoured (after checking its cases exist); otherwise a split is drawn
  with `data.split_seed` and written there once the cache is complete (when `write_split`: not by
  the other processes of a job, which draw the same split). Bad input raises DataError before
  anything is written.
  """
  check_config(config)
  if config.dataset == 'synthetic':
    root = synthetic.ensure_dataset(config)
  elif config.root is None:
    raise DataError(f'config.data.root is not set: the folder of the {config.dataset} dataset')
  else:
    root = pathlib.Path(config.root).expanduser()
  cases = readers.list_cases(config, root)
  case_ids = [case.case_id for case in cases]
  split_file = pathlib.Path(split_file)
  if split_file.exists():
    split = splits.read_split(split_file, case_ids, config.split)
  else:
    split = splits.make_split(case_ids, config.split, config.split_seed, root)
  cache_path, metas = cache.load_or_build(config, root, cases)
  if write_split and not split_file.exists():
    splits.write_split(split_file, split, dataset=config.dataset, root=str(root),
                       split_seed=config.split_seed, counts=list(config.split))
  return PreparedDataset(config, cache_path, metas, split)
