"""Timing helpers, flags, configs and the train step shared by the benchmark scripts.

This machine is shared and its speed drifts: time candidates interleaved in one process (one call
of each per round), after a warm-up call, and compare medians of the rounds.
"""

from collections.abc import Callable, Sequence
import copy
import csv
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.default import with_variant
from ecm_jax.errors import ConfigError
from ecm_jax.models import ops
from ecm_jax.models.networks import build_model, compiler_options, variable_shapes
from ecm_jax.train import sharding, train_state

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


# --- flags and configs ----------------------------------------------------------------------------

class IntListParser(flags.ListParser):
  """absl parser of a comma-separated list of integers ('64,128,256' -> (64, 128, 256))."""

  def parse(self, argument):
    values = super().parse(argument)
    try:
      return tuple(int(v) for v in values)
    except ValueError:
      raise ValueError(f'expected comma-separated integers, got {argument!r}') from None

  def flag_type(self):
    return 'comma-separated list of integers'


def define_int_list(name: str, default: str | None, help_string: str) -> flags.FlagHolder:
  """An absl flag of comma-separated integers (its value a tuple). Call only from a script's
  `__main__` block (see `define_config_flags`)."""
  return flags.DEFINE(IntListParser(), name, default, help_string,
                      serializer=flags.CsvListSerializer(','))


@dataclasses.dataclass(frozen=True)
class ConfigFlags:
  """The flags a benchmark builds its configs from (`define_config_flags`); `get` reads them."""
  config: flags.FlagHolder
  size: flags.FlagHolder
  features: flags.FlagHolder
  conv_impl: flags.FlagHolder

  def get(self, *, variant: str | None = None,
          batch: int | None = None) -> ml_collections.ConfigDict:
    """`benchmark_config` of --config with --size, --features and --conv_impl."""
    return benchmark_config(self.config.value, variant=variant, size=self.size.value,
                            features=self.features.value, conv_impl=self.conv_impl.value,
                            batch=batch)


def define_config_flags(*, config: str, size: int) -> ConfigFlags:
  """The flags every config-taking benchmark builds its config from: --config (a config file,
  `path[:variant]`, default `config`, with `--config.key=value` overrides), --size (default
  `size`), --features and --conv_impl (default: the config's).

  Call only when the module runs as a script (its `__main__` block): the tests import several
  benchmark modules into one process, and absl flag names are global.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return ConfigFlags(
      config=config_flags.DEFINE_config_file(
          'config', config, 'config file[:variant] (e.g. configs/kits.py:unet; variants: '
          'configs/default.VARIANTS); override its fields with --config.key=value'),
      size=flags.DEFINE_integer('size', size, 'image size (config: data.image_size)'),
      features=define_int_list('features', None, 'encoder widths, e.g. 64,128,256,512,1024 '
                               "(config: model.features; default: the config's)"),
      conv_impl=flags.DEFINE_enum('conv_impl', None, ops.IMPLS,
                                  "config: model.conv_impl (default: the config's)"))


def benchmark_config(config: ml_collections.ConfigDict, *, variant: str | None = None,
                     size: int | None = None, features: Sequence[int] | None = None,
                     conv_impl: str | None = None,
                     batch: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` as a benchmark runs it: the row `variant` of configs/default.VARIANTS
  (None: the config's own), image size `size`, encoder widths `features`, `conv_impl` and global
  train batch `batch` (None keeps the config's value).

  A variant is applied by `configs.default.with_variant`, whatever variant the config file
  selected; the config's other model fields stay.
  """
  config = copy.deepcopy(config)
  if variant is not None:
    try:
      model_config = with_variant(config.model, variant)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    with config.unlocked():
      config.model = model_config
      config.variant = variant
  overrides = {'data.image_size': size, 'train.batch_size': batch,
               'model.features': None if features is None else tuple(features),
               'model.conv_impl': conv_impl}
  for key, value in overrides.items():
    if value is not None:
      section, name = key.split('.')
      config[section][name] = value
  return config


# --- the product train step ----------------------------------------------------------------------

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
  donated to the first step), compiled with `networks.compiler_options` (remat on the CPU needs
  one). Compile time is the wall time of lower() + compile()."""
  sharding.check_batch_divisible(config.train.batch_size, mesh)
  jitted = sharding.jit_train_step(mesh, model=build_model(config.model),
                                   tx=train_state.make_optimizer(config, TOTAL_STEPS),
                                   loss_config=config.loss,
                                   schedule=train_state.learning_rate_schedule(config, TOTAL_STEPS),
                                   seed=config.seed)
  sharded = sharding.shard_batch(batch, mesh)
  start = time.perf_counter()
  compiled = jitted.lower(state, sharded).compile(compiler_options=compiler_options(config.model))
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


def command_line(module: str) -> str:
  """The command that ran benchmark `module` (e.g. 'train_step'): `python -m benchmarks.<module>`
  with this process's arguments."""
  return shlex.join(['python', '-m', f'benchmarks.{module}', *sys.argv[1:]])


def write_csv(path, rows: Sequence[dict]) -> None:
  """Rows (dicts with the same keys) to a CSV file with a header line."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
