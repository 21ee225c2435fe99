"""What a run records besides its checkpoints: metrics.jsonl, TensorBoard event files, progress.

Written by process 0 only (other processes hold a disabled log):
  metrics.jsonl   one JSON object per logged step and per validation, each with its `step`:
                  deterministic values only (losses, lr, gradient norm, val metrics), so two runs of
                  one config can be compared line by line;
  tensorboard/    the same scalars, plus throughput (perf/images_per_s, perf/step_s and the share
                  of wall time spent waiting for input, perf/data_wait_share), and the pictures of
                  eval.py (`add_images`), for `tensorboard --logdir runs`. Written with
                  tensorboardX (needs only protobuf and numpy; clu's writer needs TensorFlow).
Progress goes to stderr: a bar on a terminal, otherwise one line every `train.log_every_steps`
steps (step, steps/s, ETA, loss, data-wait share), so log files hold no carriage returns.
"""

from collections.abc import Mapping
import json
import pathlib
import sys
import time

import numpy as np
from tqdm import tqdm

from ecm_jax import files

# tensorboardX imports PyTorch whenever it is installed, only to accept torch tensors: seconds at
# each start of train.py and eval.py beside the PyTorch reference. We log numpy, so it is imported
# with PyTorch hidden (None in sys.modules makes importing it fail), unless PyTorch is loaded.
_hide_torch = 'torch' not in sys.modules
if _hide_torch:
  sys.modules['torch'] = None
try:
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
finally:
  if _hide_torch:
    del sys.modules['torch']

TENSORBOARD_DIR = 'tensorboard'


def tensorboard_writer(workdir: pathlib.Path, purge_step: int | None = None) -> SummaryWriter:
  """The run's event-file writer; `purge_step`: on resume, TensorBoard drops the events a killed
  run wrote from that step on."""
  return SummaryWriter(logdir=str(pathlib.Path(workdir) / TENSORBOARD_DIR), purge_step=purge_step,
                       flush_secs=30)


def add_images(workdir: pathlib.Path, step: int, pictures: Mapping[str, pathlib.Path]) -> None:
  """PNG files (tag -> path) as TensorBoard images of the run at `step` (eval.py's pictures)."""
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  writer = tensorboard_writer(workdir)
  try:
    for tag, path in pictures.items():
      image = matplotlib.image.imread(path)[..., :3]  # RGBA floats in [0, 1]
      writer.add_image(tag, image, step, dataformats='HWC')
  finally:
    writer.close()


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class RunLog:
  """metrics.jsonl, TensorBoard scalars and progress of one training run (module doc)."""

  def __init__(self, workdir: pathlib.Path, *, start_step: int, total_steps: int,
               batch_size: int, enabled: bool = True, terminal: bool | None = None):
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self.enabled = enabled
    self._total, self._batch = total_steps, batch_size
    self._writer = None
    if enabled:
      if start_step:
        self._truncate_after(start_step)
      self._writer = tensorboard_writer(workdir, purge_step=start_step + 1 if start_step else None)
    self._terminal = sys.stderr.isatty() if terminal is None else terminal
    self._bar = tqdm(total=total_steps, initial=start_step, desc='train', unit='step',
                     dynamic_ncols=True, mininterval=2.0,
                     disable=not (enabled and self._terminal))
    self._tick, self._tick_step, self._wait = time.perf_counter(), start_step, 0.0

  def _truncate_after(self, step: int) -> None:
    """On resume: drop the lines a killed run wrote past the checkpoint it resumes from."""
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)['step'] <= step]
    files.write_text(self.path, ''.join(line + '\n' for line in kept))

  def waited(self, seconds: float) -> None:
    """Time the loop spent waiting for the next input batch."""
    self._wait += seconds

  def stepped(self) -> None:
    self._bar.update(1)

  def write(self, record: dict) -> None:
    """One metrics record ({'step': s, 'train/loss': ..., ...}) to metrics.jsonl and TensorBoard."""
    if not self.enabled:
      return
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key != 'step' and value is not None and np.isfinite(value):
        self._writer.add_scalar(key, value, record['step'])

  def progress(self, step: int, loss: float | None) -> None:
    """Throughput since the last call, to TensorBoard and the progress bar or line."""
    now = time.perf_counter()
    steps, wall = step - self._tick_step, max(now - self._tick, 1e-9)
    if not self.enabled or steps <= 0 or loss is None:
      return
    rate, wait_share = steps / wall, min(self._wait / wall, 1.0)
    self._tick, self._tick_step, self._wait = now, step, 0.0
    perf = {'perf/images_per_s': rate * self._batch, 'perf/step_s': 1 / rate,
            'perf/data_wait_share': wait_share}
    for key, value in perf.items():
      self._writer.add_scalar(key, value, step)
    if self._terminal:
      self._bar.set_postfix({'loss': f'{loss:.3g}', 'img/s': f'{rate * self._batch:.3g}',
                             'data wait': f'{wait_share:.0%}'}, refresh=False)
    else:
      eta = (self._total - step) / rate
      self.message(f'step {step}/{self._total}: {rate:.3g} steps/s, ETA {_duration(eta)}, '
                   f'loss {loss:.4g}, data wait {wait_share:.0%}')

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._terminal:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    self._bar.close()
    if self._writer is not None:
      self._writer.close()
