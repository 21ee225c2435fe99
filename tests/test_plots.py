"""Pictures: sizes, contours where the mask boundaries are, heat-map upsampling, slice ranking."""

import json

import jax
import jax.numpy as jnp
from matplotlib import image as mpl_image
import numpy as np
import pytest

from ecm_jax.evaluate import plots


def read_png(path):
  """(height, width, 3) RGB in [0, 1] of a PNG that exists and is not empty."""
  assert path.stat().st_size > 0
  return mpl_image.imread(path)[..., :3]


def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


def square(shape, top, left, size):
  mask = np.zeros(shape, bool)
  mask[top:top + size, left:left + size] = True
  return mask


def test_learning_curves_writes_png_of_the_stated_size(tmp_path):
  records = []
  for step in range(10, 201, 10):
    records.append({'step': step, 'train/loss': 1.0 / step, 'train/lr': 1e-5})
    if step % 50 == 0:
      records.append({'step': step, 'val/dice': step / 250.0, 'val/precision': 0.5})
  out = plots.learning_curves(write_jsonl(tmp_path / 'metrics.jsonl', records), tmp_path / 'lc.png',
                              subtitle='synthetic demo data')
  assert out == tmp_path / 'lc.png'
  assert read_png(out).shape == (400, 1000, 3)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['lc.png', 'metrics.jsonl']  # no temp file


def test_learning_curves_with_only_train_lines(tmp_path):
  records = [{'step': s, 'train/loss': 0.5, 'train/lr': 1e-5} for s in (10, 20, 30)]
  out = plots.learning_curves(write_jsonl(tmp_path / 'metrics.jsonl', records),
                              tmp_path / 'sub' / 'lc.png')
  assert read_png(out).shape == (400, 1000, 3)


def test_learning_curves_bad_logs_raise_clear_errors(tmp_path):
  only_val = write_jsonl(tmp_path / 'val.jsonl', [{'step': 10, 'val/dice': 0.5}])
  with pytest.raises(ValueError, match=f'^{only_val}: no "train/loss" entries to plot$'):
    plots.learning_curves(only_val, tmp_path / 'a.png')
  broken = tmp_path / 'broken.jsonl'
  broken.write_text('{"step": 10, "train/loss": 0.5}\n{"step": 20, "tra\n')
  with pytest.raises(ValueError, match=f'^{broken}:2: not a JSON object '):
    plots.learning_curves(broken, tmp_path / 'b.png')
  assert not (tmp_path / 'a.png').exists() and not (tmp_path / 'b.png').exists()


