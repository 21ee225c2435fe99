"""CaseMeta: how a case's 2D slices relate to its NIfTI file, so predictions can be written back.

A volume on disk becomes a stack of slices `(N, H, W)` in two steps: reorient it (identity for the
KiTS19 layout, closest canonical RAS for MSD and NIH Pancreas-CT), then move the slice axis to the
front. `to_stack` and `from_stack` undo each other exactly. Row `k` of a case's cached arrays is
slice `k` of its stack (every slice is cached), resized to `image_size x image_size`.
"""

import base64
import dataclasses

import nibabel as nib
import numpy as np


@dataclasses.dataclass(frozen=True)
class CaseMeta:
  """Everything needed to map a case's slices back to the geometry of its file on disk."""
  case_id: str
  image_path: str
  label_path: str | None  # None for unlabelled scans (`load_scan`)
  shape: tuple[int, ...]  # volume shape on disk
  affine: tuple[tuple[float, ...], ...]  # 4x4 voxel-to-world matrix of the file on disk
  zooms: tuple[float, ...]  # voxel spacing on disk (mm), in disk axis order
  header: str  # the image's NIfTI header bytes, base64: written back with predictions
  orientation: tuple[tuple[float, float], ...]  # nibabel ornt: disk axis i -> working axis [i][0]
  slice_axis: int  # axis of the reoriented volume that is sliced
  image_size: int  # cached slices are image_size x image_size
  foreground_labels: tuple[int, ...]  # label values of the target (config.data.foreground_labels)
  foreground_slices: tuple[int, ...] = ()  # stack indices of slices with foreground (mapped label)

  @property
  def working_shape(self) -> tuple[int, ...]:
    """Volume shape after reorientation."""
    shape = [0] * len(self.shape)
    for disk_axis, (working_axis, _) in enumerate(self.orientation):
      shape[int(working_axis)] = self.shape[disk_axis]
    return tuple(shape)

  @property
  def num_slices(self) -> int:
    return self.working_shape[self.slice_axis]

  @property
  def in_plane_shape(self) -> tuple[int, int]:
    """(H, W) of a slice before resizing."""
    return tuple(n for axis, n in enumerate(self.working_shape) if axis != self.slice_axis)

  @property
  def stack_spacing(self) -> tuple[float, float, float]:
    """Spacing (mm) along the (slice, row, column) axes of the stack, before resizing."""
    spacing = [0.0] * len(self.zooms)
    for disk_axis, (working_axis, _) in enumerate(self.orientation):
      spacing[int(working_axis)] = float(self.zooms[disk_axis])
    return (spacing[self.slice_axis],) + tuple(
        s for axis, s in enumerate(spacing) if axis != self.slice_axis)

  def nifti_header(self, dtype) -> nib.Nifti1Header:
    """The original header, set to store `dtype` unscaled (NIfTI-1 or NIfTI-2 as on disk)."""
    raw = base64.b64decode(self.header)
    header_class = nib.Nifti2Header if len(raw) == nib.Nifti2Header.template_dtype.itemsize else (
        nib.Nifti1Header)
    header = header_class(binaryblock=raw)
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)
    return header

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, fields: dict) -> 'CaseMeta':
    tuples = {name: _to_tuple(value) for name, value in fields.items() if isinstance(value, list)}
    return cls(**{**fields, **tuples})


def _to_tuple(value):
  return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def describe(image: nib.spatialimages.SpatialImage, *, case_id: str, image_path, label_path,
             reorient: bool, slice_axis: int, image_size: int, foreground_labels) -> CaseMeta:
  """CaseMeta of a loaded NIfTI image; `reorient` selects closest-canonical (RAS) working axes."""
  ndim = len(image.shape)
  if reorient:
    orientation = nib.orientations.io_orientation(image.affine)
  else:
    orientation = np.stack([np.arange(ndim), np.ones(ndim)], axis=1)
  return CaseMeta(
      case_id=case_id,
      image_path=str(image_path),
      label_path=None if label_path is None else str(label_path),
      shape=tuple(int(n) for n in image.shape),
      affine=tuple(tuple(float(v) for v in row) for row in image.affine),
      zooms=tuple(float(z) for z in image.header.get_zooms()[:ndim]),
      header=base64.b64encode(image.header.binaryblock).decode('ascii'),
      orientation=tuple((float(a), float(f)) for a, f in orientation),
      slice_axis=slice_axis,
      image_size=image_size,
      foreground_labels=tuple(int(v) for v in foreground_labels),
  )


def to_stack(volume: np.ndarray, meta: CaseMeta) -> np.ndarray:
  """Disk-ordered volume -> slices (N, H, W) (a view where possible)."""
  working = nib.orientations.apply_orientation(volume, np.array(meta.orientation))
  return np.moveaxis(working, meta.slice_axis, 0)


def from_stack(stack: np.ndarray, meta: CaseMeta) -> np.ndarray:
  """Slices (N, H, W) at the original in-plane size -> volume in the disk's axis order."""
  working = np.moveaxis(stack, 0, meta.slice_axis)
  inverse = np.zeros((len(meta.orientation), 2))
  for disk_axis, (working_axis, flip) in enumerate(meta.orientation):
    inverse[int(working_axis)] = (disk_axis, flip)
  return np.ascontiguousarray(nib.orientations.apply_orientation(working, inverse))
