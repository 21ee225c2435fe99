"""Losses (eqs. 11-13, 17) against direct NumPy formulas."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ecm_jax.train import losses


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _loss_config(**kw):
  c = ml_collections.ConfigDict({'alpha': None, 'main': 'dice', 'dice_smooth': 1.0})
  c.update(kw)
  return c


@pytest.fixture
def binary_batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 8, 8, 1)).astype(np.float32) * 3
  labels = (rng.random((3, 8, 8)) < 0.3).astype(np.uint8)
  return logits, labels


def test_soft_dice_is_batch_dice(binary_batch):
  logits, labels = binary_batch
  p = _sigmoid(logits[..., 0].astype(np.float64))
  expected = 1 - (2 * np.sum(p * labels) + 1.0) / (np.sum(p) + np.sum(labels) + 1.0)
  got = losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels), smooth=1.0)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_soft_dice_perfect_prediction_is_zero():
  labels = np.zeros((2, 4, 4), np.uint8)
  labels[:, 1:3, 1:3] = 1
  logits = np.where(labels[..., None] == 1, 50.0, -50.0).astype(np.float32)
  assert float(losses.soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels))) < 1e-6


def test_bce_matches_formula(binary_batch):
  logits, labels = binary_batch
  x = logits[..., 0].astype(np.float64)
  p = _sigmoid(x)
  expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  got = losses.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_multiclass_dice_and_cross_entropy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 6, 6)).astype(np.uint8)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  onehot = np.eye(3)[labels]
  dice = [1 - (2 * np.sum(p[..., k] * onehot[..., k]) + 1) /
          (np.sum(p[..., k]) + np.sum(onehot[..., k]) + 1) for k in (1, 2)]
  np.testing.assert_allclose(float(losses.soft_dice_loss(logits, labels)), np.mean(dice), rtol=1e-5)
  ce = -np.mean(np.log(np.take_along_axis(p, labels[..., None].astype(int), -1)))
  np.testing.assert_allclose(float(losses.cross_entropy_loss(logits, labels)), ce, rtol=1e-5)


def test_hybrid_loss_sum_and_alpha(binary_batch):
  logits, labels = binary_batch
  side = logits[::-1].copy()
  outputs = {'logits': jnp.asarray(logits), 'side_logits': jnp.asarray(side)}
  dice = float(losses.soft_dice_loss(logits, labels))
  bce = float(losses.cross_entropy_loss(side, labels))
  loss, terms = losses.segmentation_loss(outputs, labels, _loss_config())
  np.testing.assert_allclose(float(loss), dice + bce, rtol=1e-6)
  np.testing.assert_allclose([float(terms['loss_main']), float(terms['loss_side'])], [dice, bce],
                             rtol=1e-6)
  loss, _ = losses.segmentation_loss(outputs, labels, _loss_config(alpha=0.3))
  np.testing.assert_allclose(float(loss), 0.3 * dice + 0.7 * bce, rtol=1e-6)


@pytest.mark.parametrize('main', ['dice', 'bce', 'dice+bce'])
def test_main_loss_without_side_output(binary_batch, main):
  logits, labels = binary_batch
  dice = float(losses.soft_dice_loss(logits, labels))
  bce = float(losses.cross_entropy_loss(logits, labels))
  expected = {'dice': dice, 'bce': bce, 'dice+bce': dice + bce}[main]
  loss, terms = losses.segmentation_loss({'logits': jnp.asarray(logits)}, labels,
                                         _loss_config(main=main))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert set(terms) == {'loss_main'}


def test_unknown_main_loss_is_named():
  with pytest.raises(ValueError, match=r"config.loss.main must be one of .* got 'focal'"):
    losses.segmentation_loss({'logits': jnp.zeros((1, 2, 2, 1))}, jnp.zeros((1, 2, 2), jnp.uint8),
                             _loss_config(main='focal'))
