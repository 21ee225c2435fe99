"""Pure preprocessing: CT window, MRI z-score, label mapping, resizing, slice stacks, geometry."""

import itertools
import json

import nibabel as nib
import numpy as np
import pytest

from configs import default
from ecm_jax.data import DataError, preprocess
from ecm_jax.data import meta as meta_lib


def _config(**overrides):
  config = default.get_config().data
  config.update(overrides)
  return config


def test_window_ct_clips_and_scales_to_unit_range():
  hu = np.array([-1000.0, -79.0, 112.5, 304.0, 3000.0])
  out = preprocess.window_ct(hu, (-79.0, 304.0))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_zscore_mri_clips_outliers_then_standardises():
  volume = np.random.default_rng(0).normal(100.0, 20.0, (8, 16, 16))
  volume[0, 0, 0] = 1e6  # a hot voxel must not dominate the scale
  out = preprocess.zscore_mri(volume, (0.5, 99.5), 'v.nii.gz')
  assert out.dtype == np.float32
  assert abs(out.mean()) < 1e-5 and abs(out.std() - 1.0) < 1e-5
  assert out.max() < 4.0  # the outlier was clipped to the 99.5th percentile


def test_zscore_mri_rejects_a_constant_volume():
  with pytest.raises(DataError, match=r'^v\.nii\.gz: image is constant'):
    preprocess.zscore_mri(np.ones((4, 4, 4)), (0.5, 99.5), 'v.nii.gz')


def test_map_labels_merges_foreground_to_one():
  label = np.array([[0, 1, 2], [2, 1, 0]], np.int16)
  out = preprocess.map_labels(label, _config(foreground_labels=(1, 2)), 'l.nii.gz')
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, [[0, 1, 1], [1, 1, 0]])


def test_map_labels_separate_classes_follow_the_order_of_foreground_labels():
  label = np.array([0, 1, 2, 3], np.uint8)
  config = _config(foreground_labels=(3, 1), merge_foreground=False, other_labels='background')
  np.testing.assert_array_equal(preprocess.map_labels(label, config, 'l'), [0, 2, 0, 1])


def test_map_labels_other_values_are_an_error_or_background():
  label = np.array([0, 1, 2, 3, 4, 4], np.uint8)
  config = _config(foreground_labels=(2, 3))
  with pytest.raises(DataError) as error:
    preprocess.map_labels(label, config, 'chaos.nii.gz')
  assert str(error.value) == (
      'chaos.nii.gz: label values [1, 4] are neither background (0) nor in '
      'data.foreground_labels (2, 3); set data.other_labels="background" to map them to 0')
  config.other_labels = 'background'
  np.testing.assert_array_equal(preprocess.map_labels(label, config, 'x'), [0, 0, 1, 1, 0, 0])


def test_map_labels_accepts_integral_floats_and_rejects_fractions():
  config = _config(foreground_labels=(1,))
  np.testing.assert_array_equal(
      preprocess.map_labels(np.array([0.0, 1.0]), config, 'l'), [0, 1])
  with pytest.raises(DataError, match=r'^l\.nii: label values are not integers$'):
    preprocess.map_labels(np.array([0.0, 0.5]), config, 'l.nii')


def test_resize_linear_is_identity_at_the_same_size():
  stack = np.random.default_rng(1).random((3, 20, 28)).astype(np.float32)
  np.testing.assert_array_equal(preprocess.resize_linear(stack, (20, 28)), stack)


@pytest.mark.parametrize('size', [(7, 45), (32, 32), (64, 16)])
def test_resize_linear_keeps_constants_constant(size):
  out = preprocess.resize_linear(np.full((2, 20, 28), 0.7, np.float32), size)
  assert out.shape == (2, *size) and out.dtype == np.float32
  np.testing.assert_allclose(out, 0.7, rtol=1e-6)


def test_resize_linear_upsampling_a_ramp_is_linear_inside():
  ramp = np.broadcast_to(np.arange(10, dtype=np.float32), (1, 10, 10))
  out = preprocess.resize_linear(ramp, (10, 20))
  # pixel-centre alignment: output column o samples input position (o + 0.5) / 2 - 0.5
  inside = np.arange(1, 19)
  expected = np.broadcast_to((inside + 0.5) / 2 - 0.5, (10, 18))
  np.testing.assert_allclose(out[0, :, inside].T, expected, atol=1e-6)


def test_resize_linear_antialiases_when_shrinking():
  checkerboard = (np.indices((16, 16)).sum(axis=0) % 2).astype(np.float32)[None]
  out = preprocess.resize_linear(checkerboard, (8, 8))
  np.testing.assert_allclose(out[0, 1:-1, 1:-1], 0.5, atol=1e-6)


@pytest.mark.parametrize('shape,size', [((37, 53), 64), ((64, 64), 64), ((101, 122), 128),
                                        ((5, 3), 16)])
def test_resize_nearest_up_then_down_is_exact(shape, size):
  label = np.random.default_rng(2).integers(0, 3, (4, *shape)).astype(np.uint8)
  up = preprocess.resize_nearest(label, (size, size))
  assert up.shape == (4, size, size) and up.dtype == np.uint8
  np.testing.assert_array_equal(preprocess.resize_nearest(up, shape), label)


def _orientations():
  """All 48 axis permutations and flips, as voxel-to-world affines with distinct spacings."""
  for permutation in itertools.permutations(range(3)):
    for flips in itertools.product((1, -1), repeat=3):
      affine = np.eye(4)
      affine[:3, :3] = 0
      for axis, (world, flip) in enumerate(zip(permutation, flips)):
        affine[world, axis] = flip * (axis + 1.0)
      affine[:3, 3] = (5.0, -7.0, 11.0)
      yield affine


def test_stacks_follow_closest_canonical_and_invert_exactly_for_every_orientation():
  volume = np.random.default_rng(3).random((4, 5, 6)).astype(np.float32)
  for affine in _orientations():
    image = nib.Nifti1Image(volume, affine)
    meta = meta_lib.describe(image, case_id='c', image_path='i', label_path=None, reorient=True,
                             slice_axis=2, image_size=16, foreground_labels=(1,))
    stack = meta_lib.to_stack(volume, meta)
    canonical = np.asanyarray(nib.as_closest_canonical(image).dataobj)
    np.testing.assert_array_equal(stack, np.moveaxis(canonical, 2, 0))
    assert meta.num_slices == canonical.shape[2]
    assert meta.in_plane_shape == canonical.shape[:2]
    assert meta.stack_spacing == tuple(float(z) for z in np.array(
        nib.as_closest_canonical(image).header.get_zooms())[[2, 0, 1]])
    np.testing.assert_array_equal(meta_lib.from_stack(stack, meta), volume)


def test_kits_convention_slices_axis_0_as_stored():
  volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  affine = np.array([[0, 0, -1.5, 0], [0, -1.5, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])
  meta = meta_lib.describe(nib.Nifti1Image(volume, affine), case_id='c', image_path='i',
                           label_path='l', reorient=False, slice_axis=0, image_size=16,
                           foreground_labels=(1, 2))
  np.testing.assert_array_equal(meta_lib.to_stack(volume, meta), volume)
  assert (meta.num_slices, meta.in_plane_shape, meta.stack_spacing) == (2, (3, 4), (3.0, 1.5, 1.5))
  assert meta_lib.CaseMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta
