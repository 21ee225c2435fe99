"""CE-Net (ecm_jax.models.cenet, a Table I baseline): parameter count, shapes, parity with its
torch mirror, a training step, and the official code's initialisation.

Tiny widths (8, 16, 32, 64) at 192x192, the smallest input (RMP's 6x6 pool on the 1/32 map);
`conv_impl='xla'` and `FAST_COMPILE_OPTIONS` (compile time is most of the cost).
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

TINY_FEATURES = (8, 16, 32, 64)
SIZE = 192  # the smallest input: 6 x 32
# The official CE_Net_'s exact count with a 1-channel first conv and 1 class.
OFFICIAL_PARAMETERS = 28_996_821
STEPS = 3


def tiny_config(**model_overrides):
  config = get_config('cenet')
  config.model.update(cenet_features=TINY_FEATURES, conv_impl='xla', **model_overrides)
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
  """(config, variables) of the tiny CE-Net as a training run initialises it (seed 0)."""
  config = tiny_config()
  return config, jax.device_get(init_variables(build_model(config.model), config.seed))


def test_parameter_count_equals_the_official_code():
  config = get_config('cenet').model
  assert tuple(config.cenet_features) == (64, 128, 256, 512)
  assert parameter_count(config) == OFFICIAL_PARAMETERS
  # DAC shares its convs across branches: three 3x3 and one 1x1 conv of C -> C with bias.
  c = 512
  dac = flat(variable_shapes(build_model(config))['params'])
  dac = sum(math.prod(v.shape) for path, v in dac.items() if path[0] == 'dac')
  assert dac == 3 * (9 * c * c + c) + c * c + c


def test_output_shapes_and_input_constraints(initialised):
  config, variables = initialised
  model = build_model(config.model)
  assert (model.input_multiple(), model.smallest_input()) == (32, 192)
  x = random_input((2, SIZE, SIZE, 1))
  bf16_model = build_model(tiny_config(dtype='bfloat16').model)
  logits, bf16_logits = run_fast(
      lambda v, x: tuple(m.apply(v, x, train=False)['logits'] for m in (model, bf16_model)),
      variables, x)
  assert logits.shape == bf16_logits.shape == (2, SIZE, SIZE, 1)
  assert logits.dtype == bf16_logits.dtype == jnp.float32
  # bfloat16 compute (float32 parameters) computes the same function to bfloat16 rounding.
  scale = float(np.abs(logits).max())
  assert scale > 0 and float(np.abs(bf16_logits - logits).max()) < 0.05 * scale
  # The defaults at the paper's 512x512, abstractly.
  full = build_model(get_config('cenet').model)
  shapes = variable_shapes(full)
  out = jax.eval_shape(lambda v, x: full.apply(v, x, train=False),
                       shapes, jax.ShapeDtypeStruct((2, 512, 512, 1), jnp.float32))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), out) == {
      'logits': ((2, 512, 512, 1), jnp.float32)}
  for size, why in ((160, 'at least 192'), (208, 'divisible by 32')):
    with pytest.raises(ValueError, match=why):
      jax.eval_shape(lambda v, x: full.apply(v, x, train=False),
                     shapes, jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))


def test_initialisation_follows_the_official_code(initialised):
  _, variables = initialised
  params = flat(variables['params'])
  # Encoder (stem, stages, shortcuts): torchvision ResNet's kaiming_normal_(fan_out, relu), an
  # untruncated N(0, 2 / (kh kw Cout)): pooled over every encoder conv, w / std is N(0, 1).
  encoder = [kernel / math.sqrt(2 / (kernel.shape[0] * kernel.shape[1] * kernel.shape[3]))
             for path, kernel in params.items() if path[-1] == 'kernel'
             and path[0] in ('stem', 'encoder1', 'encoder2', 'encoder3', 'encoder4')]
  z = np.concatenate([np.ravel(k) for k in encoder])
  assert len(encoder) == 1 + 2 * 16 + 3 and z.size > 40_000
  assert abs(z.std() - 1) < 0.03 and abs(z.mean()) < 0.03
  assert 0.035 < np.mean(np.abs(z) > 2) < 0.056  # normal: 4.6%; a 2-sigma truncated one: 0
  # Every other kernel and bias: PyTorch's default, uniform in +-1/sqrt(fan_in) (std bound/sqrt 3;
  # a transposed conv's fan_in from its output channels, as PyTorch computes it), except DAC's
  # biases, which the official DACblock zeroes.
  rest = {path: v for path, v in params.items() if not path[-2].startswith('bn')
          and path[0] in ('dac', 'rmp', 'decoder4', 'decoder3', 'decoder2', 'decoder1', 'head')}
  fan_in = lambda path, kernel: (math.prod(kernel.shape[:2]) * (kernel.shape[3] if 'deconv' in
                                 path[-2] else kernel.shape[2]))
  uniform = []
  for path, value in rest.items():
    if path[-1] == 'kernel':
      uniform.append(np.ravel(value) * math.sqrt(fan_in(path, value)))
    elif path[-1] == 'bias' and path[0] == 'dac':
      np.testing.assert_array_equal(value, 0, err_msg=str(path))
    elif path[-1] == 'bias':
      kernel = rest[(*path[:-1], 'kernel')]
      assert np.abs(value).max() <= 1 / math.sqrt(fan_in(path, kernel)) and np.any(value != 0)
  u = np.concatenate(uniform)
  assert np.abs(u).max() <= 1 and abs(u.std() - 1 / math.sqrt(3)) < 0.02
  # BatchNorm: scale 1, bias 0, running mean 0, var 1.
  for path, value in {**params, **flat(variables['batch_stats'])}.items():
    if path[-1] in ('scale', 'var'):
      np.testing.assert_array_equal(value, 1, err_msg=str(path))
    elif path[-1] == 'mean' or path[-2].startswith(('bn', 'shortcut_bn')):
      np.testing.assert_array_equal(value, 0, err_msg=str(path))


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
  (ecm_jax.torch_ref.cenet) from trained-like weights: forward, loss, gradients, STEPS steps."""
  pytest.importorskip('torch', reason='PyTorch is optional (pip install -r '
                      'requirements-torch.txt); the JAX-vs-PyTorch parity needs it')
  from torch_helpers import parity_report  # pylint: disable=g-import-not-at-top
  return parity_report(tiny_config(), STEPS)


def test_parity_forward_per_block_loss_and_gradients(report):
  from torch_helpers import assert_forward_loss_and_gradients  # pylint: disable=g-import-not-at-top
  blocks = ['stem', 'encoder1', 'encoder2', 'encoder3', 'encoder4', 'dac', 'rmp', 'decoder4',
            'decoder3', 'decoder2', 'decoder1', 'head', 'logits']
  params = flat(variable_shapes(build_model(tiny_config().model))['params'])
  assert_forward_loss_and_gradients(report, blocks, params)


def test_parity_after_optimizer_steps(report):
  from torch_helpers import assert_after_steps  # pylint: disable=g-import-not-at-top
  assert_after_steps(report, STEPS)
