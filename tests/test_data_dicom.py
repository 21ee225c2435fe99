"""DICOM CT series (ecm_jax/data/dicom.py) and the TCIA layout of NIH Pancreas-CT (readers.py).

The series are written here with pydicom from a known array and geometry; the expected RAS affines
are derived by hand from each geometry, and every series must read as the NIfTI written (nibabel)
from the same array with that affine: same values, same affine, same slices after reorientation.
"""

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
import pydicom.uid
import pytest

from configs import default
from ecm_jax import data
from ecm_jax.data import dicom, readers
from ecm_jax.errors import DataError

SHAPE = (16, 16, 6)  # (columns, rows, slices)
SLOPE, INTERCEPT = 2.0, -1024.0
PIXEL_SPACING = (0.8, 0.7)  # DICOM order: between rows, between columns
STEP = 2.5  # mm between slices
ORIGIN = (-100.0, -120.0, -300.0)  # LPS position of the first slice's first pixel
COS, SIN = np.cos(np.pi / 6), np.sin(np.pi / 6)
# name -> (row cosine, column cosine) in LPS, and the RAS affine they give (derived by hand: i
# steps 0.7 mm along the row cosine, j 0.8 mm along the column cosine, k 2.5 mm along their cross
# product; x and y negated from LPS to RAS).
GEOMETRIES = {
    'axial': ((1, 0, 0), (0, 1, 0),
              [[-0.7, 0, 0, 100], [0, -0.8, 0, 120], [0, 0, 2.5, -300], [0, 0, 0, 1]]),
    'oblique': ((1, 0, 0), (0, COS, SIN),  # axial tilted 30 degrees about x
                [[-0.7, 0, 0, 100], [0, -0.8 * COS, 2.5 * SIN, 120],
                 [0, 0.8 * SIN, 2.5 * COS, -300], [0, 0, 0, 1]]),
    'sagittal': ((0, 1, 0), (0, 0, -1),
                 [[0, 0, 2.5, 100], [-0.7, 0, 0, 120], [0, -0.8, 0, -300], [0, 0, 0, 1]]),
}


def _config(tmp_path, **overrides):
  config = default.get_config().data
  config.update(dict(dataset='nih_pancreas', cache_dir=str(tmp_path / 'cache'), image_size=16,
                     num_workers=0, foreground_labels=(1,)))
  config.update(overrides)
  return config


def _stored(seed=0):
  """Stored pixel values (columns, rows, slices) int16; HU = stored * SLOPE + INTERCEPT."""
  return np.random.default_rng(seed).integers(400, 700, SHAPE).astype(np.int16)


def _ds(values):
  return [f'{float(v):.10g}' for v in values]


def _write_series(folder, stored, geometry='axial', *, names=None, positions=None, edit=None):
  """One CT file per slice k of `stored` at ORIGIN + k * STEP * normal (or `positions[k]`);
  `names[k]` is slice k's file name; `edit(k, dataset)` may change a slice before it is saved."""
  folder.mkdir(parents=True, exist_ok=True)
  row, column, _ = GEOMETRIES[geometry]
  normal = np.cross(row, column)
  series_uid = pydicom.uid.generate_uid()
  for k in range(stored.shape[2]):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = 'CT', series_uid, k + 1
    ds.ImageOrientationPatient = _ds(row + column)
    position = np.add(ORIGIN, k * STEP * normal) if positions is None else positions[k]
    ds.ImagePositionPatient = _ds(position)
    ds.PixelSpacing = _ds(PIXEL_SPACING)
    ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds([SLOPE])[0], _ds([INTERCEPT])[0]
    ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype('<i2').tobytes()
    if edit is not None:
      edit(k, ds)
    ds.save_as(folder / (f'1-{k + 1:03d}.dcm' if names is None else names[k]),
               enforce_file_format=True)
  return folder


def _hounsfield(stored):
  return stored * SLOPE + INTERCEPT


def _save_nifti(path, array, affine):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, np.array(affine, np.float64)), path)
  return path


def _label(stored):
  return (stored > 550).astype(np.uint8)


@pytest.mark.parametrize('geometry', sorted(GEOMETRIES))
def test_series_reads_as_its_nifti_conversion(tmp_path, geometry):
  stored = _stored()
  folder = _write_series(tmp_path / 'series', stored, geometry)
  volume, affine = dicom.read_series(folder)
  assert volume.dtype == np.float32
  np.testing.assert_array_equal(volume, _hounsfield(stored))
  expected = GEOMETRIES[geometry][2]
  np.testing.assert_allclose(affine, expected, atol=1e-8)
  nifti = _save_nifti(tmp_path / 'scan.nii.gz', _hounsfield(stored).astype(np.float32), expected)
  config = _config(tmp_path)
  stack, meta = readers.read_scan(folder, config)
  nifti_stack, nifti_meta = readers.read_scan(nifti, config)
  np.testing.assert_array_equal(stack, nifti_stack)
  np.testing.assert_allclose(meta.affine, nifti_meta.affine, atol=1e-5)  # NIfTI stores float32
  assert (meta.shape, meta.orientation, meta.slice_axis) == (
      nifti_meta.shape, nifti_meta.orientation, nifti_meta.slice_axis)
  np.testing.assert_allclose(meta.zooms, (0.7, 0.8, 2.5), rtol=1e-6)
  np.testing.assert_allclose(meta.stack_spacing, nifti_meta.stack_spacing, rtol=1e-6)


def test_slices_are_ordered_by_position_not_file_name(tmp_path):
  stored = _stored()
  ordered = dicom.read_series(_write_series(tmp_path / 'ordered', stored, 'oblique'))
  names = [f'{n:03d}.dcm' for n in np.random.default_rng(1).permutation(SHAPE[2])]
  assert names != sorted(names)

  def reverse_instance_numbers(k, ds):
    ds.InstanceNumber = SHAPE[2] - k
  shuffled = dicom.read_series(_write_series(tmp_path / 'shuffled', stored, 'oblique', names=names,
                                             edit=reverse_instance_numbers))
  np.testing.assert_array_equal(shuffled.volume, ordered.volume)
  np.testing.assert_array_equal(shuffled.affine, ordered.affine)


def _positions(*offsets):
  """Axial positions ORIGIN + (0, 0, z) for each z."""
  return [np.add(ORIGIN, (0, 0, z)) for z in offsets]


def _write(folder, **kwargs):
  _write_series(folder, _stored(), **kwargs)


def _missing_slice(folder):
  _write(folder)
  (folder / '1-004.dcm').unlink()
  return (f'{folder}: missing slice(s) between 1-003.dcm (-295.000 mm) and 1-005.dcm (-290.000 mm):'
          ' a step of 5.000 mm where the series has 2.500 mm')


def _uneven(folder):
  _write(folder, positions=_positions(0, 2.5, 5, 8, 10, 12.5))
  return (f'{folder}: uneven slice spacing: 3.000 mm between 1-003.dcm (-295.000 mm) and 1-004.dcm '
          '(-292.000 mm), 2.500 mm elsewhere (tolerance 1%)')


def _same_position(folder):
  _write(folder, positions=_positions(0, 2.5, 2.5, 5, 7.5, 10))
  return (f'{folder}: two slices at the same position, 1-002.dcm (-297.500 mm) and 1-003.dcm '
          '(-297.500 mm)')


def _gantry_tilt(folder):
  _write(folder, positions=[np.add(ORIGIN, (0, 0.3 * k, STEP * k)) for k in range(SHAPE[2])])
  return (f'{folder}: slice positions drift 1.500 mm within the slice plane (gantry tilt?); only '
          'series stacked along the slice normal are read')


def _two_series(folder):
  _write(folder)
  path = folder / '1-002.dcm'
  ds = pydicom.dcmread(path)
  ds.SeriesInstanceUID = '1.2.3.4'
  ds.save_as(path)
  return f'{folder}: 2 series in one folder (SeriesInstanceUID ...'


def _not_ct(folder):
  _write(folder, edit=lambda k, ds: setattr(ds, 'Modality', 'MR'))
  return f'{folder / "1-001.dcm"}: Modality \'MR\'; only CT series are read'


def _no_files(folder):
  folder.mkdir(parents=True)
  (folder / 'README.txt').write_text('not a slice')
  return f'{folder}: no DICOM files (*.dcm) in this folder'


def _unreadable(folder):
  _write(folder)
  (folder / '1-003.dcm').write_bytes(b'not DICOM at all')
  return f'{folder / "1-003.dcm"}: cannot read DICOM (InvalidDicomError: ...'


def _edit_slice(k_bad, edit):
  return lambda k, ds: edit(ds) if k == k_bad else None


def _other_orientation(folder):
  _write(folder, edit=_edit_slice(2, lambda ds: setattr(ds, 'ImageOrientationPatient',
                                                         _ds((1, 0, 0, 0, COS, SIN)))))
  return f'{folder / "1-003.dcm"}: ImageOrientationPatient differs from 1-001.dcm'


def _not_orthonormal(folder):
  _write(folder, edit=_edit_slice(0, lambda ds: setattr(ds, 'ImageOrientationPatient',
                                                         _ds((1, 0, 0, 1, 0, 0)))))
  return (f'{folder / "1-001.dcm"}: ImageOrientationPatient [1.0, 0.0, 0.0, 1.0, 0.0, 0.0] is not '
          'two orthogonal unit vectors')


