"""Metrics against medpy.metric.binary, the empty-mask rules, pooling and the jitted counts."""

import math

import jax
import jax.numpy as jnp
from medpy.metric import binary as medpy_binary
import numpy as np
import pytest
from scipy import ndimage

from ecm_jax.evaluate import metrics

RTOL = 1e-12  # same arithmetic as medpy, up to summation order


def blobs(shape, seed, threshold=0.1):
  """Random smooth blobs (several components, ragged borders), foreground 10-35% of the pixels."""
  noise = np.random.default_rng(seed).normal(size=shape)
  return ndimage.gaussian_filter(noise, sigma=2.0) > threshold


def assert_matches_medpy(pred, label, spacing):
  counts = metrics.confusion_counts(pred, label)
  for ours, theirs in [(metrics.dice, medpy_binary.dc), (metrics.sensitivity, medpy_binary.recall),
                       (metrics.precision, medpy_binary.precision)]:
    np.testing.assert_allclose(ours(counts), theirs(pred, label), rtol=RTOL)
  np.testing.assert_allclose(metrics.hd95(pred, label, spacing),
                             medpy_binary.hd95(pred, label, voxelspacing=spacing), rtol=RTOL)


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('shape,spacing', [
    ((48, 40), (1.0, 1.0)),
    ((48, 40), (0.7, 1.9)),
    ((10, 24, 20), (1.0, 1.0, 1.0)),
    ((10, 24, 20), (2.5, 0.8, 0.6)),
])
def test_random_masks_match_medpy(shape, spacing, seed):
  assert_matches_medpy(blobs(shape, seed), blobs(shape, seed + 100), spacing)


def test_edge_cases_match_medpy():
  full = np.ones((20, 30), bool)
  one_pixel = np.zeros((20, 30), bool)
  one_pixel[7, 11] = True
  other_pixel = np.zeros((20, 30), bool)
  other_pixel[15, 2] = True
  at_corner = np.zeros((20, 30), bool)
  at_corner[:5, -6:] = True  # touches two borders of the array
  blob = blobs((20, 30), 7)
  small_blob = np.zeros((20, 30), bool)  # far from every border: the bounding-box crop is used
  small_blob[5:14, 8:19] = blobs((9, 11), 5, threshold=0.0)
  for pred, label in [(full, blob), (blob, full), (full, full), (one_pixel, one_pixel),
                      (one_pixel, other_pixel), (one_pixel, blob), (at_corner, blob),
                      (at_corner, full), (one_pixel, small_blob), (small_blob, one_pixel)]:
    assert_matches_medpy(pred, label, (0.75, 1.3))
  volume = np.zeros((6, 9, 8), bool)
  volume[3, 4, 5] = True
  assert_matches_medpy(volume, blobs((6, 9, 8), 3), (3.0, 0.5, 0.5))
  assert_matches_medpy(np.ones((6, 9, 8), bool), volume, (3.0, 0.5, 0.5))


def test_hd95_single_pixels_is_their_distance_in_mm():
  a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
  a[1, 1], b[4, 5] = True, True  # 3 rows x 2 mm, 4 columns x 0.5 mm apart
  assert metrics.hd95(a, b, (2.0, 0.5)) == pytest.approx(math.hypot(6.0, 2.0), rel=1e-12)


def test_both_empty_counts_as_perfect():
  empty = np.zeros((8, 8), bool)
  counts = metrics.confusion_counts(empty, empty)
  assert (metrics.dice(counts), metrics.sensitivity(counts), metrics.precision(counts)) == (1, 1, 1)
  with np.errstate(invalid='ignore'):
    assert math.isnan(medpy_binary.dc(empty, empty))  # medpy 0.5.2: NaN; we count the slice as 1
  case = metrics.case_metrics(empty, empty, (1.0, 1.0))
  assert case['dice'] == 1.0 and math.isnan(case['hd95_mm'])


def test_one_side_empty_dice_zero_undefined_ratios_and_hd95_missing():
  empty, blob = np.zeros((16, 16), bool), blobs((16, 16), 0)
  missed = metrics.case_metrics(empty, blob, (1.0, 1.0))  # nothing predicted
  assert missed['dice'] == 0.0 and missed['sensitivity'] == 0.0
  assert math.isnan(missed['precision']) and math.isnan(missed['hd95_mm'])
  spurious = metrics.case_metrics(blob, empty, (1.0, 1.0))  # prediction on an empty slice
  assert spurious['dice'] == 0.0 and spurious['precision'] == 0.0
  assert math.isnan(spurious['sensitivity']) and math.isnan(spurious['hd95_mm'])
  for pred, label in [(empty, blob), (blob, empty)]:
    with pytest.raises(RuntimeError):  # medpy 0.5.2 raises where we report missing
      medpy_binary.hd95(pred, label)


