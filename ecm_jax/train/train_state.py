"""The train state and the optimizer (the paper's recipe, Section IV-C): a plain pytree and optax.

Variables come from `ecm_jax.models.networks.init_variables` (the one initialisation path);
`create_train_state` adds the optimizer state, `abstract_train_state` its shapes for a restore.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ecm_jax.models.networks import init_variables, variable_shapes


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


def state_from_variables(variables: dict, tx: optax.GradientTransformation) -> TrainState:
  """The train state at step 0 from {'params', 'batch_stats'}, with the optimizer's initial state."""
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       seed: int) -> TrainState:
  """The state a run starts from: `init_variables(model, seed)` and the optimizer's state."""
  return state_from_variables(init_variables(model, seed), tx)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation) -> TrainState:
  """Shapes and dtypes of `create_train_state(model, tx, seed)` (for restoring a checkpoint)."""
  return jax.eval_shape(lambda v: state_from_variables(v, tx), variable_shapes(model))
