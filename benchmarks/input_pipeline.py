"""Augmented 512x512 training slices per second by grain worker count; prints a markdown table.

  python -m benchmarks.input_pipeline [--workers 0,1,2] [--read_threads 1] [--batches 12]

(from the repository root). Runs on SYNTHETIC 512x512 volumes written to a temporary folder (no
dataset needed). Each row times `--batches` batches of 4 after the first batch (which includes
worker start-up, reported separately). Compare the rate with what training consumes: global
batch / seconds per step.
"""

from collections.abc import Sequence
import pathlib
import tempfile
import time

from configs import default
from ecm_jax import data, tables

BATCH_SIZE = 4


def run(workers: Sequence[int] = (0, 1, 2), read_threads: int = 1,
        batches: int = 12) -> list[tuple[int, float, float]]:
  """Times `batches` batches per worker count in `workers` (config.data.read_threads
  `read_threads`) and prints the table; returns its rows (workers, slices/s, first batch s)."""
  with tempfile.TemporaryDirectory() as folder:
    config = default.get_config().data
    config.update(dict(dataset='synthetic', cache_dir=folder, synthetic_cases=2,
                       synthetic_slices=24, synthetic_size=512, image_size=512, split=(2, 0, 0),
                       read_threads=read_threads))
    ds = data.prepare(config, split_file=pathlib.Path(folder) / 'splits.json')
    rows = []
    for num_workers in workers:
      config.num_workers = num_workers
      start = time.perf_counter()
      iterator = data.train_iterator(ds, config, batch_size=BATCH_SIZE, seed=0)
      next(iterator)
      first = time.perf_counter() - start
      start = time.perf_counter()
      for _ in range(batches):
        next(iterator)
      rate = batches * BATCH_SIZE / (time.perf_counter() - start)
      rows.append((num_workers, rate, first))
      iterator.close()
  print(f'\nAugmented {config.image_size}x{config.image_size} slices/s (SYNTHETIC volumes, '
        f'batch {BATCH_SIZE}, read_threads {read_threads}, {batches} batches timed)\n')
  print(tables.markdown_table(('workers', 'slices/s', 'first batch (s)'),
                              [(w, f'{rate:.1f}', f'{first:.1f}') for w, rate, first in rows],
                              'rrr'))
  return rows


if __name__ == '__main__':
  from absl import flags

  from benchmarks.common import define_int_list
  from ecm_jax import cli
  from ecm_jax.errors import UserError

  _WORKERS = define_int_list('workers', '0,1,2', 'worker process counts to time')
  _THREADS = flags.DEFINE_integer('read_threads', 1, 'config.data.read_threads')
  _BATCHES = flags.DEFINE_integer('batches', 12, 'timed batches of 4 per worker count')

  def main(argv):
    del argv
    run(_WORKERS.value, _THREADS.value, _BATCHES.value)

  cli.run(main, UserError)
