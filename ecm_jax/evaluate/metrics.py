"""Segmentation metrics: the paper's DSC, sensitivity, precision (eqs. 14-16), per slice/case, HD95.

Masks are binary (any dtype; nonzero is foreground). Everything runs on the host in numpy, except
`example_counts_jnp` / `confusion_counts_jnp`, which run inside the jitted eval step.

Confusion counts are integer arrays whose last axis is (TP, FP, FN, TN) (`COUNT_FIELDS`). Counts
add up, so the paper's metrics, computed "on CT slice", are eqs. (14)-(16) applied to the counts
pooled over all pixels of all test slices: the sum of the per-batch counts (`pool_counts`).

Empty masks, a deliberate choice (medpy 0.5.2 differs where noted):
- Both masks empty: Dice, sensitivity and precision are 1 (a correct "nothing here"), and the
  slice or case is counted in means, not dropped. medpy returns NaN for all three.
- One mask empty: Dice is 0. A ratio whose denominator is then zero (sensitivity for an empty
  ground truth, precision for an empty prediction) is undefined: NaN, reported as missing. medpy
  also returns NaN there.
- HD95 with an empty side (either or both): undefined, NaN, reported as missing, never 0. medpy
  raises RuntimeError.
- `summarise` skips missing values (NaN or None) and reports how many were missing beside the
  mean, std and median of the rest.
"""

from collections.abc import Iterable, Mapping, Sequence
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

COUNT_FIELDS = ('tp', 'fp', 'fn', 'tn')
RATIO_METRICS = ('dice', 'sensitivity', 'precision')
CASE_METRICS = RATIO_METRICS + ('hd95_mm',)


def _binary_pair(pred, label) -> tuple[np.ndarray, np.ndarray]:
  pred, label = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
  if pred.shape != label.shape:
    raise ValueError(f'pred shape {pred.shape} differs from label shape {label.shape}')
  return pred, label


def confusion_counts(pred, label, axis=None) -> np.ndarray:
  """(TP, FP, FN, TN) of binary masks summed over `axis` (None: every pixel), int64, shape (..., 4).

  For a stack of slices (N, H, W), `axis=(1, 2)` gives per-slice counts (N, 4), whose sum over the
  slices is the pooled count of the stack.
  """
  pred, label = _binary_pair(pred, label)
  counts = [np.count_nonzero(pred & label, axis=axis), np.count_nonzero(pred & ~label, axis=axis),
            np.count_nonzero(~pred & label, axis=axis), np.count_nonzero(~pred & ~label, axis=axis)]
  return np.stack(counts, axis=-1).astype(np.int64)


def example_counts_jnp(pred: jax.Array, label: jax.Array,
                       valid: jax.Array | None = None) -> jax.Array:
  """Per-example (TP, FP, FN, TN) of a batch of binary masks (B, ...): (B, 4) int32, jittable.

  `valid` (B,) bool marks real examples; the rows of the others (padding of the last batch) are 0,
  so they count nothing.
  """
  if pred.shape != label.shape:
    raise ValueError(f'pred shape {pred.shape} differs from label shape {label.shape}')
  pred, label = pred.astype(bool), label.astype(bool)
  axes = tuple(range(1, pred.ndim))
  counts = jnp.stack([jnp.sum(pred & label, axis=axes, dtype=jnp.int32),
                      jnp.sum(pred & ~label, axis=axes, dtype=jnp.int32),
                      jnp.sum(~pred & label, axis=axes, dtype=jnp.int32),
                      jnp.sum(~pred & ~label, axis=axes, dtype=jnp.int32)], axis=-1)
  if valid is None:
    return counts
  return jnp.where(valid.astype(bool)[:, None], counts, 0)


def confusion_counts_jnp(pred: jax.Array, label: jax.Array,
                         valid: jax.Array | None = None) -> jax.Array:
  """(TP, FP, FN, TN) of a whole batch (B, ...) as one (4,) int32 array, padded examples excluded.

  Add these over batches (or pass them to `pool_counts`) for the pooled counts of eqs. (14)-(16).
  """
  return example_counts_jnp(pred, label, valid).sum(axis=0)


def pool_counts(counts: Iterable) -> np.ndarray:
  """The pooled (4,) int64 counts: the sum of per-batch (4,) or per-example (B, 4) counts."""
  total = np.zeros(len(COUNT_FIELDS), np.int64)
  for c in counts:
    total += np.asarray(c, np.int64).reshape(-1, len(COUNT_FIELDS)).sum(axis=0)
  return total


def _ratio(numerator: np.ndarray, denominator: np.ndarray, both_empty: np.ndarray) -> np.ndarray:
  """numerator / denominator; 1 where both masks are empty, NaN where only the denominator is 0."""
  numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
  value = np.divide(numerator, denominator, out=np.full(denominator.shape, np.nan),
                    where=denominator > 0)
  return np.where(both_empty, 1.0, value)


def _fields(counts) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  c = np.asarray(counts, np.int64)
  if c.shape[-1:] != (len(COUNT_FIELDS),):
    raise ValueError(f'counts must have a last axis of 4 {COUNT_FIELDS}, got shape {c.shape}')
  tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
  return tp, fp, fn, (tp + fp + fn) == 0


