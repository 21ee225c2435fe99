"""The train state, the optimizer of SPEC section 3, and the jitted data-parallel steps.

Everything here is a pure function of its inputs; I/O lives in train.py. Data parallelism: one
`Mesh` over every device with a single `data` axis; the global batch is sharded along it and the
state replicated. Under `jax.jit` BatchNorm then reduces over the global batch (XLA inserts the
all-reduces), which is the paper's synchronised BatchNorm.
"""

import functools
import os
import pathlib
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ecm_jax import losses
from ecm_jax import metrics as metrics_lib


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; a plain pytree, checkpointed as is."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Cosine annealing from `train.learning_rate` to 0 over the whole run (one value per step)."""
  return optax.cosine_decay_schedule(config.train.learning_rate, decay_steps=max(total_steps, 1))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient before the moments, as PyTorch's
  `Adam(weight_decay=wd)` (not AdamW), on every parameter, and the cosine schedule."""
  return optax.chain(
      optax.add_decayed_weights(config.train.weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale_by_learning_rate(learning_rate_schedule(config, total_steps)),
  )


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       image_shape: tuple) -> TrainState:
  """Initialises the model (from `seed`) on a dummy batch of `image_shape` = (H, W, C)."""
  # Jitted, and with the 'rbg' generator: XLA:CPU compiles threefry-based initialisers of a
  # network this size several times slower, and op-by-op initialisation compiles every layer.
  rng = jax.random.key(seed, impl='rbg')
  init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False))
  variables = init(rng)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


def loss_and_gradients(state: TrainState, batch: dict, *, model: nn.Module,
                       loss_config: ml_collections.ConfigDict):
  """Train-mode forward and backward: (loss, loss terms, gradients, updated batch_stats)."""

  def loss_fn(params):
    outputs, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                   batch['image'], train=True, mutable=['batch_stats'])
    loss, terms = losses.segmentation_loss(outputs, batch['label'], loss_config)
    return loss, (terms, updates['batch_stats'])

  (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, terms, grads, batch_stats


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_config: ml_collections.ConfigDict,
               schedule: optax.Schedule):
  """One optimizer step on a (global) batch: `(state, batch) -> (state, metrics)`."""
  loss, terms, grads, batch_stats = loss_and_gradients(state, batch, model=model,
                                                       loss_config=loss_config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  step_metrics = {'loss': loss, 'lr': schedule(state.step), 'grad_norm': optax.tree.norm(grads),
                  **terms}
  return new_state, step_metrics


def classes_from_logits(logits: jax.Array) -> jax.Array:
  """(B,H,W,K) logits -> (B,H,W) int32 classes: sigmoid > 0.5 for K = 1, argmax otherwise."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def predict(state: TrainState, images: jax.Array, *, model: nn.Module) -> jax.Array:
  """Eval-mode class map (B,H,W) int32 from the main head."""
  return classes_from_logits(model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                                         images, train=False)['logits'])


def eval_step(state: TrainState, batch: dict, *, model: nn.Module) -> jax.Array:
  """Confusion counts of one eval batch, padded examples (`valid` False) excluded."""
  pred = predict(state, batch['image'], model=model)
  return metrics_lib.confusion_counts_jnp(pred, batch['label'], batch['valid'])


# --- Data parallelism ---------------------------------------------------------------------------

def make_mesh(devices=None) -> Mesh:
  """A 1D mesh named `data` over the given (default: all) devices."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = 'train.batch_size') -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f'config.{what}={global_batch} is not divisible by the {n} devices of the '
                     f'mesh; use a multiple of {n}.')


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax arrays sharded on `data` (works multi-host)."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def jit_train_step(mesh: Mesh, **static) -> Callable:
  """`train_step` jitted over the mesh: state replicated and donated, batch sharded."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  return jax.jit(functools.partial(train_step, **static), in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def jit_eval_step(mesh: Mesh, *, model: nn.Module) -> Callable:
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  return jax.jit(functools.partial(eval_step, model=model), in_shardings=(replicated, sharded),
                 out_shardings=replicated)


def host_temp_bytes(compiled: jax.stages.Compiled) -> int:
  """Bytes of temporaries one call of `compiled` allocates on this host: XLA's memory analysis
  (per device) times the local devices."""
  analysis = compiled.memory_analysis()
  return 0 if analysis is None else analysis.temp_size_in_bytes * jax.local_device_count()


def enable_compilation_cache() -> None:
  """Persists compiled steps across processes (a resumed or repeated run skips recompilation).

  Uses $JAX_COMPILATION_CACHE_DIR when set (jax reads it itself), else ~/.cache/ecm_jax/xla.
  """
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    path = pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
    jax.config.update('jax_compilation_cache_dir', str(path / 'ecm_jax' / 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
