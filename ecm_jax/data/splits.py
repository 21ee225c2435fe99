"""Case-level train/val/test splits: drawn with a fixed seed, written to JSON, reused from there."""

import collections
import json
import logging
import pathlib

import numpy as np

from ecm_jax import files
from ecm_jax.errors import DataError

_log = logging.getLogger(__name__)

SPLITS = ('train', 'val', 'test')


def make_split(case_ids, counts, seed: int, root) -> dict[str, list[str]]:
  """A random partition of `case_ids` into `counts` = (train, val, test) cases, each list sorted."""
  if sum(counts) != len(case_ids):
    raise DataError(f'{root}: data.split={tuple(counts)} asks for {sum(counts)} cases but '
                    f'{len(case_ids)} labelled cases were found')
  order = np.random.default_rng(seed).permutation(sorted(case_ids)).tolist()
  bounds = np.cumsum([0, *counts])
  return {name: sorted(order[bounds[i]:bounds[i + 1]]) for i, name in enumerate(SPLITS)}


def read_split(path, case_ids, counts) -> dict[str, list[str]]:
  """The split stored at `path`, checked against the cases on disk; it wins over `counts`."""
  path = pathlib.Path(path)
  try:
    stored = json.loads(path.read_text())
    split = {name: stored[name] for name in SPLITS}
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f'{path}: not a split file with {"/".join(SPLITS)} case lists ({e!r})') from e
  if not all(isinstance(cases, list) and all(isinstance(c, str) for c in cases)
             for cases in split.values()):
    raise DataError(f'{path}: {"/".join(SPLITS)} must be lists of case ids')
  listed = [case for name in SPLITS for case in split[name]]
  duplicates = sorted(case for case, n in collections.Counter(listed).items() if n > 1)
  if duplicates:
    raise DataError(f'{path}: cases listed more than once: {duplicates}')
  unknown = sorted(set(listed) - set(case_ids))
  if unknown:
    raise DataError(f'{path}: {len(unknown)} case(s) not found in the dataset: {unknown[:5]}')
  found = tuple(len(split[name]) for name in SPLITS)
  if found != tuple(counts):
    _log.warning('%s: split file has %s cases per split, data.split is %s; using the file',
                    path, found, tuple(counts))
  return split


def write_split(path, split: dict[str, list[str]], **provenance):
  """Write the split as JSON (atomically: a temporary file renamed into place)."""
  files.write_text(path, json.dumps({**provenance, **split}, indent=1) + '\n')
