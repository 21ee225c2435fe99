"""The paper's augmentation: draw statistics, image/mask alignment, binary masks, blur on image."""

import numpy as np
from scipy import ndimage

from ecm_jax.data import augment

PAPER = dict(flip_prob=0.5, rotate_degrees=10.0, blur_prob=0.5, blur_sigma=(0.5, 1.5))


def _pattern(size=48):
  """An asymmetric shape (an L and an off-centre square) as an image and as its mask."""
  mask = np.zeros((size, size), np.uint8)
  mask[8:30, 10:16] = 1
  mask[24:30, 10:28] = 1
  mask[34:42, 30:38] = 1
  return mask[..., None].astype(np.float32), mask


def test_draw_frequencies_and_ranges_over_many_draws():
  rng = np.random.default_rng(0)
  draws = [augment.draw(rng, **PAPER) for _ in range(4000)]
  flips = np.array([d.flip for d in draws])
  angles = np.array([d.angle for d in draws])
  sigmas = np.array([d.blur_sigma for d in draws])
  assert abs(flips.mean() - 0.5) < 0.03  # binomial std 0.008
  assert angles.min() >= -10.0 and angles.max() <= 10.0
  assert angles.min() < -9.9 and angles.max() > 9.9  # the whole range is used
  assert abs(angles.mean()) < 0.4 and abs(angles.std() - 20 / np.sqrt(12)) < 0.2  # uniform
  blurred = sigmas > 0
  assert abs(blurred.mean() - 0.5) < 0.03
  assert sigmas[blurred].min() >= 0.5 and sigmas[blurred].max() <= 1.5


def test_draw_consumes_the_same_randomness_whatever_is_enabled():
  rng_on, rng_off = np.random.default_rng(1), np.random.default_rng(1)
  augment.draw(rng_on, **PAPER)
  augment.draw(rng_off, flip_prob=0.0, rotate_degrees=0.0, blur_prob=0.0, blur_sigma=(1.0, 1.0))
  assert rng_on.random() == rng_off.random()


def test_flip_mirrors_columns_of_image_and_mask_exactly():
  image, mask = _pattern()
  out_image, out_mask = augment.apply(image, mask, augment.Transform(True, 0.0, 0.0))
  np.testing.assert_array_equal(out_mask, mask[:, ::-1])
  np.testing.assert_array_equal(out_image, image[:, ::-1])


def test_rotation_by_90_degrees_matches_rot90_for_image_and_mask():
  image, mask = _pattern()
  out_image, out_mask = augment.apply(image, mask, augment.Transform(False, 90.0, 0.0))
  np.testing.assert_array_equal(out_mask, np.rot90(mask))
  np.testing.assert_allclose(out_image, np.rot90(image), atol=1e-5)


def test_random_transforms_keep_image_and_mask_aligned_and_binary():
  image, mask = _pattern()
  rng = np.random.default_rng(2)
  for _ in range(60):
    transform = augment.draw(rng, **{**PAPER, 'blur_prob': 0.0})
    out_image, out_mask = augment.apply(image, mask, transform)
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 1}
    shape = out_image[..., 0] > 0.5
    overlap = (shape & (out_mask == 1)).sum() / (shape | (out_mask == 1)).sum()
    assert overlap > 0.9, transform  # bilinear vs nearest differ only along the outline
    centroid_gap = np.subtract(ndimage.center_of_mass(shape), ndimage.center_of_mass(out_mask))
    assert np.abs(centroid_gap).max() < 0.5, transform


def test_masks_stay_binary_with_every_augmentation_on():
  image, mask = _pattern()
  rng = np.random.default_rng(3)
  for _ in range(30):
    _, out_mask = augment.apply(image, mask, augment.draw(rng, **PAPER))
    assert set(np.unique(out_mask)) <= {0, 1}


def test_blur_touches_only_the_image():
  image, mask = _pattern()
  out_image, out_mask = augment.apply(image, mask, augment.Transform(False, 0.0, 1.0))
  np.testing.assert_array_equal(out_mask, mask)
  expected = ndimage.gaussian_filter(image, (1.0, 1.0, 0), mode='nearest')
  np.testing.assert_allclose(out_image, expected)
  assert np.abs(out_image - image).max() > 0.1
