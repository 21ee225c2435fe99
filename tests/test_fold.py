"""EC fold: the deploy model (one 3x3 conv + bias per EC block) gives the same eval-mode output."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecm_jax.models.fold import fold_ec, fold_ec_block
from ecm_jax.models.layers import EnhancedConv
from ecm_jax.models.networks import build_model
from helpers import abstract_variables, random_input, randomized, run_fast, small_config


def assert_close_to_scale(actual, expected, relative=1e-4):
  """max |actual - expected| <= relative * max |expected|."""
  expected = np.asarray(expected)
  assert np.abs(np.asarray(actual) - expected).max() <= relative * np.abs(expected).max()


def test_fold_ec_block_equals_the_three_branches():
  x = random_input((2, 5, 6, 3))
  unfolded, folded = EnhancedConv(4), EnhancedConv(4, folded=True)
  shapes = jax.eval_shape(lambda x: unfolded.init(jax.random.key(0), x, train=False), x)
  variables = randomized(shapes, seed=0)
  params = fold_ec_block(variables['params'], variables['batch_stats'], epsilon=1e-5)
  assert jax.tree.map(jnp.shape, params) == {'conv_folded': {'kernel': (3, 3, 3, 4), 'bias': (4,)}}
  y, y_folded = run_fast(lambda v, p, x: (unfolded.apply(v, x, train=False),
                                          folded.apply({'params': p}, x, train=False)),
                         variables, params, x)
  assert_close_to_scale(y_folded, y)


def test_fold_ec_gives_the_same_eval_output_for_the_full_model():
  config = small_config()  # ec_cam_unet, every switch on
  model = build_model(config)
  x = random_input()
  # Random running statistics, far from the initial (0, 1), and random BN scales and biases.
  variables = randomized(abstract_variables(model), seed=0)
  deploy_config, deploy_variables = fold_ec(config, variables)
  assert deploy_config.ec_folded and not config.ec_folded
  deploy_model = build_model(deploy_config)
  outputs, deploy_outputs = run_fast(
      lambda v, d, x: (model.apply(v, x, train=False), deploy_model.apply(d, x, train=False)),
      variables, deploy_variables, x)
  for name in ('logits', 'side_logits'):
    assert_close_to_scale(deploy_outputs[name], outputs[name])

  # One conv with bias per EC block, no encoder statistics; everything else passed through.
  encoder = flax.traverse_util.flatten_dict(deploy_variables['params']['encoder'])
  assert {path[2:] for path in encoder} == {('conv_folded', 'kernel'), ('conv_folded', 'bias')}
  assert len(encoder) == 2 * 2 * len(config.features)
  assert 'encoder' not in deploy_variables['batch_stats']
  for collection in ('params', 'batch_stats'):
    rest = {k: v for k, v in variables[collection].items() if k != 'encoder'}
    deploy_rest = {k: v for k, v in deploy_variables[collection].items() if k != 'encoder'}
    jax.tree.map(np.testing.assert_array_equal, deploy_rest, rest)
  assert (jax.tree.structure(deploy_variables) ==
          jax.tree.structure(abstract_variables(deploy_model)))


def test_fold_ec_rejects_models_without_ec_or_already_folded():
  unet = small_config('unet')
  with pytest.raises(ValueError, match='ec=True'):
    fold_ec(unet, abstract_variables(build_model(unet)))
  config = small_config()
  variables = randomized(abstract_variables(build_model(config)), seed=0)
  deploy_config, deploy_variables = fold_ec(config, variables)
  with pytest.raises(ValueError, match='already True'):
    fold_ec(deploy_config, deploy_variables)