def test_summarise_skips_missing_and_counts_them():
  rows = [{'dice': 1.0, 'hd95_mm': 2.0}, {'dice': 0.5, 'hd95_mm': math.nan},
          {'dice': 0.0, 'hd95_mm': None}, {'dice': 0.5, 'hd95_mm': 4.0}]
  summary = metrics.summarise(rows, ('dice', 'hd95_mm'))
  assert summary['dice'] == {'mean': 0.5, 'std': pytest.approx(math.sqrt(0.125), rel=1e-12),
                             'median': 0.5, 'count': 4, 'missing': 0}
  assert summary['hd95_mm'] == {'mean': 3.0, 'std': 1.0, 'median': 3.0, 'count': 2, 'missing': 2}
  nothing = metrics.summarise_values([None, math.nan])
  assert nothing['count'] == 0 and nothing['missing'] == 2 and math.isnan(nothing['mean'])


def test_pooled_counts_are_the_sum_of_batch_counts():
  preds, labels = blobs((10, 24, 24), 1), blobs((10, 24, 24), 2)
  batch_counts = [metrics.confusion_counts(preds[i:i + 4], labels[i:i + 4])
                  for i in range(0, 10, 4)]
  pooled = metrics.pool_counts(batch_counts)
  np.testing.assert_array_equal(pooled, metrics.confusion_counts(preds, labels))
  assert pooled.sum() == preds.size
  per_slice = metrics.confusion_counts(preds, labels, axis=(1, 2))
  np.testing.assert_array_equal(metrics.pool_counts([per_slice]), pooled)
  flat = metrics.pooled_metrics(pooled)
  assert flat['dice'] == pytest.approx(medpy_binary.dc(preds, labels), rel=RTOL)
  assert flat['sensitivity'] == pytest.approx(medpy_binary.recall(preds, labels), rel=RTOL)
  assert flat['precision'] == pytest.approx(medpy_binary.precision(preds, labels), rel=RTOL)


def test_jnp_counts_equal_numpy_counts_and_respect_valid():
  preds, labels = blobs((3, 16, 16), 4), blobs((3, 16, 16), 5).astype(np.int32)
  valid = np.array([True, False, True])
  per_example = jax.jit(metrics.example_counts_jnp)(jnp.asarray(preds), jnp.asarray(labels),
                                                    jnp.asarray(valid))
  expected = metrics.confusion_counts(preds, labels, axis=(1, 2))
  expected[1] = 0
  np.testing.assert_array_equal(np.asarray(per_example), expected)
  batch = jax.jit(metrics.confusion_counts_jnp)(jnp.asarray(preds), jnp.asarray(labels),
                                                jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(batch), expected.sum(axis=0))
  unmasked = metrics.example_counts_jnp(jnp.asarray(preds), jnp.asarray(labels))
  np.testing.assert_array_equal(np.asarray(unmasked),
                                metrics.confusion_counts(preds, labels, axis=(1, 2)))


def test_foreground_slice_summary_averages_only_slices_with_ground_truth():
  preds, labels = blobs((5, 20, 20), 8), blobs((5, 20, 20), 9)
  labels[1] = False  # no ground truth: excluded even though the prediction is not empty
  summary = metrics.foreground_slice_summary(metrics.confusion_counts(preds, labels, axis=(1, 2)))
  kept = [0, 2, 3, 4]
  assert summary['num_slices'] == 4
  assert summary['dice']['mean'] == pytest.approx(
      np.mean([medpy_binary.dc(preds[i], labels[i]) for i in kept]), rel=RTOL)
  assert summary['sensitivity']['mean'] == pytest.approx(
      np.mean([medpy_binary.recall(preds[i], labels[i]) for i in kept]), rel=RTOL)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match=r'^pred shape \(4, 4\) differs from label shape \(4, 5\)$'):
    metrics.confusion_counts(np.zeros((4, 4)), np.zeros((4, 5)))
  with pytest.raises(ValueError, match=r'^spacing \(1\.0,\) must give one positive size per axis '
                                       r'of the 2D masks$'):
    metrics.hd95(np.ones((4, 4)), np.ones((4, 4)), (1.0,))
  with pytest.raises(ValueError, match=r'^counts must have a last axis of 4'):
    metrics.dice(np.zeros(3))
