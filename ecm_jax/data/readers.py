"""Dataset layouts on disk -> cases, and NIfTI volumes -> validated slice stacks (nibabel).

Layouts (`config.data.dataset`):
- `kits19` (and the built-in `synthetic` demo): `<root>/case_XXXXX/imaging.nii.gz` and
  `segmentation.nii.gz` (demo folders are `synthetic_case_XXXXX`); axis 0 of the file is the slice
  axis, used as stored.
- `msd`: `<root>/dataset.json`, `imagesTr/*.nii.gz`, `labelsTr/<same name>` (macOS `._*` files are
  skipped); reoriented to closest canonical RAS, slices along axis 2.
- `nih_pancreas`: NIH Pancreas-CT with `labelXXXX.nii.gz` labels anywhere under `<root>` (e.g. in
  `TCIA_pancreas_labels-02-05-2017/`), paired by number with the images of one of two layouts,
  whichever is found: the TCIA download, a `PANCREAS_XXXX/` folder per patient anywhere under
  `<root>` (e.g. `Pancreas-CT/PANCREAS_0001/<study>/<series>/1-001.dcm`) holding one DICOM series
  (read by `ecm_jax.data.dicom`), or a NIfTI conversion, `PANCREAS_XXXX.nii.gz` anywhere under
  `<root>`. Both at once is an error. Slices as for `msd`.

A DICOM series enters as the in-memory NIfTI image of its conversion (`dicom.load_image`), so it
takes the NIfTI path from there on: the label's affine check, the reorientation and, through the
image's header, predictions written back in the series' geometry.
"""

import json
import logging
import pathlib
import re
from typing import NamedTuple

import nibabel as nib
import numpy as np

from ecm_jax.data import dicom
from ecm_jax.data import meta as meta_lib
from ecm_jax.errors import DataError

_log = logging.getLogger(__name__)

# dataset -> (reorient to closest canonical RAS, slice axis of the reoriented volume)
SLICING = {
    'kits19': (False, 0),
    'synthetic': (False, 0),
    'msd': (True, 2),
    'nih_pancreas': (True, 2),
}
_KITS_CASE = re.compile(r'(synthetic_)?case_\d+')
_NIH_IMAGE = re.compile(r'PANCREAS_(\d{4})\.nii\.gz')
_NIH_LABEL = re.compile(r'label(\d{4})\.nii\.gz')
_NIH_PATIENT = re.compile(r'PANCREAS_(\d{4})')
_EXPECTED = {
    'kits19': 'case_XXXXX/imaging.nii.gz',
    'synthetic': 'synthetic_case_XXXXX/imaging.nii.gz',
    'msd': 'imagesTr/*.nii.gz',
    'nih_pancreas': 'PANCREAS_XXXX/ folders of DICOM series (*.dcm) or PANCREAS_XXXX.nii.gz '
                    'images, with labelXXXX.nii.gz',
}
_MSD_MODALITY = {'ct': 'ct', 'mri': 'mri', 'mr': 'mri'}


class CaseFiles(NamedTuple):
  case_id: str
  image: pathlib.Path
  label: pathlib.Path | None  # None only for unlabelled scans (`read_scan`)