def _other_spacing(folder):
  _write(folder, edit=_edit_slice(1, lambda ds: setattr(ds, 'PixelSpacing', _ds((0.8, 0.9)))))
  return f'{folder / "1-002.dcm"}: PixelSpacing [0.8, 0.9] differs from 1-001.dcm [0.8, 0.7]'


def _other_size(folder):
  def halve_rows(ds):
    ds.Rows, ds.PixelData = 8, ds.PixelData[:8 * 16 * 2]
  _write(folder, edit=_edit_slice(5, halve_rows))
  return f'{folder / "1-006.dcm"}: 8x16 pixels, 1-001.dcm has 16x16'


def _no_position(folder):
  _write(folder, edit=_edit_slice(4, lambda ds: delattr(ds, 'ImagePositionPatient')))
  return (f'{folder / "1-005.dcm"}: no ImagePositionPatient (needed to place the slice in the '
          'volume)')


def _truncated_pixels(folder):
  _write(folder, edit=_edit_slice(3, lambda ds: setattr(ds, 'PixelData', ds.PixelData[:100])))
  return f'{folder / "1-004.dcm"}: cannot decode the pixel data (...'


@pytest.mark.parametrize('make_bad', [
    _missing_slice, _uneven, _same_position, _gantry_tilt, _two_series, _not_ct, _no_files,
    _unreadable, _not_orthonormal, _other_orientation, _other_spacing, _other_size, _no_position,
    _truncated_pixels])
def test_bad_series_is_refused_with_a_message_naming_it(tmp_path, make_bad):
  folder = tmp_path / 'series'
  expected = make_bad(folder)
  with pytest.raises(data.DataError) as error:
    dicom.read_series(folder)
  if expected.endswith('...'):
    assert str(error.value).startswith(expected[:-3])
  else:
    assert str(error.value) == expected
  if make_bad is _two_series:
    assert '1.2.3.4 (1 files, e.g. 1-002.dcm)' in str(error.value)


def _tcia(root, geometries=('axial', 'oblique')):
  """The TCIA download: Pancreas-CT/PANCREAS_XXXX/<study>/<series>/*.dcm and the label folder."""
  for number, geometry in enumerate(geometries, start=1):
    stored = _stored(number)
    patient = root / 'Pancreas-CT' / f'PANCREAS_{number:04d}'
    _write_series(patient / f'11-24-2015-PANCREAS{number:04d}-Pancreas-9966{number}' /
                  f'Pancreas-6350{number}', stored, geometry)
    _save_nifti(root / 'TCIA_pancreas_labels-02-05-2017' / f'label{number:04d}.nii.gz',
                _label(stored), GEOMETRIES[geometry][2])
  return root


def test_tcia_layout_lists_and_reads_cases_like_the_nifti_conversion(tmp_path):
  root = _tcia(tmp_path / 'tcia')
  config = _config(tmp_path, root=str(root), split=(1, 1, 0))
  cases = readers.list_cases(config, root)
  assert [case.case_id for case in cases] == ['PANCREAS_0001', 'PANCREAS_0002']
  assert cases[1].image == (root / 'Pancreas-CT' / 'PANCREAS_0002' /
                            '11-24-2015-PANCREAS0002-Pancreas-99662' / 'Pancreas-63502')
  assert cases[1].label == root / 'TCIA_pancreas_labels-02-05-2017' / 'label0002.nii.gz'
  converted = tmp_path / 'converted'
  for number, geometry in ((1, 'axial'), (2, 'oblique')):
    _save_nifti(converted / f'PANCREAS_{number:04d}.nii.gz',
                _hounsfield(_stored(number)).astype(np.float32), GEOMETRIES[geometry][2])
    _save_nifti(converted / f'label{number:04d}.nii.gz', _label(_stored(number)),
                GEOMETRIES[geometry][2])
  nifti_cases = readers.list_cases(config, converted)
  for case, nifti_case in zip(cases, nifti_cases, strict=True):
    image, label, meta = readers.read_case(case, config)
    nifti_image, nifti_label, nifti_meta = readers.read_case(nifti_case, config)
    np.testing.assert_array_equal(image, nifti_image)
    np.testing.assert_array_equal(label, nifti_label)
    assert label.any() and meta.case_id == nifti_meta.case_id
    np.testing.assert_allclose(meta.affine, nifti_meta.affine, atol=1e-5)
  ds = data.prepare(config, split_file=tmp_path / 'splits.json')
  assert ds.case_ids == ('PANCREAS_0001', 'PANCREAS_0002')
  assert ds.case_meta('PANCREAS_0002').image_path == str(cases[1].image)


def test_a_label_in_another_geometry_than_its_series_is_refused(tmp_path):
  root = _tcia(tmp_path / 'tcia', geometries=('axial',))
  label_path = root / 'TCIA_pancreas_labels-02-05-2017' / 'label0001.nii.gz'
  flipped = np.array(GEOMETRIES['axial'][2])  # the slices stacked in the opposite order
  flipped[2, 2:] = (-2.5, -300 + 2.5 * (SHAPE[2] - 1))
  _save_nifti(label_path, _label(_stored(1))[:, :, ::-1], flipped)
  config = _config(tmp_path, root=str(root))
  with pytest.raises(data.DataError) as error:
    readers.read_case(readers.list_cases(config, root)[0], config)
  assert str(error.value) == (
      f'{label_path}: affine differs from the image {readers.list_cases(config, root)[0].image} by '
      'up to 12.5 mm (> data.affine_tolerance=0.001)')


def test_nih_layout_errors_name_what_was_looked_for(tmp_path):
  root = _tcia(tmp_path / 'both', geometries=('axial',))
  _save_nifti(root / 'nifti' / 'PANCREAS_0001.nii.gz', _hounsfield(_stored(1)).astype(np.float32),
              GEOMETRIES['axial'][2])
  with pytest.raises(data.DataError) as error:
    readers.list_cases(_config(tmp_path), root)
  assert str(error.value) == (
      f'{root}: both a NIfTI conversion (1 PANCREAS_XXXX.nii.gz, e.g. '
      f'{root / "nifti" / "PANCREAS_0001.nii.gz"}) and DICOM series (PANCREAS_XXXX/ folders of '
      f'*.dcm, e.g. {root / "Pancreas-CT" / "PANCREAS_0001"}); point data.root at a folder with '
      'only one of them')
  empty = tmp_path / 'empty'
  (empty / 'Pancreas-CT').mkdir(parents=True)
  with pytest.raises(data.DataError) as error:
    readers.list_cases(_config(tmp_path), empty)
  assert str(error.value) == (
      f"{empty}: no cases found for data.dataset='nih_pancreas' (expected PANCREAS_XXXX/ folders "
      'of DICOM series (*.dcm) or PANCREAS_XXXX.nii.gz images, with labelXXXX.nii.gz)')
  root = _tcia(tmp_path / 'two_series', geometries=('axial',))
  patient = root / 'Pancreas-CT' / 'PANCREAS_0001'
  _write_series(patient / 'study' / 'scout', _stored())
  with pytest.raises(data.DataError) as error:
    readers.list_cases(_config(tmp_path), root)
  assert str(error.value) == (
      f'{patient}: 2 folders of DICOM files '
      '(11-24-2015-PANCREAS0001-Pancreas-99661/Pancreas-63501, study/scout); expected one series')


def test_a_series_folder_is_predicted_and_written_in_its_geometry(tmp_path):
  stored = _stored()
  patient = tmp_path / 'PANCREAS_0007'
  _write_series(patient / 'study' / 'series', stored, 'oblique')
  expected = GEOMETRIES['oblique'][2]
  nifti = _save_nifti(tmp_path / 'scan.nii.gz', _hounsfield(stored).astype(np.float32), expected)
  config = _config(tmp_path)
  slices, meta = data.load_scan(patient, config)
  np.testing.assert_array_equal(slices, data.load_scan(nifti, config)[0])
  assert meta.case_id == 'PANCREAS_0007' and meta.label_path is None
  assert meta.image_path == str(patient / 'study' / 'series')
  mask = (slices[..., 0] > 0.5).astype(np.uint8)  # a "prediction" that follows the image
  out_path = tmp_path / 'mask.nii.gz'
  data.write_prediction(mask, meta, out_path)
  written = nib.load(out_path)
  np.testing.assert_allclose(written.affine, expected, atol=1e-5)
  assert written.get_data_dtype() == np.uint8
  hounsfield = _hounsfield(stored)
  window = config.window
  np.testing.assert_array_equal(
      np.asanyarray(written.dataobj), ((hounsfield - window[0]) / (window[1] - window[0]) > 0.5))
  assert written.header['qform_code'] == written.header['sform_code'] == 1  # scanner coordinates


def test_eval_predict_finds_series_folders_beside_nifti_files(tmp_path):
  from ecm_jax.evaluate import evaluation  # pylint: disable=g-import-not-at-top  (imports JAX)
  root = _tcia(tmp_path / 'tcia')
  patients = root / 'Pancreas-CT'
  _save_nifti(patients / 'extra.nii.gz', _hounsfield(_stored()).astype(np.float32),
              GEOMETRIES['axial'][2])
  assert evaluation.scan_paths(patients) == [patients / 'PANCREAS_0001', patients / 'PANCREAS_0002',
                                             patients / 'extra.nii.gz']
  # A patient or series folder given directly is one scan.
  assert evaluation.scan_paths(patients / 'PANCREAS_0001') == [patients / 'PANCREAS_0001']
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='no .nii or .nii.gz files or DICOM series folders'):
    evaluation.scan_paths(tmp_path / 'empty')
