"""What several test modules share: paths, fast compilation, random variables, small configs."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from configs.default import get_config
from ecm_jax.models.networks import FAST_COMPILE_OPTIONS, variable_shapes

REPO = pathlib.Path(__file__).resolve().parents[1]
# Real images for tests, beside the repo; tests that use it skip when absent.
SHARED_DATA = REPO.parent / 'shared' / 'data'

# conv_impl 'xla': the tiny-shape tests check the graph, and lax.conv compiles several times faster
# than the per-tap 'gemm' kernels ('auto' on CPU), which tests/test_ops.py checks against it.
SMALL = dict(features=(4, 8, 16, 32, 64), mus_channels=8, side_features=(8, 8, 4), cc_hidden=4,
             se_reduction=4, cenet_features=(4, 8, 16, 32), msunet_features=(4, 8, 16, 32, 64),
             hrnet_size='w4_small_v2', segformer_size='b0', conv_impl='xla')
# Gradients are checked on the full model and on each U-Net baseline; the other ec_cam_unet rows
# (Tables II, III) are built from the full model's blocks and are checked forward only (train and
# eval), to keep compile time in bounds, as are CE-Net, MSU-Net, HRNetV2 and SegFormer, whose
# gradients their own test modules compare with PyTorch.
GRADIENT_ROWS = ('ec_cam_unet', 'unet_se', 'unet_cbam', 'attention_unet', 'unet_pp', 'danet')


def small_config(variant='ec_cam_unet', **overrides):
  config = get_config(variant).model
  config.update(SMALL)
  config.update(overrides)
  return config


def abstract_variables(model):
  """Shapes of the model's variables (`variable_shapes`, the product's one init path)."""
  return variable_shapes(model)


def run_fast(fn, *args):
  """fn(*args), jitted and compiled with `FAST_COMPILE_OPTIONS`."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE_OPTIONS)(*args)


def randomized(variables, seed):
  """Variables of the same structure with random values: kernels ~ N(0, 1/fan_in), biases and
  running means ~ N(0, 0.1^2), BN scales ~ 1 + N(0, 0.2^2), running vars ~ U(0.5, 1.5),
  DA-Net gammas 0.5."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name in ('bias', 'mean'):
      value = 0.1 * rng.normal(size=shape)
    elif name == 'scale':
      value = 1 + 0.2 * rng.normal(size=shape)
    elif name == 'var':
      value = rng.uniform(0.5, 1.5, size=shape)
    elif name == 'gamma':
      value = np.full(shape, 0.5)
    else:
      raise AssertionError(f'unexpected variable {path}')
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, variables)


def random_input(shape=(2, 32, 32, 1), seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def tensorboard_events(workdir):
  """TensorBoard's own reader over a run's event files: {'scalars': {tag: [(step, value)]},
  'images': {tag: [(step, height, width)]}}."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(
      str(pathlib.Path(workdir) / 'tensorboard'), size_guidance={'scalars': 0, 'images': 0})
  events.Reload()
  tags = events.Tags()
  return {'scalars': {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                      for tag in tags['scalars']},
          'images': {tag: [(e.step, e.height, e.width) for e in events.Images(tag)]
                     for tag in tags['images']}}


def losses_over_one_step(config, variables, batch):
  """The product train step (`step.train_step`, the config's optimizer and schedule over 10 steps)
  from `variables` on `batch`, twice: (loss before the update, loss after it, first metrics)."""
  from ecm_jax.models.networks import build_model  # pylint: disable=g-import-not-at-top
  from ecm_jax.train import step, train_state  # pylint: disable=g-import-not-at-top
  tx = train_state.make_optimizer(config, total_steps=10)
  schedule = train_state.learning_rate_schedule(config, 10)
  model = build_model(config.model)
  state = train_state.state_from_variables(variables, tx)
  train = jax.jit(lambda state, batch: step.train_step(
      state, batch, model=model, tx=tx, loss_config=config.loss, schedule=schedule))
  compiled = train.lower(state, batch).compile(compiler_options=FAST_COMPILE_OPTIONS)
  state, first = compiled(state, batch)
  _, second = compiled(state, batch)  # the loss at the updated parameters, same batch
  return float(first['loss']), float(second['loss']), first
