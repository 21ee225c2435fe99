"""New scans in, predictions out: preprocess an unlabelled scan, write masks back as NIfTI.

A scan is a NIfTI file or a DICOM series folder (`ecm_jax.data.dicom`); a series' mask is written
in the series' geometry (the affine of its NIfTI conversion, RAS), so it overlays the DICOM images
in 3D Slicer or ITK-SNAP.

`write_prediction` resizes each (S, S) mask slice back to the original in-plane size with nearest
neighbour, undoes the reorientation and saves a uint8 .nii.gz with the original shape, affine and
header (spacing, orientation codes). Because nearest resizing up and back down is the identity (see
`preprocess`), a label pushed through the cache and this path comes back exactly whenever
`image_size` >= the original in-plane size; a smaller `image_size` loses detail that no write path
can restore.
"""

import pathlib

import nibabel as nib
import numpy as np

from ecm_jax.data import dataset, preprocess, readers
from ecm_jax.data import meta as meta_lib
from ecm_jax.errors import DataError


def load_scan(path, config) -> tuple[np.ndarray, meta_lib.CaseMeta]:
  """Preprocess a scan as the cache does: (slices (N, S, S, 1) float32, CaseMeta).

  `path`: a NIfTI file, or a folder with one DICOM series at or below it (`readers.read_scan`).
  """
  dataset.check_config(config)
  stack, meta = readers.read_scan(path, config)
  return preprocess.image_slices(stack, config, path), meta


def write_prediction(mask_slices: np.ndarray, meta: meta_lib.CaseMeta, out_path):
  """Write class-index slices (N, S, S) as a uint8 NIfTI in the geometry of `meta`'s file."""
  mask = np.asarray(mask_slices)
  expected = (meta.num_slices, meta.image_size, meta.image_size)
  if mask.shape != expected:
    raise DataError(f'{out_path}: prediction of shape {mask.shape} for case {meta.case_id}; '
                    f'expected {expected}')
  if mask.size and (mask.min() < 0 or mask.max() > 255):
    raise DataError(f'{out_path}: prediction values outside 0..255 for case {meta.case_id}')
  stack = preprocess.resize_nearest(mask.astype(np.uint8), meta.in_plane_shape)
  header = meta.nifti_header(np.uint8)
  image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
  nifti = image_class(meta_lib.from_stack(stack, meta), np.array(meta.affine), header=header)
  nib.save(nifti, pathlib.Path(out_path))