def list_cases(config, root) -> list[CaseFiles]:
  """The labelled cases under `root`, sorted by case id (config = `config.data`)."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DataError(f'{root}: dataset root does not exist (data.root)')
  if config.dataset == 'msd':
    cases = _msd_cases(root, config)
  elif config.dataset == 'nih_pancreas':
    cases = _nih_cases(root)
  else:
    cases = _kits19_cases(root)
  if not cases:
    raise DataError(f'{root}: no cases found for data.dataset={config.dataset!r} '
                    f'(expected {_EXPECTED[config.dataset]})')
  labelled = [case for case in cases if case.label.is_file()]
  unlabelled = [case for case in cases if not case.label.is_file()]
  if unlabelled and config.missing_labels == 'error':
    case = unlabelled[0]
    raise DataError(f'{case.image}: no label file (expected {case.label}); '
                    f'{len(unlabelled)} image(s) without labels, see data.missing_labels')
  if unlabelled:
    _log.info('%s: skipping %d image(s) without labels (data.missing_labels="skip")',
                 root, len(unlabelled))
  if not labelled:
    raise DataError(f'{root}: no labelled cases found')
  return sorted(labelled)


def _kits19_cases(root: pathlib.Path) -> list[CaseFiles]:
  folders = sorted(p for p in root.iterdir() if p.is_dir() and _KITS_CASE.fullmatch(p.name))
  for folder in folders:
    if not (folder / 'imaging.nii.gz').is_file():
      raise DataError(f'{folder / "imaging.nii.gz"}: missing image of case {folder.name}')
  return [CaseFiles(f.name, f / 'imaging.nii.gz', f / 'segmentation.nii.gz') for f in folders]


def _msd_cases(root: pathlib.Path, config) -> list[CaseFiles]:
  _check_dataset_json(root / 'dataset.json', config)
  images = sorted(p for p in (root / 'imagesTr').glob('*.nii.gz') if not p.name.startswith('._'))
  return [CaseFiles(_stem(p), p, root / 'labelsTr' / p.name) for p in images]


def _check_dataset_json(path: pathlib.Path, config):
  """An MSD folder has a dataset.json; its modality must agree with data.modality."""
  if not path.is_file():
    raise DataError(f'{path}: missing (the MSD layout has dataset.json beside imagesTr/)')
  try:
    modalities = json.loads(path.read_text()).get('modality', {})
  except (ValueError, AttributeError) as e:
    raise DataError(f'{path}: not a valid dataset.json ({e})') from e
  if len(modalities) > 1:
    raise DataError(f'{path}: {len(modalities)} modalities {modalities}; only single-channel '
                    'datasets are supported')
  for name in modalities.values():
    modality = _MSD_MODALITY.get(str(name).lower())
    if modality is not None and modality != config.modality:
      raise DataError(f'{path}: modality {name!r} but data.modality={config.modality!r}')


def _nih_cases(root: pathlib.Path) -> list[CaseFiles]:
  """Cases of the TCIA DICOM layout or of the NIfTI conversion, whichever is under `root`."""
  images = _by_number(root.rglob('*.nii.gz'), _NIH_IMAGE)
  patients = _by_number((p for p in root.rglob('PANCREAS_*') if p.is_dir()), _NIH_PATIENT)
  # Folders named PANCREAS_XXXX without DICOM files may hold a NIfTI conversion.
  with_dicom = next((p for p in sorted(patients.values()) if dicom.series_folders(p)), None)
  if images and with_dicom:
    raise DataError(
        f'{root}: both a NIfTI conversion ({len(images)} PANCREAS_XXXX.nii.gz, e.g. '
        f'{min(images.values())}) and DICOM series (PANCREAS_XXXX/ folders of *.dcm, e.g. '
        f'{with_dicom}); point data.root at a folder with only one of them')
  if with_dicom:
    images = {number: dicom.find_series(folder) for number, folder in patients.items()}
  labels = _by_number(root.rglob('*.nii.gz'), _NIH_LABEL)
  return [CaseFiles(f'PANCREAS_{number}', path, labels.get(number, root / f'label{number}.nii.gz'))
          for number, path in sorted(images.items())]


def _by_number(paths, pattern: re.Pattern) -> dict[str, pathlib.Path]:
  """Number (group 1 of `pattern`) -> the one of `paths` whose name matches `pattern`."""
  found = {}
  for path in sorted(paths):
    match = pattern.fullmatch(path.name)
    if match and match[1] in found:
      raise DataError(f'{path}: duplicate of {found[match[1]]}')
    if match:
      found[match[1]] = path
  return found


def _stem(path: pathlib.Path) -> str:
  return path.name.removesuffix('.gz').removesuffix('.nii')


def read_case(files: CaseFiles, config):
  """A case's raw slices: (image (N, H, W) float32, label (N, H, W) as stored, CaseMeta)."""
  image, label = _open(files.image), _open(files.label)
  if label.shape != image.shape:
    raise DataError(f'{files.label}: shape {label.shape} differs from the image '
                    f'{files.image} shape {image.shape}')
  deviation = float(np.abs(label.affine - image.affine).max())
  if deviation > config.affine_tolerance:
    raise DataError(f'{files.label}: affine differs from the image {files.image} by up to '
                    f'{deviation:.3g} mm (> data.affine_tolerance={config.affine_tolerance})')
  meta = _describe(image, files, config)
  image_stack = meta_lib.to_stack(_image_data(image, files.image), meta)
  label_stack = meta_lib.to_stack(_read(files.label, lambda: np.asanyarray(label.dataobj)), meta)
  return image_stack, label_stack, meta


def read_scan(path, config):
  """An unlabelled scan's raw slices: (image (N, H, W) float32, CaseMeta).

  `path` is a NIfTI file, or a folder with one DICOM series at or below it (a series or patient
  folder); the case id is the file's stem or the folder's name.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    case_id, path = path.name, dicom.find_series(path)
  else:
    case_id = _stem(path)
  image = _open(path)
  meta = _describe(image, CaseFiles(case_id, path, None), config)
  return meta_lib.to_stack(_image_data(image, path), meta), meta


def _describe(image, files: CaseFiles, config) -> meta_lib.CaseMeta:
  reorient, slice_axis = SLICING[config.dataset]
  return meta_lib.describe(
      image, case_id=files.case_id, image_path=files.image, label_path=files.label,
      reorient=reorient, slice_axis=slice_axis, image_size=config.image_size,
      foreground_labels=config.foreground_labels)


def _open(path: pathlib.Path):
  """Load a NIfTI header (data stays on disk), or read a DICOM series folder into memory, and
  check the volume is 3D."""
  if path.is_dir():
    return dicom.load_image(path)
  image = _read(path, lambda: nib.load(path))
  if len(image.shape) != 3:
    raise DataError(f'{path}: {len(image.shape)}D volume of shape {image.shape}; '
                    'expected a 3D volume')
  return image


def _image_data(image, path) -> np.ndarray:
  data = _read(path, lambda: image.get_fdata(dtype=np.float32))
  bad = int(np.count_nonzero(~np.isfinite(data)))
  if bad:
    raise DataError(f'{path}: image has {bad} NaN or Inf voxel(s)')
  return data


def _read(path, load):
  """Run a nibabel read; any failure (corrupt, truncated, not NIfTI) becomes a DataError."""
  try:
    return load()
  except Exception as e:  # nibabel, gzip and zlib raise many unrelated types for a bad file
    raise DataError(f'{path}: cannot read NIfTI ({type(e).__name__}: {e})') from e
