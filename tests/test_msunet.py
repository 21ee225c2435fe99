"""MSU-Net (ecm_jax.models.msunet, a Table I baseline): parameter count, shapes, parity with its
torch mirror, a training step, and the official code's (PyTorch default) initialisation.

Tiny widths (4, 8, 16, 32, 64) at 32x32; `conv_impl='xla'` and `FAST_COMPILE_OPTIONS` (compile time
is most of the cost).
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from ecm_jax.data.synthetic import noise_batches
from ecm_jax.models.networks import (
  build_model,
  init_variables,
  variable_shapes,
)
from helpers import losses_over_one_step, random_input, run_fast

TINY_FEATURES = (4, 8, 16, 32, 64)
SIZE = 32
# The official MSU_Net's exact count at img_ch=1, output_ch=1.
OFFICIAL_PARAMETERS = 47_084_545
STEPS = 3


def tiny_config(**model_overrides):
  config = get_config('msunet')
  config.model.update(msunet_features=TINY_FEATURES, conv_impl='xla', **model_overrides)
  config.data.image_size = SIZE
  config.train.batch_size = 2
  return config


def flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def parameter_count(model_config):
  return sum(math.prod(leaf.shape)
             for leaf in jax.tree.leaves(variable_shapes(build_model(model_config))['params']))


@pytest.fixture(scope='module')
def initialised():
  """(config, variables) of the tiny MSU-Net as a training run initialises it (seed 0)."""
  config = tiny_config()
  return config, jax.device_get(init_variables(build_model(config.model), config.seed))


def test_parameter_count_equals_the_official_code():
  config = get_config('msunet').model
  assert tuple(config.msunet_features) == (32, 64, 128, 256, 512)
  assert parameter_count(config) == OFFICIAL_PARAMETERS
  # One multi-scale block Cin -> C: two 3x3 and two 7x7 convs with bias, four BNs, the 1x1 fuse.
  block = lambda cin, c: ((9 + 49) * (cin * c + c * c) + 4 * c + 4 * 2 * c + 2 * c * c + c)
  params = flat(variable_shapes(build_model(config))['params'])
  assert sum(math.prod(v.shape) for path, v in params.items()
             if path[0] == 'encoder4') == block(256, 512)


def test_output_shapes_and_input_constraints(initialised):
  config, variables = initialised
  model = build_model(config.model)
  assert (model.input_multiple(), model.smallest_input()) == (16, 16)
  x = random_input((2, 64, 64, 1))
  bf16_model = build_model(tiny_config(dtype='bfloat16').model)
  logits, bf16_logits = run_fast(
      lambda v, x: tuple(m.apply(v, x, train=False)['logits'] for m in (model, bf16_model)),
      variables, x)
  assert logits.shape == bf16_logits.shape == (2, 64, 64, 1)
  assert logits.dtype == bf16_logits.dtype == jnp.float32
  # bfloat16 compute (float32 parameters) computes the same function to bfloat16 rounding.
  scale = float(np.abs(logits).max())
  assert scale > 0 and float(np.abs(bf16_logits - logits).max()) < 0.05 * scale
  # The defaults at the paper's 512x512, abstractly.
  full = build_model(get_config('msunet').model)
  shapes = variable_shapes(full)
  out = jax.eval_shape(lambda v, x: full.apply(v, x, train=False),
                       shapes, jax.ShapeDtypeStruct((2, 512, 512, 1), jnp.float32))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), out) == {
      'logits': ((2, 512, 512, 1), jnp.float32)}
  with pytest.raises(ValueError, match='divisible by 16'):
    jax.eval_shape(lambda v, x: full.apply(v, x, train=False),
                   shapes, jax.ShapeDtypeStruct((1, 40, 40, 1), jnp.float32))


def test_initialisation_follows_the_official_code(initialised):
  # The official init_weights is never called: PyTorch's defaults. Every kernel and bias uniform
  # in +-1/sqrt(fan_in) (std bound / sqrt 3; a transposed conv's fan_in from its output channels,
  # as PyTorch computes it); BatchNorm scale 1, bias 0, running mean 0, var 1.
  _, variables = initialised
  params = flat(variables['params'])
  fan_in = lambda path, kernel: (math.prod(kernel.shape[:2]) * (kernel.shape[3] if path[0]
                                 .startswith('up') else kernel.shape[2]))
  kernels, biases = [], []
  for path, value in params.items():
    if path[-2].startswith('bn'):
      np.testing.assert_array_equal(value, 1 if path[-1] == 'scale' else 0, err_msg=str(path))
      continue
    bound = 1 / math.sqrt(fan_in(path, params[(*path[:-1], 'kernel')]))
    (kernels if path[-1] == 'kernel' else biases).append(np.ravel(value) / bound)
  k, b = np.concatenate(kernels), np.concatenate(biases)
  assert k.size > 100_000 and b.size > 500
  for u in (k, b):
    assert np.abs(u).max() <= 1 and abs(u.std() - 1 / math.sqrt(3)) < 0.03
  # Not kaiming_normal_ (the unused init_weights): that would exceed the uniform bound.
  assert np.mean(np.abs(k) > 0.9) > 0.08
  for path, value in flat(variables['batch_stats']).items():
    np.testing.assert_array_equal(value, 1 if path[-1] == 'var' else 0, err_msg=str(path))


def test_one_training_step_lowers_the_loss(initialised):
  config, variables = initialised
  config = config.copy_and_resolve_references()
  config.train.learning_rate = 1e-3
  before, after, metrics = losses_over_one_step(config, variables, noise_batches(config, 1)[0])
  assert np.isfinite(before) and metrics['grad_norm'] > 0
  assert after < before


@pytest.fixture(scope='module')
def report():
  """The parity report (ecm_jax.torch_ref.parity) of Flax vs the torch mirror
  (ecm_jax.torch_ref.msunet) from trained-like weights: forward, loss, gradients, STEPS steps."""
  pytest.importorskip('torch', reason='PyTorch is optional (pip install -r '
                      'requirements-torch.txt); the JAX-vs-PyTorch parity needs it')
  from torch_helpers import parity_report  # pylint: disable=g-import-not-at-top
  return parity_report(tiny_config(), STEPS)


def test_parity_forward_per_block_loss_and_gradients(report):
  from torch_helpers import assert_forward_loss_and_gradients  # pylint: disable=g-import-not-at-top
  blocks = [f'encoder{i}' for i in range(5)] + [f'decoder{i}' for i in (3, 2, 1, 0)] + ['logits']
  params = flat(variable_shapes(build_model(tiny_config().model))['params'])
  assert_forward_loss_and_gradients(report, blocks, params)


def test_parity_after_optimizer_steps(report):
  from torch_helpers import assert_after_steps  # pylint: disable=g-import-not-at-top
  assert_after_steps(report, STEPS)
