"""DICOM CT series -> (volume, RAS affine) in the NIfTI reader's convention (pydicom).

A series is one folder of single-slice `*.dcm` files (the TCIA download layout). It is read into
what nibabel gives for the series' NIfTI conversion, so both take the same path through
`readers`, the cache and `write_prediction`:
- `volume[i, j, k]` is column i, row j of slice k (DICOM's pixel array transposed), in HU
  (RescaleSlope and RescaleIntercept applied), float32;
- slices are sorted by their position along the slice normal (row cosine x column cosine, dotted
  with ImagePositionPatient), never by file name or InstanceNumber;
- `affine` maps (i, j, k, 1) to RAS mm: columns i and j are ImageOrientationPatient's row and
  column cosines times the matching PixelSpacing, column k the slice normal times the spacing of
  consecutive positions, the translation the first slice's ImagePositionPatient; DICOM's LPS is
  converted to RAS by negating x and y.
A series that would need more than one affine (missing or unevenly spaced slices, gantry tilt,
slices of different orientation, spacing or size) is refused with a `DataError`.
"""

import os
import pathlib
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pydicom

from ecm_jax.errors import DataError

SUFFIX = '.dcm'  # case-insensitive; other files in a series folder are ignored
SPACING_TOLERANCE = 0.01  # a slice step may differ from the median step by 1 % of it
GAP_FACTOR = 1.5  # a step this many times the median step means slices are missing
TILT_TOLERANCE = 0.1  # in-plane drift of the slice positions allowed, in pixels
SAME_POSITION = 1e-3  # mm: slices closer than this along the normal are duplicates
DIRECTION_TOLERANCE = 1e-4  # ImageOrientationPatient cosines that differ by less are the same
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_REQUIRED = ('SeriesInstanceUID', 'ImageOrientationPatient', 'ImagePositionPatient',
             'PixelSpacing', 'Rows', 'Columns', 'PixelData')


class Series(NamedTuple):
  volume: np.ndarray  # (columns, rows, slices) float32 HU
  affine: np.ndarray  # (4, 4) float64, voxel (i, j, k, 1) -> RAS mm


class _Slice(NamedTuple):
  path: pathlib.Path
  dataset: pydicom.Dataset
  row_cosine: np.ndarray  # (3,) LPS direction of increasing column index
  column_cosine: np.ndarray  # (3,) LPS direction of increasing row index
  position: np.ndarray  # (3,) LPS mm of the first pixel's centre
  spacing: np.ndarray  # (2,) PixelSpacing: (between rows, between columns) mm


