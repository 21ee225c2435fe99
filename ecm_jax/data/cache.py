"""Preprocessing cache: per-case memory-mappable .npy slices and a JSON index, keyed by a hash.

`<cache_dir>/<dataset>-<key>/` holds `cases/<case_id>.image.npy` (N, S, S, 1) float32,
`cases/<case_id>.label.npy` (N, S, S) uint8 and `index.json` (the preprocessing spec and every
case's `CaseMeta`, including which slices have foreground). `key` hashes the preprocessing config
and the names, sizes and modification times of the source files, so any change builds a new cache
and an unchanged config reuses the old one. A cache is built in a temporary sibling folder and
renamed into place only when complete (`ecm_jax.files.atomic_path`): a crash leaves a `.tmp-*`
folder that is never read
(safe to delete), and a failed build leaves nothing behind.
"""

import dataclasses
import hashlib
import json
import logging
import pathlib

import numpy as np
import tqdm

from ecm_jax import files
from ecm_jax.data import dicom, preprocess, readers
from ecm_jax.data import meta as meta_lib
from ecm_jax.errors import DataError

_log = logging.getLogger(__name__)

FORMAT = 1  # bump when the cache layout or the preprocessing code changes meaning


def cache_root(config) -> pathlib.Path:
  return pathlib.Path(config.cache_dir or '~/.cache/ecm_jax').expanduser()


def case_arrays_paths(path: pathlib.Path, case_id: str) -> tuple[pathlib.Path, pathlib.Path]:
  return path / 'cases' / f'{case_id}.image.npy', path / 'cases' / f'{case_id}.label.npy'


def preprocessing_spec(config, root) -> dict:
  """The config fields that determine the cached arrays."""
  return {
      'format': FORMAT,
      'dataset': config.dataset,
      'root': str(pathlib.Path(root).resolve()),
      'modality': config.modality,
      'intensity': list(config.window if config.modality == 'ct' else config.mri_percentiles),
      'image_size': config.image_size,
      'foreground_labels': list(config.foreground_labels),
      'merge_foreground': config.merge_foreground,
      'other_labels': config.other_labels,
  }


def cache_key(spec: dict, cases) -> str:
  files = []
  for case in cases:
    # A DICOM series (a folder) counts by each of its files: a slice rewritten in place changes it.
    paths = [*dicom.dicom_files(case.image), case.label] if case.image.is_dir() else [
        case.image, case.label]
    for path in paths:
      stat = path.stat()
      files.append([case.case_id, path.name, stat.st_size, stat.st_mtime_ns])
  text = json.dumps({'spec': spec, 'files': files}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_build(config, root, cases) -> tuple[pathlib.Path, list[meta_lib.CaseMeta]]:
  """The cache folder for these cases and config (built if absent) and every case's meta."""
  spec = preprocessing_spec(config, root)
  key = cache_key(spec, cases)
  path = cache_root(config) / f'{config.dataset}-{key}'
  if not path.exists():
    _build(config, cases, spec, key, path)
  else:
    _log.info('reusing preprocessing cache %s', path)
  index_path = path / 'index.json'
  try:
    index = json.loads(index_path.read_text())
    metas = [meta_lib.CaseMeta.from_json(fields) for fields in index['cases']]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(
        f'{index_path}: unreadable cache index ({e!r}); delete {path} to rebuild') from e
  if index.get('key') != key:
    raise DataError(f'{index_path}: cache key {index.get("key")} does not match {key}; '
                    f'delete {path} to rebuild')
  return path, metas


def _build(config, cases, spec, key, path: pathlib.Path):
  created = _missing_folders(path.parent)
  try:
    with files.atomic_path(path) as temporary:
      (temporary / 'cases').mkdir(parents=True)
      metas = [_write_case(case, config, temporary)  # a bar on a terminal only (disable=None)
               for case in tqdm.tqdm(cases, desc=f'caching {config.dataset} slices', unit='case',
                                     disable=None)]
      index = {'format': FORMAT, 'key': key, 'spec': spec,
               'cases': [meta.to_json() for meta in metas]}
      (temporary / 'index.json').write_text(json.dumps(index))
  except OSError:
    if not (path / 'index.json').is_file():  # else another process finished the same cache first
      _remove_created(created)
      raise
  except BaseException:
    _remove_created(created)
    raise
  _log.info('built preprocessing cache %s (%d cases)', path, len(cases))


def _write_case(case: readers.CaseFiles, config, folder: pathlib.Path) -> meta_lib.CaseMeta:
  image_stack, label_stack, meta = readers.read_case(case, config)
  labels = preprocess.label_slices(label_stack, config, case.label)
  images = preprocess.image_slices(image_stack, config, case.image)
  image_path, label_path = case_arrays_paths(folder, case.case_id)
  np.save(image_path, images)
  np.save(label_path, labels)
  foreground = np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1))
  return dataclasses.replace(meta, foreground_slices=tuple(int(i) for i in foreground))


def _remove_created(created: list[pathlib.Path]) -> None:
  for folder in created:  # deepest first; stops at the first that is not empty
    try:
      folder.rmdir()
    except OSError:
      break


def _missing_folders(folder: pathlib.Path) -> list[pathlib.Path]:
  """Folders that creating `folder` would add, deepest first."""
  missing = []
  while not folder.exists():
    missing.append(folder)
    folder = folder.parent
  return missing
