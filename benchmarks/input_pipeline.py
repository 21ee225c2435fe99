"""Augmented training slices per second by grain worker count, against what the step consumes.

  python -m benchmarks.input_pipeline [--workers 0,1,2] [--read_threads 1] [--batches 12] \
      [--size 512] [--consumption 100]

(from the repository root). Runs on SYNTHETIC --size x --size volumes written to a temporary
folder (no dataset needed). Each row times `--batches` batches of 4 after the first batch (which
includes worker start-up, reported separately). --workers may include -1, the auto default
(`ecm_jax.config.resolve_num_workers`: from the CPU count per local device). --consumption: the
images/s the train step consumes at this size (benchmarks/train_step.py, or the device check's
step table): each row then says whether the input keeps up, and how many workers would.
"""

from collections.abc import Sequence
import pathlib
import tempfile
import time

from configs import default
from ecm_jax import data, tables
from ecm_jax.config import resolve_num_workers

BATCH_SIZE = 4


def run(workers: Sequence[int] = (0, 1, 2), read_threads: int = 1, batches: int = 12,
        size: int = 512, consumption: float | None = None) -> list[tuple[int, float, float]]:
  """Times `batches` batches per worker count in `workers` (-1: the auto default;
  config.data.read_threads `read_threads`) on `size` x `size` slices and prints the table, with
  `consumption` (the step's images/s) beside it if given; returns its rows (workers, slices/s,
  first batch s)."""
  workers = [resolve_num_workers(w) for w in workers]
  with tempfile.TemporaryDirectory() as folder:
    config = default.get_config().data
    config.update(dict(dataset='synthetic', cache_dir=folder, synthetic_cases=2,
                       synthetic_slices=24, synthetic_size=size, image_size=size, split=(2, 0, 0),
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
  header, cells = ('workers', 'slices/s', 'first batch (s)'), []
  for w, rate, first in rows:
    cells.append((w, f'{rate:.1f}', f'{first:.1f}'))
  if consumption:
    header += ('step consumes / s', 'keeps up')
    cells = [c + (f'{consumption:.1f}', 'yes' if r >= consumption else 'no')
             for c, (_, r, _) in zip(cells, rows)]
  print(tables.markdown_table(header, cells, 'r' * len(header)))
  if consumption:
    per_worker = max((r / w for w, r, _ in rows if w), default=None)
    if per_worker:
      print(f'\nAbout {per_worker:.0f} slices/s per worker here: the step needs about '
            f'{consumption / per_worker:.1f} workers (cores) at this size.')
  return rows


if __name__ == '__main__':
  from absl import flags

  from benchmarks.common import define_int_list
  from ecm_jax import cli
  from ecm_jax.errors import UserError

  _WORKERS = define_int_list('workers', '0,1,2', 'worker process counts to time (-1: auto)')
  _THREADS = flags.DEFINE_integer('read_threads', 1, 'config.data.read_threads')
  _BATCHES = flags.DEFINE_integer('batches', 12, 'timed batches of 4 per worker count')
  _SIZE = flags.DEFINE_integer('size', 512, 'slice size')
  _CONSUMPTION = flags.DEFINE_float('consumption', None, "the train step's images/s at --size")

  def main(argv):
    del argv
    run(_WORKERS.value, _THREADS.value, _BATCHES.value, _SIZE.value, _CONSUMPTION.value)

  cli.run(main, UserError)
