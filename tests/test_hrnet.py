"""HRNetV2 (ecm_jax/models/hrnet.py): sizes, shapes, initialisation, training, and its torch mirror.

Parameter counts are the official HRNet-Semantic-Segmentation code's (pytorch-v1.1, 1 input
channel, 1 class). Executed tests run the tiny 'w4_small_v2' (tests/helpers.py SMALL) with
`conv_impl='xla'` and `FAST_COMPILE_OPTIONS`; XLA compile time is nearly all of their cost.
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from ecm_jax.models import hrnet, ops
from ecm_jax.models.networks import (
  FAST_COMPILE_OPTIONS,
  build_model,
  init_variables,
  variable_shapes,
)
from helpers import losses_over_one_step, random_input, randomized, run_fast, small_config

# At 1 input channel and 1 class, counted with the official seg_hrnet.py (88419ab1).
OFFICIAL_PARAMETERS = {'w18_small_v2': 3_933_549, 'w18': 9_635_089, 'w32': 29_536_705,
                       'w48': 65_845_249}
PARITY_STEPS = 5


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def tiny():
  """(model, variables) of 'w4_small_v2' initialised as training does (seed 0)."""
  model = build_model(small_config('hrnet'))
  return model, jax.device_get(init_variables(model, 0))


@pytest.mark.parametrize('size', list(OFFICIAL_PARAMETERS))
def test_parameter_count_equals_the_official_code(size):
  config = get_config('hrnet').model
  config.hrnet_size = size
  shapes = variable_shapes(build_model(config))
  assert count(shapes['params']) == OFFICIAL_PARAMETERS[size]


def test_sizes_parse_and_anything_else_is_rejected():
  assert hrnet.parse_size('w18') == (18, hrnet.Structure(4, (1, 4, 3), 4))
  assert hrnet.parse_size('w4_small_v2') == (4, hrnet.Structure(2, (1, 3, 2), 2))
  for bad in ('w18_small', 'w0', 'hrnet_w18', 'W18', 'w18_small_v1'):
    config = small_config('hrnet', hrnet_size=bad)
    with pytest.raises(ValueError, match=r"model.hrnet_size must be one of \('w18_small_v2', "
                                         r"'w18', 'w32', 'w48'\)"):
      build_model(config)


def test_logits_are_the_head_output_resized_bilinearly_to_the_input(tiny):
  # Random weights: at the std-0.001 initialisation the eval-mode features vanish in float32 and
  # the logits are the head bias.
  model = tiny[0]
  variables = randomized(variable_shapes(model), seed=0)
  x = random_input((2, 64, 64, 1))
  capture = lambda module, method: method == '__call__' and module.path == ('head',)
  outputs, state = run_fast(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=capture,
                               mutable=['intermediates']), variables, x)
  logits, head = outputs['logits'], state['intermediates']['head']['__call__'][0]
  assert logits.shape == (2, 64, 64, 1) and logits.dtype == jnp.float32
  assert head.shape == (2, 16, 16, 1)
  np.testing.assert_allclose(logits, ops.resize_bilinear(head, (64, 64)), rtol=0, atol=1e-6)
  assert np.std(logits) > 0  # not a constant map: the input reaches the logits


def test_output_shapes_at_512_by_eval_shape():
  config = get_config('hrnet').model  # the default w18
  model = build_model(config)
  x = jax.ShapeDtypeStruct((2, 512, 512, 1), jnp.float32)
  capture = lambda module, method: method == '__call__' and isinstance(
      module, (hrnet.Fuse, hrnet.Head))
  outputs, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=capture,
                               mutable=['intermediates']), variable_shapes(model), x)
  assert outputs['logits'].shape == (2, 512, 512, 1) and outputs['logits'].dtype == jnp.float32
  fused = state['intermediates']['stage4']['module2']
  for i in range(4):  # branch i at 1/2^(i+2) with 18 * 2^i channels
    assert fused[f'fuse{i}']['__call__'][0].shape == (2, 128 >> i, 128 >> i, 18 << i)
  assert state['intermediates']['head']['__call__'][0].shape == (2, 128, 128, 1)
  with pytest.raises(ValueError, match='divisible by 32'):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variable_shapes(model),
                   jax.ShapeDtypeStruct((1, 80, 80, 1), jnp.float32))


def test_initialisation_follows_the_official_init_weights(tiny):
  _, variables = tiny
  flat = flax.traverse_util.flatten_dict(variables['params'])
  is_norm = lambda path: path[-2].startswith('bn') or path[-2] == 'downsample_bn'
  kernels = np.concatenate([np.ravel(v) for path, v in flat.items() if path[-1] == 'kernel'])
  assert kernels.size > 100_000
  # Normal with std 0.001 (PyTorch's default would be uniform, std 1/sqrt(3 fan_in) >= 0.006).
  assert abs(np.std(kernels) - 1e-3) < 2e-5 and abs(np.mean(kernels)) < 2e-5
  assert abs(np.mean(np.abs(kernels)) - 1e-3 * math.sqrt(2 / math.pi)) < 2e-5
  # Only the head convs have biases; init_weights leaves them at PyTorch's U(+-1/sqrt(fan_in)).
  biases = {path: v for path, v in flat.items() if path[-1] == 'bias' and not is_norm(path)}
  assert set(biases) == {('head', 'conv1', 'bias'), ('head', 'conv2', 'bias')}
  head = biases['head', 'conv1', 'bias']
  bound = 1 / math.sqrt(head.size)  # fan_in of the 1x1 conv C -> C is C
  assert np.abs(head).max() <= bound and np.std(head) > 0.4 * bound
  # BatchNorm scale 1, bias 0 (two parameters per pair of running statistics).
  norms = {path: v for path, v in flat.items() if is_norm(path)}
  assert len(norms) == len(jax.tree.leaves(variables['batch_stats']))
  for path, v in norms.items():
    np.testing.assert_array_equal(v, 1.0 if path[-1] == 'scale' else 0.0, err_msg=str(path))


def test_one_training_step_lowers_the_loss(tiny):
  _, variables = tiny
  config = get_config('hrnet')
  config.model = small_config('hrnet')
  config.train.learning_rate = 1e-3
  image = random_input((2, 64, 64, 1), seed=3)
  batch = {'image': image, 'label': (image[..., 0] > 0.5).astype(jnp.int32)}
  first, second, _ = losses_over_one_step(config, variables, batch)
  assert np.isfinite(first) and second < first - 1e-3


@pytest.fixture(scope='module')
def parity_report():
  """The JAX-vs-PyTorch report of 'w4_small_v2' at 64x64 (batch 2), from trained-like weights."""
  pytest.importorskip('torch', reason='PyTorch is optional (pip install -r '
                      'requirements-torch.txt); the JAX-vs-PyTorch test needs it')
  # Imported here: both need torch, which the tests above do not.
  from torch_helpers import trained_like  # pylint: disable=g-import-not-at-top

  from ecm_jax.torch_ref import hrnet as torch_hrnet  # pylint: disable=g-import-not-at-top
  from ecm_jax.torch_ref import parity  # pylint: disable=g-import-not-at-top
  config = get_config('hrnet')
  config.model = small_config('hrnet')
  config.data.image_size = 64
  config.train.batch_size = 2
  report = parity.run(config, steps=PARITY_STEPS, variables=trained_like(config.model),
                      compiler_options=FAST_COMPILE_OPTIONS)
  mirror = torch_hrnet.HRNetV2('w4_small_v2')
  names = parity.block_names(mirror)
  return report, names, len(list(mirror.parameters()))


def test_matches_the_torch_mirror(parity_report):
  from torch_helpers import (  # pylint: disable=g-import-not-at-top  (needs torch: the fixture)
    BATCH_STATS_TOL,
    FORWARD_TOL,
    GRADIENT_TOL,
    LOSS_TOL,
    PARAMS_TOL,
    assert_within,
  )
  report, names, parameter_count = parity_report
  # Stem, 2 Bottlenecks, 2 + 3 * 3 + 2 * 4 fusion outputs, head; then the logits.
  assert len(names) == 1 + 2 + 19 + 1 and names[0] == 'stem' and names[-1] == 'head'
  assert 'stage4/module1/fuse3' in names
  for forward in (report.forward_eval, report.forward_train):
    assert [d.name for d in forward] == names + ['logits']
  assert_within(report.forward_eval, FORWARD_TOL, 'eval forward')
  assert_within(report.forward_train, FORWARD_TOL, 'train forward')
  assert all(d.max_rel <= LOSS_TOL for d in report.loss), report.loss
  assert len(report.gradients) == len(report.params) == parameter_count
  assert_within(report.gradients, GRADIENT_TOL, 'gradient')
  assert report.steps == PARITY_STEPS and set(report.num_batches_tracked) == {PARITY_STEPS}
  assert_within(report.batch_stats, BATCH_STATS_TOL, f'BatchNorm stats after {PARITY_STEPS} steps')
  assert report.params_overall.max_rel <= PARAMS_TOL, report.params_overall