def test_ema_is_debiased_and_weight_zero_is_identity():
  np.testing.assert_allclose(plots.ema([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0], rtol=1e-12)
  np.testing.assert_array_equal(plots.ema([1.0, 5.0, 3.0], 0.0), [1.0, 5.0, 3.0])
  np.testing.assert_allclose(plots.ema([0.0, 1.0], 0.5), [0.0, 0.5 / 0.75], rtol=1e-12)


def image_extent(rgb):
  """Rows and columns of the PNG covered by the (black) slice: those more than half dark."""
  dark = rgb.max(axis=-1) < 0.1
  rows, cols = np.flatnonzero(dark.mean(axis=1) > 0.5), np.flatnonzero(dark.mean(axis=0) > 0.5)
  return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def drawn_in_data_coordinates(rgb, extent, size, channel_test):
  """Pixel-centre data coordinates (row, col) of the slice area's pixels passing `channel_test`."""
  top, bottom, left, right = extent
  area = rgb[top:bottom, left:right]
  rows, cols = np.nonzero(channel_test(area))
  scale_r, scale_c = size / (bottom - top), size / (right - left)
  return (rows + 0.5) * scale_r - 0.5, (cols + 0.5) * scale_c - 0.5


def is_green(rgb):
  return (rgb[..., 1] > 0.4) & (rgb[..., 0] < 0.25) & (rgb[..., 2] < 0.25)


def is_magenta(rgb):
  return (rgb[..., 0] > 0.4) & (rgb[..., 2] > 0.4) & (rgb[..., 1] < 0.25)


def assert_on_square_boundary(rows, cols, top, left, size, tolerance):
  """Every point lies within `tolerance` pixels of the square's outline, and they span all of it."""
  lo_r, hi_r, lo_c, hi_c = top - 0.5, top + size - 0.5, left - 0.5, left + size - 0.5
  to_edge = np.minimum.reduce([np.abs(rows - lo_r), np.abs(rows - hi_r),
                               np.abs(cols - lo_c), np.abs(cols - hi_c)])
  inside = (rows > lo_r - tolerance) & (rows < hi_r + tolerance) & \
      (cols > lo_c - tolerance) & (cols < hi_c + tolerance)
  assert len(rows) > 0 and inside.all() and (to_edge < tolerance).all()
  extremes = [rows.min(), rows.max(), cols.min(), cols.max()]
  np.testing.assert_allclose(extremes, [lo_r, hi_r, lo_c, hi_c], atol=tolerance)


def test_overlay_draws_both_contours_on_the_mask_boundaries(tmp_path):
  size = 32
  label, pred = square((size, size), 5, 6, 10), square((size, size), 18, 15, 9)
  out = plots.overlay_grid([np.zeros((size, size))], [label], [pred], tmp_path / 'overlay.png',
                           ['case 1 slice 2'], 'best', subtitle='synthetic demo data')
  rgb = read_png(out)
  assert rgb.shape == (410, 300, 3)  # one column of 300 pixels, one row of 330 + 80
  extent = image_extent(rgb)
  assert extent[1] - extent[0] == pytest.approx(extent[3] - extent[2], abs=2)  # square pixels
  tolerance = 0.6  # data pixels; the 1.5 pt line is about 0.25 data pixels wide here
  assert_on_square_boundary(*drawn_in_data_coordinates(rgb, extent, size, is_green), 5, 6, 10,
                            tolerance)
  assert_on_square_boundary(*drawn_in_data_coordinates(rgb, extent, size, is_magenta), 18, 15, 9,
                            tolerance)
  legend = rgb[extent[1]:]  # below the slice
  assert is_green(legend).any() and is_magenta(legend).any()


def test_overlay_grid_size_and_shape_errors(tmp_path):
  images = [np.random.default_rng(i).random((32, 32)) for i in range(5)]
  masks = [square((32, 32), 4 + i, 6, 10) for i in range(5)]
  out = plots.overlay_grid(images, masks, masks[::-1], tmp_path / 'grid.png',
                           [f'slice {i}' for i in range(5)], 'best and worst', columns=3)
  assert read_png(out).shape == (740, 900, 3)  # 3 columns x 300, 2 rows x 330 + 80
  with pytest.raises(ValueError, match=r'^image and masks must be 2D of one shape, got \(32, 32\), '
                                       r'\(32, 32\), \(16, 16\)$'):
    plots.overlay_grid(images[:1], masks[:1], [np.zeros((16, 16))], tmp_path / 'bad.png', ['bad'],
                       'bad')
  with pytest.raises(ValueError, match=r'^need as many images, labels, preds and panel_titles'):
    plots.overlay_grid(images, masks, masks, tmp_path / 'bad.png', ['one'], 'bad')
  assert not (tmp_path / 'bad.png').exists()


def test_best_and_worst_slices_rank_foreground_slices_by_dice():
  # Dice per slice: 0.5, (no ground truth), 1.0, 0.0, 0.8, 0.5
  counts = np.array([[1, 1, 1, 0], [0, 5, 0, 0], [4, 0, 0, 0], [0, 2, 3, 0], [4, 1, 1, 0],
                     [2, 2, 2, 0]])
  best, worst = plots.best_and_worst_slices(counts, 2)
  np.testing.assert_array_equal(best, [2, 4])
  np.testing.assert_array_equal(worst, [3, 5])
  best, worst = plots.best_and_worst_slices(counts, 3)  # 5 candidates: worst gets the other 2
  np.testing.assert_array_equal(best, [2, 4, 0])
  np.testing.assert_array_equal(worst, [3, 5])


def test_activation_heatmap_upsamples_bilinearly_to_unit_range():
  features = np.random.default_rng(0).normal(size=(8, 6, 5))
  heat = plots.activation_heatmap(features, (64, 48))
  assert heat.shape == (64, 48)
  assert heat.min() == 0.0 and heat.max() == 1.0
  channel_mean = np.abs(features).mean(axis=-1)
  reference = np.asarray(jax.image.resize(jnp.asarray(channel_mean), (64, 48), 'bilinear'),
                         np.float64)
  reference = (reference - reference.min()) / (reference.max() - reference.min())
  np.testing.assert_allclose(heat, reference, atol=1e-5)  # jax computes in float32
  np.testing.assert_allclose(plots.activation_heatmap(channel_mean, (64, 48)), heat, rtol=1e-12)
  assert not plots.activation_heatmap(np.ones((4, 4)), (16, 16)).any()  # constant map -> zeros
  with pytest.raises(ValueError,
                     match=r'^activation must be \(h, w\) or \(h, w, C\), got shape \(4,\)$'):
    plots.activation_heatmap(np.ones(4), (16, 16))


def test_bilinear_resize_uses_half_pixel_centres_and_clamps_at_the_edges():
  x = np.arange(12, dtype=np.float64).reshape(3, 4)  # x[r, c] = 4 r + c, reproduced exactly
  up = plots.bilinear_resize(x, (6, 8))
  source = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, None)  # output pixel -> source coordinate
  np.testing.assert_allclose(up, 4 * np.minimum(source[:6], 2)[:, None] + np.minimum(source, 3),
                             rtol=1e-12)
  np.testing.assert_allclose(plots.bilinear_resize(x, (3, 4)), x, rtol=1e-12)


def test_attention_map_writes_png_of_the_stated_size(tmp_path):
  image = np.random.default_rng(1).random((40, 40))
  out = plots.attention_map(image, np.random.default_rng(2).random((5, 5, 3)), tmp_path / 'att.png',
                            'CoA activation', label=square((40, 40), 10, 10, 12),
                            subtitle='synthetic demo data')
  assert read_png(out).shape == (620, 700, 3)
