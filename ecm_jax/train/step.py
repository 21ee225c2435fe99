"""The pure step functions: `(state, batch) -> (state, metrics)` for training, counts for eval.

No I/O and no sharding here (`ecm_jax.train.sharding` jits them over the mesh).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ecm_jax.evaluate import metrics as metrics_lib
from ecm_jax.train import losses
from ecm_jax.train.train_state import TrainState


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
  """The 'dropout' key of train step `step` (models with dropout or stochastic depth, e.g.
  SegFormer): a function of the run's seed and the step alone, so a resumed run draws the same."""
  return jax.random.fold_in(jax.random.key(seed), step)


def loss_and_gradients(state: TrainState, batch: dict, *, model: nn.Module,
                       loss_config: ml_collections.ConfigDict, seed: int = 0):
  """Train-mode forward and backward: (loss, loss terms, gradients, updated batch_stats)."""

  def loss_fn(params):
    outputs, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                   batch['image'], train=True, mutable=['batch_stats'],
                                   rngs={'dropout': dropout_key(seed, state.step)})
    loss, terms = losses.segmentation_loss(outputs, batch['label'], loss_config)
    return loss, (terms, updates['batch_stats'])

  (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, terms, grads, batch_stats


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_config: ml_collections.ConfigDict,
               schedule: optax.Schedule, seed: int = 0):
  """One optimizer step on a (global) batch: `(state, batch) -> (state, metrics)`; `seed` (the
  run's) keys dropout."""
  loss, terms, grads, batch_stats = loss_and_gradients(state, batch, model=model,
                                                       loss_config=loss_config, seed=seed)
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
