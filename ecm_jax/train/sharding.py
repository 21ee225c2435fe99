"""Data parallelism: one `Mesh` over every device with a single `data` axis.

The global batch is sharded along it and the state replicated. Under `jax.jit` BatchNorm then
reduces over the global batch (XLA inserts the all-reduces), which is the paper's synchronised
BatchNorm.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from ecm_jax.errors import ConfigError
from ecm_jax.train import step


def make_mesh(devices=None) -> Mesh:
  """A 1D mesh named `data` over the given (default: all) devices."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = 'train.batch_size') -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ConfigError(f'config.{what}={global_batch} is not divisible by the {n} devices of the '
                      f'mesh; use a multiple of {n}.')


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax arrays sharded on `data` (works multi-host)."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  """`tree` (the same values in every process) on every device of the mesh. Passed through the
  host: a multi-process job cannot reshard an array of one process's device onto all devices."""
  return jax.device_put(jax.device_get(tree), NamedSharding(mesh, P()))


def jit_train_step(mesh: Mesh, **static) -> Callable:
  """`train_step` jitted over the mesh: state replicated and donated, batch sharded."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  return jax.jit(functools.partial(step.train_step, **static), in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def jit_eval_step(mesh: Mesh, *, model: nn.Module) -> Callable:
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  return jax.jit(functools.partial(step.eval_step, model=model), in_shardings=(replicated, sharded),
                 out_shardings=replicated)


def host_temp_bytes(compiled: jax.stages.Compiled) -> int:
  """Bytes of temporaries one call of `compiled` allocates on this host: XLA's memory analysis
  (per device) times the local devices."""
  analysis = compiled.memory_analysis()
  return 0 if analysis is None else analysis.temp_size_in_bytes * jax.local_device_count()
