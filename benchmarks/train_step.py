"""Train-step benchmark: JAX (the product step) vs the PyTorch reference, interleaved, one config.

  python -m benchmarks.train_step --config configs/kits.py --variant unet,ec_cam_unet \
      --size 128 --batch 4 --repeats 5 [--features 64,128,256,512,1024] [--notorch] \
      [--conv_impl auto] [--host_memory auto] [--torch_host_memory default] [--csv train_step.csv]

(from the repository root; `--config.key=value` overrides fields of the config file, and each
--variant row of configs/default.VARIANTS is applied to it in turn).

Per variant, the JAX step is built as training builds it (`train_state.make_optimizer`,
`create_train_state`, `make_mesh` over every device, `replicate`, `shard_batch`, `jit_train_step`:
state donated), and the PyTorch step from `ecm_jax.torch_ref` (`build_torch_model`,
`torch_ref.train_state.make_optimizer` / `train_step`) with the same initial weights
(`torch_ref.convert`) and the same synthetic batch. The two steps and a 2048^3 matmul (the
machine's GEMM peak) run round-robin: --warmup rounds, then --repeats timed rounds; each figure is
the median of its rounds, so the JAX/PyTorch ratio and the fraction of peak compare calls made
back to back. Every call is a real optimizer step on the same batch (the weights keep changing).

Columns:
  step s, images/s   median wall time of one step; global batch / step time.
  compile s          JAX: wall time of lower() + compile() of the step, the persistent compilation
                     cache disabled.
  memory MB          JAX: XLA's buffer assignment for one device (`compiled.memory_analysis()`:
                     arguments + outputs - donated aliases + temporaries). PyTorch: the increase of
                     the peak resident set size of its process (after its imports) over building
                     the model and optimizer and every step of the run: parameters, gradients,
                     Adam moments, activations and allocator overhead.
  GFLOP / step       XLA's cost analysis of the compiled JAX step (all devices; a multiply-add is
                     2 FLOPs). It counts the operations of the step as compiled: the 'gemm'
                     kernels' extra work on zero padding included. The PyTorch row uses the same
                     count (the same model maths).
  % of peak          GFLOP / step / step time / the GEMM peak measured in the same rounds.
  JAX / PyTorch      step time ratio (< 1: JAX faster).
The first-step losses of both sides are printed too (same weights, same batch: they agree to
float32 rounding).

Host memory: the PyTorch step runs in a process of its own, so each framework has its own host
allocator: --host_memory for JAX (default auto: huge pages and retaining on CPU, as train.py
runs), and --torch_host_memory for PyTorch (default: glibc's own behaviour, as PyTorch runs out of
the box). Huge pages or retained freed memory (`ecm_jax.cpu.host_memory`) spare every step most
of the page faults of its freshly mapped buffers, and speed up both frameworks; compare with both
set alike as well as as shipped. A retaining process holds its peak: at 512x512 with full widths
two of them exceed 24 GiB.

Threads: PyTorch uses `torch.get_num_threads()` OpenMP threads (OMP_NUM_THREADS), XLA its own pool
over every core. When other jobs load the machine, OpenMP's barriers suffer far more than XLA's
pool (measured here: the PyTorch step 1.8x slower with 2 threads under load than with 1 pinned
thread), which flatters the JAX/PyTorch ratio. Compare on an idle machine, or pin both to one core:
  taskset -c 1 env OMP_NUM_THREADS=1 python -m benchmarks.train_step ...
"""

from collections.abc import Sequence
import multiprocessing
import resource
import sys

import jax
import ml_collections
import numpy as np

from benchmarks.common import (
  TOTAL_STEPS,
  compile_train_step,
  gemm_thunk,
  initial_state,
  machine_summary,
  median,
  time_interleaved,
  write_csv,
)
from ecm_jax import tables
from ecm_jax.data.synthetic import noise_batches
from ecm_jax.train import sharding

HEADER = ('variant', 'framework', 'step s', 'images/s', 'compile s', 'memory MB', 'GFLOP / step',
          '% of peak', 'JAX / PyTorch')
ALIGN = 'llrrrrrrr'


def _torch_ref():
  """(torch, convert, models, training) of the optional PyTorch reference, imported on first use
  (--notorch runs without torch installed)."""
  import torch

  from ecm_jax.torch_ref import convert, models
  from ecm_jax.torch_ref import training as torch_training
  return torch, convert, models, torch_training


class TorchTrainStep:
  """The PyTorch reference step on one fixed batch; `step()` runs one optimizer step (a
  `time_interleaved` thunk) and records the loss."""

  def __init__(self, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray],
               variables: dict | None = None):
    torch, convert, models, torch_training = _torch_ref()
    self._train_step = torch_training.train_step
    self.model = models.build_torch_model(config.model)
    if variables is not None:
      convert.load_variables(self.model, variables)
    self.optimizer, self.scheduler = torch_training.make_optimizer(self.model, config, TOTAL_STEPS)
    image = np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2))  # NHWC -> NCHW
    self.batch = {'image': torch.from_numpy(image),
                  'label': torch.from_numpy(batch['label']).long()}
    self.loss_config = config.loss
    self.losses = []

  def step(self) -> dict:
    metrics = self._train_step(self.model, self.optimizer, self.scheduler, self.batch,
                               self.loss_config)
    self.losses.append(metrics['loss'])
    return metrics


