"""Timing helpers and the train step shared by the benchmark scripts.

This machine is shared and its speed drifts: time candidates interleaved in one process (one call
of each per round), after a warm-up call, and compare medians of the rounds.
"""

import argparse
import csv
import dataclasses
import importlib.util
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ecm_jax.cpu import host_memory
from ecm_jax.train import sharding
from ecm_jax.train import train_state
from ecm_jax.models.networks import build_model, variable_shapes

# The learning-rate schedule's length for benchmark steps (the schedule's value has no effect on
# speed; training uses the run's total step count).
TOTAL_STEPS = 1000


def time_interleaved(thunks: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int = 1) -> dict[str, list[float]]:
  """Wall seconds of each call of each thunk; the thunks run round-robin, `repeats` rounds.

  A thunk runs a (compiled) computation and returns its outputs; it is waited for with
  `jax.block_until_ready`. The first `warmup` rounds (compilation, caches) are not recorded.
  """
  times = {name: [] for name in thunks}
  for r in range(warmup + repeats):
    for name, thunk in thunks.items():
      start = time.perf_counter()
      jax.block_until_ready(thunk())
      if r >= warmup:
        times[name].append(time.perf_counter() - start)
  return times


def median(xs: list[float]) -> float:
  return statistics.median(xs)


def gemm_thunk(n: int = 2048, dtype=jnp.float32) -> tuple[Callable[[], jax.Array], float]:
  """(a thunk running a jitted n x n x n matmul, its FLOPs 2 n^3): the machine's matmul reference,
  to time interleaved with what it is compared with."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  return (lambda: matmul(a, b)), 2.0 * n**3


def measure_gemm_peak(n: int = 2048, repeats: int = 7, dtype=jnp.float32) -> float:
  """This machine's matmul speed in GFLOP/s: median over `repeats` of an n x n x n jitted matmul.

  The reference for "fraction of peak" figures; measure it in the same run as what it is compared
  with (the machine's speed drifts).
  """
  thunk, flops = gemm_thunk(n, dtype)
  seconds = median(time_interleaved({'gemm': thunk}, repeats)['gemm'])
  return flops / seconds / 1e9


# --- configs, batches and the product train step -------------------------------------------------

def load_config(path: str, variant: str) -> ml_collections.ConfigDict:
  """`get_config(variant)` of a config file (e.g. configs/kits.py), as `--config path:variant`."""
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def parse_ints(text: str) -> tuple[int, ...]:
  """'64,128,256' -> (64, 128, 256) (argparse type for lists of sizes)."""
  return tuple(int(v) for v in text.split(','))


def add_config_arguments(parser: argparse.ArgumentParser, *, variant: str, variant_help: str,
                         size: int) -> None:
  """The arguments every benchmark builds its config from: --config, --variant, --size,
  --features, --conv_impl (`config_from_args` reads them); and --host_memory
  (`prepare_process`)."""
  parser.add_argument('--config', default='configs/kits.py',
                      help='config file (get_config(variant))')
  parser.add_argument('--variant', default=variant, help=variant_help)
  parser.add_argument('--size', type=int, default=size, help='image size (config: data.image_size)')
  parser.add_argument('--features', type=parse_ints, default=None,
                      help='encoder widths, e.g. 64,128,256,512,1024 (default: the config\'s)')
  parser.add_argument('--conv_impl', default=None,
                      help='auto | xla | gemm (default: the config\'s)')
  parser.add_argument('--host_memory', choices=host_memory.MODES, default='auto',
                      help='this process\'s host allocator: ' + host_memory.FLAG_HELP)


def config_from_args(args: argparse.Namespace, *, variant: str | None = None,
                     batch: int | None = None) -> ml_collections.ConfigDict:
  """The config of `args.config:variant` (default `args.variant`) with the benchmark's overrides
  (`add_config_arguments`; None keeps the file's value) and global train batch `batch`."""
  config = load_config(args.config, variant or args.variant)
  overrides = {'data.image_size': args.size, 'train.batch_size': batch,
               'model.features': None if args.features is None else tuple(args.features),
               'model.conv_impl': args.conv_impl}
  for key, value in overrides.items():
    if value is not None:
      section, name = key.split('.')
      config[section][name] = value
  return config


def prepare_process(args: argparse.Namespace) -> str:
  """First thing in a benchmark process: the host allocator of --host_memory (for huge pages the
  process restarts itself), and no persistent compilation cache (compile times are measured).
  Returns the allocator in effect (`host_memory.configure`'s answer), for the report."""
  allocator = host_memory.configure(args.host_memory)
  jax.config.update('jax_enable_compilation_cache', False)
  return allocator


@dataclasses.dataclass
class CompiledTrainStep:
  """The product train step (`sharding.jit_train_step`: state replicated and donated, batch sharded
  over the mesh) compiled for one config, with its state and one fixed batch.

  `step()` runs one optimizer step, keeps the new state and records the loss (that of the state
  before the step); call it as a `time_interleaved` thunk.
  """
  compiled: jax.stages.Compiled
  state: train_state.TrainState
  batch: dict
  compile_seconds: float
  losses: list = dataclasses.field(default_factory=list)

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    self.losses.append(metrics['loss'])
    return self.state, metrics

  def flops(self) -> float:
    """FLOPs of one step on the whole mesh: XLA's cost analysis of the compiled step (per device,
    after partitioning) times the device count."""
    return self.compiled.cost_analysis()['flops'] * self.batch['image'].sharding.num_devices

  def memory_bytes(self) -> int:
    """XLA's buffer assignment for one device: arguments + outputs - outputs aliased to (donated)
    arguments + temporaries. What one step needs at its peak, without allocator overheads."""
    m = self.compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def random_variables(model_config: ml_collections.ConfigDict, seed: int = 0) -> dict:
  """Variables of `build_model(model_config)` drawn with numpy (nothing to compile): kernels
  N(0, 1/fan-in), BatchNorm scales and variances U(0.5, 1.5), every other leaf (biases, BatchNorm
  means, attention gains) N(0, 0.1^2). Non-trivial BatchNorm statistics give the fold something to
  fold."""
  shapes = variable_shapes(build_model(model_config))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return 0.1 * rng.standard_normal(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_train_state(config: ml_collections.ConfigDict) -> train_state.TrainState:
  """A train state of `config` on the host, with `random_variables` (no initialiser to compile)
  and the optimizer's initial state: for benchmarks that need any state, the same in every
  process."""
  variables = random_variables(config.model, config.seed)
  tx = train_state.make_optimizer(config, TOTAL_STEPS)
  return jax.device_get(train_state.state_from_variables(variables, tx))


def initial_state(config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> train_state.TrainState:
  """The train state a run of `config` starts from (`train_state.create_train_state`, from
  `config.seed`), replicated over `mesh`."""
  state = train_state.create_train_state(build_model(config.model),
                                         train_state.make_optimizer(config, TOTAL_STEPS), config.seed)
  return sharding.replicate(state, mesh)


def compile_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       batch: dict[str, np.ndarray],
                       state: train_state.TrainState) -> CompiledTrainStep:
  """The train step as `ecm_jax.trainer` builds it (`jit_train_step` with the run's optimizer and
  schedule) for `batch` (global, numpy) and `state` (replicated over `mesh`, e.g. `initial_state`;
  donated to the first step). Compile time is the wall time of lower() + compile()."""
  sharding.check_batch_divisible(config.train.batch_size, mesh)
  jitted = sharding.jit_train_step(mesh, model=build_model(config.model),
                                   tx=train_state.make_optimizer(config, TOTAL_STEPS),
                                   loss_config=config.loss,
                                   schedule=train_state.learning_rate_schedule(config, TOTAL_STEPS))
  sharded = sharding.shard_batch(batch, mesh)
  start = time.perf_counter()
  compiled = jitted.lower(state, sharded).compile()
  return CompiledTrainStep(compiled, state, sharded, time.perf_counter() - start)


# --- reporting -----------------------------------------------------------------------------------

def host_summary() -> str:
  """Processor, CPU count and load average (other jobs on the machine slow every figure)."""
  load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
  processor = platform.processor() or platform.machine()
  return f'{processor}, {os.cpu_count()} CPUs (load average {load})'


def machine_summary() -> str:
  """`host_summary`, the jax version, backend and device count (initialises the backend)."""
  return (f'{host_summary()}; jax {jax.__version__}, backend {jax.default_backend()}, '
          f'{jax.device_count()} device(s)')


def command_line(script: str, argv: Sequence[str] | None) -> str:
  """The command that ran benchmark `script` (e.g. 'train_step.py') with `argv` (None: sys.argv)."""
  return shlex.join(['python', f'benchmarks/{script}',
                     *(sys.argv[1:] if argv is None else argv)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
  return '\n'.join(lines)


def write_csv(path, rows: Sequence[dict]) -> None:
  """Rows (dicts with the same keys) to a CSV file with a header line."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