def dicom_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The `*.dcm` files directly in `folder` (macOS `._*` files skipped), sorted by name."""
  return sorted(p for p in folder.iterdir() if p.suffix.lower() == SUFFIX
                and not p.name.startswith('._') and p.is_file())


def series_folders(folder: pathlib.Path) -> list[pathlib.Path]:
  """The folders at or below `folder` that hold `*.dcm` files, sorted."""
  return sorted(pathlib.Path(parent) for parent, _, names in os.walk(folder)
                if any(name.lower().endswith(SUFFIX) and not name.startswith('._')
                       for name in names))


def find_series(folder) -> pathlib.Path:
  """The one series folder at or below `folder` (e.g. a TCIA patient folder)."""
  folder = pathlib.Path(folder)
  found = series_folders(folder)
  if not found:
    raise DataError(f'{folder}: no DICOM files (*{SUFFIX}) in this folder or below')
  if len(found) > 1:
    names = ', '.join(str(p.relative_to(folder)) for p in found)
    raise DataError(f'{folder}: {len(found)} folders of DICOM files ({names}); expected one series')
  return found[0]


def read_series(folder) -> Series:
  """Read the CT series whose slices are the `*.dcm` files of `folder` (see the module doc)."""
  folder = pathlib.Path(folder)
  paths = dicom_files(folder) if folder.is_dir() else []
  if not paths:
    raise DataError(f'{folder}: no DICOM files (*{SUFFIX}) in this folder')
  slices = [_read_slice(path) for path in paths]
  _check_one_ct_series(folder, slices)
  first = slices[0]
  for other in slices[1:]:
    _check_same_plane(first, other)
  normal = np.cross(first.row_cosine, first.column_cosine)
  normal /= np.linalg.norm(normal)  # decimal-string cosines are only nearly unit
  slices.sort(key=lambda s: float(s.position @ normal))
  step = _slice_step(folder, slices, normal)
  volume = np.empty((first.dataset.Columns, first.dataset.Rows, len(slices)), np.float32)
  for k, s in enumerate(slices):
    volume[..., k] = _hounsfield(s)
  lps = np.eye(4)
  lps[:3, 0] = first.row_cosine * first.spacing[1]
  lps[:3, 1] = first.column_cosine * first.spacing[0]
  lps[:3, 2] = normal * step
  lps[:3, 3] = slices[0].position
  return Series(volume, _LPS_TO_RAS @ lps)


def load_image(folder) -> nib.Nifti1Image:
  """`read_series` as an in-memory NIfTI image: its header is what predictions are written with."""
  volume, affine = read_series(folder)
  image = nib.Nifti1Image(volume, affine)
  image.set_qform(affine, code='scanner')  # as dcm2niix writes it: scanner (DICOM) coordinates
  image.set_sform(affine, code='scanner')
  image.header.set_xyzt_units('mm', 'sec')
  return image


def _read_slice(path: pathlib.Path) -> _Slice:
  try:
    dataset = pydicom.dcmread(path)
  except Exception as e:  # pydicom raises many types for a truncated or non-DICOM file
    raise DataError(f'{path}: cannot read DICOM ({type(e).__name__}: {e})') from e
  missing = [name for name in _REQUIRED if name not in dataset]
  if missing:
    raise DataError(f'{path}: no {", ".join(missing)} (needed to place the slice in the volume)')
  try:
    orientation = np.array(dataset.ImageOrientationPatient, np.float64)
    position = np.array(dataset.ImagePositionPatient, np.float64)
    spacing = np.array(dataset.PixelSpacing, np.float64)
  except (TypeError, ValueError) as e:
    raise DataError(f'{path}: malformed geometry attribute ({e})') from e
  if orientation.shape != (6,) or position.shape != (3,) or spacing.shape != (2,):
    raise DataError(f'{path}: ImageOrientationPatient, ImagePositionPatient and PixelSpacing '
                    'need 6, 3 and 2 values')
  row, column = orientation[:3], orientation[3:]
  if (abs(row @ row - 1) > DIRECTION_TOLERANCE or abs(column @ column - 1) > DIRECTION_TOLERANCE
      or abs(row @ column) > DIRECTION_TOLERANCE):
    raise DataError(f'{path}: ImageOrientationPatient {orientation.tolist()} is not two '
                    'orthogonal unit vectors')
  if spacing.min() <= 0:
    raise DataError(f'{path}: PixelSpacing {spacing.tolist()} is not positive')
  return _Slice(path, dataset, row, column, position, spacing)


def _check_one_ct_series(folder: pathlib.Path, slices: list[_Slice]):
  series = {}
  for s in slices:
    series.setdefault(str(s.dataset.SeriesInstanceUID), []).append(s.path.name)
  if len(series) > 1:
    counts = ', '.join(f'{uid} ({len(names)} files, e.g. {names[0]})'
                       for uid, names in series.items())
    raise DataError(f'{folder}: {len(series)} series in one folder (SeriesInstanceUID {counts}); '
                    'expected one series per folder')
  for s in slices:
    modality = s.dataset.get('Modality')
    if modality != 'CT':
      raise DataError(f'{s.path}: Modality {modality!r}; only CT series are read')


def _check_same_plane(first: _Slice, other: _Slice):
  """Every slice must share the first's orientation, pixel spacing and size: one affine."""
  if (np.abs(other.row_cosine - first.row_cosine).max() > DIRECTION_TOLERANCE
      or np.abs(other.column_cosine - first.column_cosine).max() > DIRECTION_TOLERANCE):
    raise DataError(f'{other.path}: ImageOrientationPatient differs from {first.path.name}')
  if np.abs(other.spacing - first.spacing).max() > SPACING_TOLERANCE * first.spacing.min():
    raise DataError(f'{other.path}: PixelSpacing {other.spacing.tolist()} differs from '
                    f'{first.path.name} {first.spacing.tolist()}')
  size, first_size = (other.dataset.Rows, other.dataset.Columns), (first.dataset.Rows,
                                                                   first.dataset.Columns)
  if size != first_size:
    raise DataError(f'{other.path}: {size[0]}x{size[1]} pixels, {first.path.name} has '
                    f'{first_size[0]}x{first_size[1]}')


def _slice_step(folder: pathlib.Path, slices: list[_Slice], normal: np.ndarray) -> float:
  """The spacing of the sorted slices (mm); refuses gaps, uneven spacing and gantry tilt."""
  if len(slices) < 2:
    raise DataError(f'{folder}: {len(slices)} slice; a volume needs at least 2')
  distance = np.array([s.position @ normal for s in slices])
  steps = np.diff(distance)
  median = float(np.median(steps))
  names = [s.path.name for s in slices]
  for k, step in enumerate(steps):
    between = f'{names[k]} ({distance[k]:.3f} mm) and {names[k + 1]} ({distance[k + 1]:.3f} mm)'
    if step < SAME_POSITION:
      raise DataError(f'{folder}: two slices at the same position, {between}')
    if step > GAP_FACTOR * median:
      raise DataError(f'{folder}: missing slice(s) between {between}: a step of {step:.3f} mm '
                      f'where the series has {median:.3f} mm')
    if abs(step - median) > SPACING_TOLERANCE * median:
      raise DataError(f'{folder}: uneven slice spacing: {step:.3f} mm between {between}, '
                      f'{median:.3f} mm elsewhere (tolerance {SPACING_TOLERANCE:.0%})')
  offsets = np.array([s.position for s in slices]) - slices[0].position
  drift = offsets - np.outer(offsets @ normal, normal)
  largest = float(np.linalg.norm(drift, axis=1).max())
  if largest > TILT_TOLERANCE * slices[0].spacing.min():
    raise DataError(f'{folder}: slice positions drift {largest:.3f} mm within the slice plane '
                    '(gantry tilt?); only series stacked along the slice normal are read')
  return float((distance[-1] - distance[0]) / (len(slices) - 1))


def _hounsfield(s: _Slice) -> np.ndarray:
  """One slice, (columns, rows) HU."""
  try:
    pixels = s.dataset.pixel_array
  except Exception as e:  # compressed transfer syntaxes without a decoder, truncated pixel data
    raise DataError(f'{s.path}: cannot decode the pixel data ({type(e).__name__}: {e})') from e
  if pixels.shape != (s.dataset.Rows, s.dataset.Columns):
    raise DataError(f'{s.path}: pixel data of shape {pixels.shape}; expected one '
                    f'{s.dataset.Rows}x{s.dataset.Columns} slice per file')
  slope = float(s.dataset.get('RescaleSlope', 1.0))
  intercept = float(s.dataset.get('RescaleIntercept', 0.0))
  return pixels.T * slope + intercept
