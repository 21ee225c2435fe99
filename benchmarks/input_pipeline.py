"""Augmented 512x512 training slices per second by grain worker count; prints a markdown table.

python benchmarks/input_pipeline.py [--workers=0,1,2] [--read_threads=1] [--batches=12]

Runs on SYNTHETIC 512x512 volumes written to a temporary folder (no dataset needed). Each row
times `--batches` batches of 4 after the first batch (which includes worker start-up, reported
separately). Compare the rate with what training consumes: global batch / seconds per step.
"""

import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import default  # noqa: E402
from ecm_jax import data  # noqa: E402

_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'worker process counts to time')
_THREADS = flags.DEFINE_integer('read_threads', 1, 'config.data.read_threads')
_BATCHES = flags.DEFINE_integer('batches', 12, 'timed batches of 4 per worker count')
BATCH_SIZE = 4


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as folder:
    config = default.get_config().data
    config.update(dict(dataset='synthetic', cache_dir=folder, synthetic_cases=2,
                       synthetic_slices=24, synthetic_size=512, image_size=512, split=(2, 0, 0),
                       read_threads=_THREADS.value))
    ds = data.prepare(config, split_file=pathlib.Path(folder) / 'splits.json')
    rows = []
    for workers in map(int, _WORKERS.value):
      config.num_workers = workers
      start = time.perf_counter()
      iterator = data.train_iterator(ds, config, batch_size=BATCH_SIZE, seed=0)
      next(iterator)
      first = time.perf_counter() - start
      start = time.perf_counter()
      for _ in range(_BATCHES.value):
        next(iterator)
      rate = _BATCHES.value * BATCH_SIZE / (time.perf_counter() - start)
      rows.append((workers, rate, first))
      iterator.close()
  print(f'\nAugmented {config.image_size}x{config.image_size} slices/s (SYNTHETIC volumes, '
        f'batch {BATCH_SIZE}, read_threads {_THREADS.value}, {_BATCHES.value} batches timed)\n')
  print('| workers | slices/s | first batch (s) |')
  print('|---|---|---|')
  for workers, rate, first in rows:
    print(f'| {workers} | {rate:.1f} | {first:.1f} |')


if __name__ == '__main__':
  app.run(main)