def dice(counts) -> np.ndarray:
  """DSC = 2TP / (2TP + FP + FN), eq. (16), along the last axis; 1 if both masks are empty."""
  tp, fp, fn, both_empty = _fields(counts)
  return _ratio(2 * tp, 2 * tp + fp + fn, both_empty)


def sensitivity(counts) -> np.ndarray:
  """Sensitivity = TP / (TP + FN), eq. (15); 1 if both masks are empty, NaN if only the truth."""
  tp, _, fn, both_empty = _fields(counts)
  return _ratio(tp, tp + fn, both_empty)


def precision(counts) -> np.ndarray:
  """Precision = TP / (TP + FP), eq. (14); 1 if both masks are empty, NaN if only the prediction."""
  tp, fp, _, both_empty = _fields(counts)
  return _ratio(tp, tp + fp, both_empty)


def pooled_metrics(counts) -> dict[str, float]:
  """The paper's DSC, sensitivity, precision (eqs. 16, 15, 14) of counts summed over all rows."""
  total = pool_counts([counts])
  return {'dice': float(dice(total)), 'sensitivity': float(sensitivity(total)),
          'precision': float(precision(total))}


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != ndim or not all(s > 0 for s in spacing):
    raise ValueError(f'spacing {spacing} must give one positive size per axis of the {ndim}D masks')
  return spacing


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
  """The smallest box holding every foreground voxel of a non-empty `mask`."""
  box = []
  for axis in range(mask.ndim):
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
    box.append(slice(present[0], present[-1] + 1))
  return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
  """Foreground voxels with a background face-neighbour (erosion, connectivity-1 structure)."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure)


def hd95(pred, label, spacing: Sequence[float]) -> float:
  """95th percentile Hausdorff distance in the units of `spacing` (mm), 2D or 3D, anisotropic.

  As medpy's `hd95(pred, label, voxelspacing=spacing)`: the distances from each surface voxel of
  one mask to the nearest surface voxel of the other (Euclidean distance transform with
  `sampling=spacing`), both directions together, 95th percentile (linear interpolation).
  NaN when either mask is empty (missing, see the module docstring). The work is done on the
  bounding box of both masks: every surface voxel lies inside it, and the voxels just outside it
  are background either way, so the surfaces and distances are unchanged.
  """
  pred, label = _binary_pair(pred, label)
  spacing = _spacing(spacing, pred.ndim)
  if not pred.any() or not label.any():
    return math.nan
  box = _bounding_box(pred | label)
  pred_surface, label_surface = _surface(pred[box]), _surface(label[box])
  to_label = ndimage.distance_transform_edt(~label_surface, sampling=spacing)[pred_surface]
  to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[label_surface]
  return float(np.percentile(np.concatenate([to_label, to_pred]), 95))


def case_metrics(pred, label, spacing: Sequence[float]) -> dict[str, float]:
  """One case's DSC, sensitivity, precision (eqs. 16, 15, 14 on the whole volume) and HD95 in mm."""
  counts = confusion_counts(pred, label)
  return {'dice': float(dice(counts)), 'sensitivity': float(sensitivity(counts)),
          'precision': float(precision(counts)), 'hd95_mm': hd95(pred, label, spacing)}


def summarise_values(values: Iterable) -> dict:
  """Mean, std (population, ddof 0), median and `count` of the present values; `missing` NaN/None.

  With no value present, mean, std and median are NaN.
  """
  v = np.asarray([math.nan if x is None else x for x in values], np.float64)
  present = v[~np.isnan(v)]
  if present.size == 0:
    return {'mean': math.nan, 'std': math.nan, 'median': math.nan, 'count': 0,
            'missing': int(v.size)}
  return {'mean': float(present.mean()), 'std': float(present.std()),
          'median': float(np.median(present)), 'count': int(present.size),
          'missing': int(v.size - present.size)}


def summarise(rows: Sequence[Mapping], names: Sequence[str] = CASE_METRICS) -> dict[str, dict]:
  """Per metric name, `summarise_values` over the rows (e.g. one `case_metrics` dict per case)."""
  return {name: summarise_values(row[name] for row in rows) for name in names}


def foreground_slice_summary(slice_counts) -> dict:
  """Per-slice DSC, sensitivity, precision summarised over the slices with ground-truth foreground.

  `slice_counts` (N, 4) are per-slice counts (e.g. `example_counts_jnp` rows of real slices).
  Returns `{'num_slices': n_foreground, 'dice': {mean, std, median, count, missing}, ...}`.
  """
  counts = np.asarray(slice_counts, np.int64).reshape(-1, len(COUNT_FIELDS))
  foreground = counts[counts[:, 0] + counts[:, 2] > 0]
  values = {'dice': dice(foreground), 'sensitivity': sensitivity(foreground),
            'precision': precision(foreground)}
  return {'num_slices': len(foreground),
          **{name: summarise_values(v) for name, v in values.items()}}