def _resident_bytes() -> int:
  """The current resident set size of this process (Linux /proc)."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def _torch_worker(connection, config_dict: dict, batch: dict, variables: dict,
                  host_memory_mode: str) -> None:
  """The PyTorch process: its own host allocator (`host_memory_mode`), a `TorchTrainStep`; it
  reports the allocator in effect and its PyTorch version, then runs one step per 'step' message
  (replying with the loss) until 'stop', which it answers with the peak RSS increase over building
  the model and optimizer and every step (bytes; None off Linux)."""
  from ecm_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top  (CPU only)
  allocator = host_memory.configure(host_memory_mode)  # set up by the parent: no restart
  torch = _torch_ref()[0]  # the libraries' own memory is not the step's
  linux = sys.platform.startswith('linux')
  before = _resident_bytes() if linux else 0
  step = TorchTrainStep(ml_collections.ConfigDict(config_dict), batch, variables)
  connection.send((allocator, f'PyTorch {torch.__version__} ({torch.get_num_threads()} threads)'))
  while connection.recv() == 'step':
    connection.send(step.step()['loss'])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if linux else None  # KB
  connection.send(None if peak is None else peak - before)


class TorchStepProcess:
  """`TorchTrainStep` in a process of its own, so that each framework runs with its own host
  allocator (--host_memory for JAX, --torch_host_memory for PyTorch). `step()` is a
  `time_interleaved` thunk (the message round trip costs well under a millisecond);
  `close()` returns the peak memory (see `_torch_worker`). `host_memory` is the allocator in
  effect there (`host_memory.configure`'s answer), `version` PyTorch's version and threads."""

  def __init__(self, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray],
               variables: dict, host_memory_mode: str):
    from ecm_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top  (CPU only)
    context = multiprocessing.get_context('spawn')
    self._connection, child = context.Pipe()
    self._process = context.Process(target=_torch_worker, args=(
        child, config.to_dict(), batch, variables, host_memory_mode), daemon=True)
    with host_memory.for_child_processes(host_memory_mode):
      self._process.start()
    try:
      self.host_memory, self.version = self._connection.recv()
    except EOFError:
      raise RuntimeError('the PyTorch step process exited before its first step (its error is '
                         'printed above)') from None
    self.losses = []

  def step(self) -> float:
    self._connection.send('step')
    self.losses.append(self._connection.recv())
    return self.losses[-1]

  def close(self) -> int | None:
    self._connection.send('stop')
    memory = self._connection.recv()
    self._process.join()
    return memory


def benchmark_variant(config: ml_collections.ConfigDict, *, repeats: int, warmup: int,
                      with_torch: bool, gemm_size: int, host_memory: str,
                      torch_host_memory: str) -> list[dict]:
  """One CSV row per framework for `config`, the steps and the GEMM timed interleaved.
  `host_memory` is this process's allocator in effect (for the JAX row), `torch_host_memory` the
  mode the PyTorch process is asked for."""
  batch, mesh = noise_batches(config, 1)[0], sharding.make_mesh()
  jax_step = compile_train_step(config, mesh, batch, initial_state(config, mesh))
  thunks = {'jax': jax_step.step}
  torch_step = None
  if with_torch:
    variables = jax.device_get({'params': jax_step.state.params,
                                'batch_stats': jax_step.state.batch_stats})
    torch_step = TorchStepProcess(config, batch, variables, torch_host_memory)
    thunks['torch'] = torch_step.step
  thunks['gemm'], gemm_flops = gemm_thunk(gemm_size)
  times = {name: median(t) for name, t in time_interleaved(thunks, repeats, warmup).items()}
  peak = gemm_flops / times['gemm']
  flops = jax_step.flops()
  common = {'variant': config.variant, 'model': config.model.name,
            'features': '-'.join(map(str, config.model.features)),
            'conv_impl': config.model.conv_impl, 'size': config.data.image_size,
            'batch': config.train.batch_size, 'repeats': repeats,
            'gemm_peak_gflops': peak / 1e9, 'gflop_per_step': flops / 1e9}
  rows = [dict(common, framework='JAX', step_s=times['jax'],
               images_per_s=config.train.batch_size / times['jax'],
               compile_s=jax_step.compile_seconds, memory_mb=jax_step.memory_bytes() / 2**20,
               fraction_of_peak=flops / times['jax'] / peak,
               first_loss=float(jax_step.losses[0]), jax_over_torch=float('nan'),
               host_memory=host_memory, version=f'jax {jax.__version__}')]
  if torch_step is not None:
    memory = torch_step.close()
    rows[0]['jax_over_torch'] = times['jax'] / times['torch']
    rows.append(dict(common, framework='PyTorch', step_s=times['torch'],
                     images_per_s=config.train.batch_size / times['torch'],
                     compile_s=float('nan'),
                     memory_mb=float('nan') if memory is None else memory / 2**20,
                     fraction_of_peak=flops / times['torch'] / peak,
                     first_loss=torch_step.losses[0], jax_over_torch=float('nan'),
                     host_memory=torch_step.host_memory, version=torch_step.version))
  return rows


def _cell(value: float, fmt: str) -> str:
  return '-' if np.isnan(value) else format(value, fmt)


def table_rows(rows: list[dict]) -> list[tuple]:
  """The markdown cells of HEADER for each CSV row."""
  return [(r['variant'], r['framework'], f"{r['step_s']:.3f}", f"{r['images_per_s']:.2f}",
           _cell(r['compile_s'], '.1f'), _cell(r['memory_mb'], '.0f'),
           f"{r['gflop_per_step']:.1f}", f"{100 * r['fraction_of_peak']:.1f}",
           _cell(r['jax_over_torch'], '.2f')) for r in rows]


def run(configs: Sequence[ml_collections.ConfigDict], *, repeats: int = 5, warmup: int = 1,
        with_torch: bool = True, gemm_size: int = 2048, host_memory: str = 'default',
        torch_host_memory: str = 'default', csv: str | None = None,
        command: str | None = None) -> list[dict]:
  """Runs the benchmark of each config in turn (`benchmark_variant`), prints the markdown table
  (after the command line `command`, if given); returns the rows (as written to `csv`, if given).
  `host_memory`: this process's allocator in effect; `torch_host_memory`: the PyTorch process's
  mode."""
  rows = []
  for config in configs:
    rows += benchmark_variant(config, repeats=repeats, warmup=warmup, with_torch=with_torch,
                              gemm_size=gemm_size, host_memory=host_memory,
                              torch_host_memory=torch_host_memory)
  first, torch_row = rows[0], next((r for r in rows if r['framework'] == 'PyTorch'), None)
  print(f'\n# Train step: {first["size"]}x{first["size"]}, global batch {first["batch"]}, '
        f'features {first["features"]}, conv_impl {first["conv_impl"]}, float32; median of '
        f'{repeats} interleaved rounds after {warmup} warm-up; host memory: JAX '
        f'{host_memory}' + (f", PyTorch {torch_row['host_memory']}" if torch_row else ''))
  print(machine_summary() + (f"; {torch_row['version']}" if torch_row else '')
        + f'; GEMM peak ({gemm_size}^3 matmul, same rounds) '
        + ', '.join(f"{r['gemm_peak_gflops']:.0f}" for r in rows if r['framework'] == 'JAX')
        + ' GFLOP/s')
  if command is not None:
    print(command + '\n')
  print(tables.markdown_table(HEADER, table_rows(rows), ALIGN))
  print('\nFirst-step loss (same weights and batch): ' + '; '.join(
      f"{r['variant']} {r['framework']} {r['first_loss']:.6f}" for r in rows))
  if csv:
    write_csv(csv, rows)
  return rows


if __name__ == '__main__':
  from absl import flags

  from benchmarks.common import command_line, define_config_flags
  from ecm_jax import cli, runtime
  from ecm_jax.errors import UserError

  _CONFIG = define_config_flags(config='configs/kits.py', size=128)
  _VARIANT = flags.DEFINE_list('variant', ['unet', 'ec_cam_unet'],
                               'rows of configs/default.VARIANTS, benchmarked one by one')
  _BATCH = flags.DEFINE_integer('batch', 4, 'global batch (config: train.batch_size)')
  _REPEATS = flags.DEFINE_integer('repeats', 5, 'timed rounds (median)')
  _WARMUP = flags.DEFINE_integer('warmup', 1, 'untimed rounds first')
  _TORCH = flags.DEFINE_bool('torch', True, 'also time the PyTorch reference step (--notorch: '
                             'JAX only)')
  _TORCH_HOST_MEMORY = flags.DEFINE_enum(
      'torch_host_memory', 'default', runtime.HOST_MEMORY_MODES[1:],
      'host allocator of the PyTorch process (see --host_memory)')
  _GEMM_SIZE = flags.DEFINE_integer('gemm_size', 2048, 'n of the n^3 matmul giving the peak')
  _CSV = flags.DEFINE_string('csv', None, 'also write the rows to this CSV file')

  def main(argv):
    del argv
    allocator = runtime.host_memory_in_effect()
    configs = [_CONFIG.get(variant=variant, batch=_BATCH.value) for variant in _VARIANT.value]
    run(configs, repeats=_REPEATS.value, warmup=_WARMUP.value, with_torch=_TORCH.value,
        gemm_size=_GEMM_SIZE.value, host_memory=allocator,
        torch_host_memory=_TORCH_HOST_MEMORY.value, csv=_CSV.value,
        command=command_line('train_step'))

  cli.run(main, UserError, compilation_cache=False)  # compile times are measured
