"""The jitted data-parallel step: cross-replica BatchNorm equals the single-device global batch."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import default
from ecm_jax.models.networks import build_model
from ecm_jax.train import sharding, step, train_state


def tiny_config(variant='ec_cam_unet'):
  config = default.get_config(variant)
  config.model.features = (4, 8, 8, 16, 16)
  config.model.mus_channels = 4
  config.model.side_features = (8, 4, 4)
  config.model.cc_hidden = 2
  config.model.conv_impl = 'xla'  # compiles ~2x faster than CPU's 'gemm' (tests/test_ops.py covers it)
  config.train.learning_rate = 1e-3
  return config


def _batch(rng, n=4, size=32):
  image = rng.normal(size=(n, size, size, 1)).astype(np.float32)
  image[n // 2:] += 3.0  # the second device's half differs: per-shard BN statistics would differ
  label = (image[..., 0] > 0.5).astype(np.uint8)
  return {'image': image, 'label': label}


@pytest.fixture(scope='module')
def setup():
  if jax.device_count() < 2:  # tests/conftest.py simulates two on the CPU; a GPU host may have one
    pytest.skip(f'needs 2 devices, {jax.device_count()} {jax.default_backend()} device(s) present')
  config = tiny_config()
  model = build_model(config.model)
  tx = train_state.make_optimizer(config, total_steps=10)
  state = train_state.create_train_state(model, tx, 0)
  batch = _batch(np.random.default_rng(0))
  return config, model, tx, state, batch


def _run(devices, setup):
  """Gradients and one step on a 1D mesh over `devices` (batch sharded, state replicated)."""
  config, model, tx, state, batch = setup
  mesh = sharding.make_mesh(devices)
  state = sharding.replicate(jax.tree.map(jnp.copy, state), mesh)  # the step donates it
  sharded = sharding.shard_batch(batch, mesh)
  assert sharded['image'].sharding == NamedSharding(mesh, P('data'))
  grads_fn = jax.jit(lambda s, b: step.loss_and_gradients(s, b, model=model,
                                                          loss_config=config.loss))
  loss, _, grads, _ = grads_fn(state, sharded)
  train_step = sharding.jit_train_step(mesh, model=model, tx=tx, loss_config=config.loss,
                                       schedule=train_state.learning_rate_schedule(config, 10))
  new_state, step_metrics = train_step(state, sharded)
  return jax.device_get((loss, grads, new_state, step_metrics))


@pytest.fixture(scope='module')
def runs(setup):
  """(loss, grads, state after one step, step metrics) on 1 and on 2 devices."""
  return {n: _run(jax.devices()[:n], setup) for n in (1, 2)}


def test_two_device_step_equals_single_device_global_batch(setup, runs):
  """Cross-replica BatchNorm: 2 devices give the 1-device global-batch step (atol 1e-5)."""
  config, state0 = setup[0], setup[3]
  (loss1, grads1, state1, m1), (loss2, grads2, state2, m2) = runs[1], runs[2]
  np.testing.assert_allclose(loss2, loss1, atol=1e-5)
  np.testing.assert_allclose(m2['loss'], m1['loss'], atol=1e-5)
  for name, a, b in [('grads', grads1, grads2),
                     ('batch_stats', state1.batch_stats, state2.batch_stats)]:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(y, x, atol=1e-5, err_msg=f'{name} {jax.tree_util.keystr(path)}')
  # Parameters after the step where Adam's input g + wd * p (L2 added before the moments) is well
  # above its eps = 1e-8: the first update is lr * g / (|g| + eps), so where |g| is near eps a
  # rounding-level gradient difference (within the 1e-5 above) moves it by up to lr; there only
  # that bound holds.
  for (path, g), p0, p1, p2 in zip(jax.tree_util.tree_leaves_with_path(grads1),
                                   jax.tree.leaves(state0.params), jax.tree.leaves(state1.params),
                                   jax.tree.leaves(state2.params)):
    clear = np.abs(g + config.train.weight_decay * np.asarray(p0)) > 1e-6
    np.testing.assert_allclose(p2[clear], p1[clear], atol=1e-5, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(p2, p1, atol=1e-3 + 1e-6, err_msg=jax.tree_util.keystr(path))
  assert int(state2.step) == 1


def test_step_updates_params_and_batch_stats(setup, runs):
  state0 = setup[3]
  _, _, state1, m1 = runs[1]
  differs = lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b)))
  assert all(jax.tree.leaves(jax.tree.map(differs, state0.params, state1.params)))
  assert all(jax.tree.leaves(jax.tree.map(differs, state0.batch_stats, state1.batch_stats)))
  assert np.isfinite(m1['grad_norm']) and m1['grad_norm'] > 0
  np.testing.assert_allclose(m1['lr'], 1e-3, rtol=1e-6)  # lr of the first step: the peak


def test_batch_not_divisible_by_devices_is_a_clear_error():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match=r'config.train.batch_size=3 is not divisible by the 2 '
                                       r'devices of the mesh; use a multiple of 2'):
    sharding.check_batch_divisible(3, mesh)


def test_eval_step_counts_exclude_padding(setup):
  config, model, tx, state, batch = setup
  mesh = sharding.make_mesh()
  state = sharding.replicate(jax.tree.map(jnp.copy, state), mesh)
  eval_step = sharding.jit_eval_step(mesh, model=model)
  full = dict(batch, valid=np.array([True, True, True, True]))
  half = dict(batch, valid=np.array([True, True, False, False]))
  first_two = {k: v[:2] for k, v in full.items()}
  c_full = np.asarray(eval_step(state, sharding.shard_batch(full, mesh)))
  c_half = np.asarray(eval_step(state, sharding.shard_batch(half, mesh)))
  c_two = np.asarray(eval_step(state, sharding.shard_batch(first_two, mesh)))
  np.testing.assert_array_equal(c_half, c_two)
  assert c_full.sum() > c_half.sum()
  pred = np.asarray(step.predict(state, jnp.asarray(batch['image'][:2]), model=model))
  assert pred.shape == (2, 32, 32) and set(np.unique(pred)) <= {0, 1}
