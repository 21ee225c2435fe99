"""Pure array preprocessing: intensity normalisation, label mapping and slice resizing (Section IV-A).

Resizing uses pixel-centre alignment: output pixel `o` of `n_out` samples input position
`(o + 0.5) * n_in / n_out - 0.5`. Nearest-neighbour resizing up to a size at least as large and back
down is then the identity, which is what makes writing predictions back exact whenever
`image_size` >= the original in-plane size.
"""

import numpy as np

from ecm_jax.errors import DataError


def window_ct(volume: np.ndarray, window) -> np.ndarray:
  """Clip HU to [low, high] and scale linearly to [0, 1]."""
  low, high = window
  return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def zscore_mri(volume: np.ndarray, percentiles, path) -> np.ndarray:
  """Robust per-volume z-score: clip to the given percentiles, then zero mean and unit variance."""
  low, high = np.percentile(volume, percentiles)
  clipped = np.clip(volume, low, high).astype(np.float32)
  std = clipped.std(dtype=np.float64)
  if std == 0:
    raise DataError(f'{path}: image is constant between the {percentiles} percentiles; '
                    'cannot normalise it')
  return ((clipped - clipped.mean(dtype=np.float64)) / std).astype(np.float32)


def normalize(volume: np.ndarray, config, path) -> np.ndarray:
  """Intensity normalisation chosen by `config.modality` (config = `config.data`)."""
  if config.modality == 'ct':
    return window_ct(volume, config.window)
  return zscore_mri(volume, config.mri_percentiles, path)


def map_labels(label: np.ndarray, config, path) -> np.ndarray:
  """Label values -> uint8 classes: background 0, foreground_labels -> 1 (merged) or 1..K.

  Values that are neither 0 nor in `foreground_labels` are an error, or background when
  `config.other_labels == 'background'` (e.g. the liver and spleen of CHAOS when the target is the
  kidneys).
  """
  if label.dtype.kind == 'f' and not np.array_equal(label, np.round(label)):
    raise DataError(f'{path}: label values are not integers')
  foreground = tuple(config.foreground_labels)
  classes = np.zeros(label.shape, np.uint8)
  for index, value in enumerate(foreground):
    classes[label == value] = 1 if config.merge_foreground else index + 1
  if config.other_labels == 'error':
    other = (label != 0) & (classes == 0)
    if other.any():
      raise DataError(
          f'{path}: label values {np.unique(label[other]).tolist()} are neither background (0) nor '
          f'in data.foreground_labels {foreground}; set data.other_labels="background" to map '
          'them to 0')
  return classes


def resize_linear(stack: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of slices (N, H, W) -> (N, *size) float32; antialiased when shrinking."""
  rows = _linear_weights(stack.shape[1], size[0])
  cols = _linear_weights(stack.shape[2], size[1])
  across = np.tensordot(stack.astype(np.float32, copy=False), cols, axes=([2], [1]))  # (N, H, W')
  return np.ascontiguousarray(np.tensordot(across, rows, axes=([1], [1])).transpose(0, 2, 1))


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) interpolation matrix: triangle kernel widened by the shrink factor."""
  scale = n_in / n_out
  centres = (np.arange(n_out) + 0.5) * scale - 0.5
  distance = np.abs(np.arange(n_in)[None, :] - centres[:, None]) / max(scale, 1.0)
  weights = np.maximum(0.0, 1.0 - distance)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_nearest(stack: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of slices (N, H, W) -> (N, *size), same dtype."""
  rows = _nearest_index(stack.shape[1], size[0])
  cols = _nearest_index(stack.shape[2], size[1])
  return stack[:, rows][:, :, cols]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  # floor((o + 0.5) * n_in / n_out) in integers, so no float rounding can shift a boundary.
  return (2 * np.arange(n_out) + 1) * n_in // (2 * n_out)


def image_slices(stack: np.ndarray, config, path) -> np.ndarray:
  """Raw image slices (N, H, W) -> normalised, resized (N, S, S, 1) float32."""
  size = (config.image_size, config.image_size)
  return resize_linear(normalize(stack, config, path), size)[..., None]


def label_slices(stack: np.ndarray, config, path) -> np.ndarray:
  """Raw label slices (N, H, W) -> mapped, resized (N, S, S) uint8."""
  return resize_nearest(map_labels(stack, config, path), (config.image_size, config.image_size))
