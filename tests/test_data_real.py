"""Readers, preprocessing and the write-back path on small real images beside the repository (skipped when absent).

Skipped when that folder is absent. Larger sets are cut to two cases through symlinks in tmp.
The write-back tests run at an image_size >= the in-plane size, where the path is exact (see
ecm_jax/data/export.py): label -> cache -> write_prediction must reproduce the mapped label volume.
"""

import json

import nibabel as nib
import numpy as np
import pytest

from configs import default
from ecm_jax import data
from helpers import SHARED_DATA

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f'{SHARED_DATA} is absent')


def _config(tmp_path, **overrides):
  config = default.get_config().data
  config.update(dict(cache_dir=str(tmp_path / 'cache'), num_workers=0))
  config.update(overrides)
  return config


def _msd_subset(tmp_path, name, cases):
  """A symlinked copy of an MSD-layout folder holding only `cases`."""
  source, root = SHARED_DATA / name, tmp_path / name
  for folder in ('imagesTr', 'labelsTr'):
    (root / folder).mkdir(parents=True)
    for case in cases:
      (root / folder / f'{case}.nii.gz').symlink_to(source / folder / f'{case}.nii.gz')
  (root / 'dataset.json').symlink_to(source / 'dataset.json')
  return root


def _mapped_label(meta):
  return np.isin(np.asanyarray(nib.load(meta.label_path).dataobj), meta.foreground_labels)


def _assert_written_back_exactly(ds, case_id, out_path):
  meta = ds.case_meta(case_id)
  data.write_prediction(ds.case_arrays(case_id)[1], meta, out_path)
  written, original = nib.load(out_path), nib.load(meta.label_path)
  np.testing.assert_array_equal(np.asanyarray(written.dataobj), _mapped_label(meta))
  np.testing.assert_allclose(written.affine, original.affine, rtol=0, atol=1e-6)
  assert written.header.get_zooms() == original.header.get_zooms()
  assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(original.affine)


def test_kits_layout_ct(tmp_path):
  config = _config(tmp_path, dataset='kits19', root=str(SHARED_DATA / 'kits_layout_ct'),
                   image_size=128, split=(1, 0, 0))
  ds = data.prepare(config, split_file=tmp_path / 'splits.json')
  assert ds.case_ids == ('case_00000',)
  meta = ds.case_meta('case_00000')
  assert (meta.shape, meta.slice_axis, meta.in_plane_shape) == ((112, 101, 122), 0, (101, 122))
  assert meta.stack_spacing == (3.0, 3.0, 3.0)
  images, labels = ds.case_arrays('case_00000')
  assert images.shape == (112, 128, 128, 1) and images.dtype == np.float32
  assert labels.shape == (112, 128, 128) and set(np.unique(labels)) == {0, 1}
  assert images.min() == 0.0 and images.max() == 1.0  # air and bone are clipped by the window
  hu = np.asanyarray(nib.load(meta.image_path).dataobj)
  kidney_hu = hu[_mapped_label(meta)].mean()
  expected = (np.clip(kidney_hu, -79, 304) + 79) / 383
  assert abs(images[labels == 1].mean() - expected) < 0.05
  fg = sorted(np.flatnonzero(_mapped_label(meta).any(axis=(1, 2))))
  assert list(meta.foreground_slices) == fg
  _assert_written_back_exactly(ds, 'case_00000', tmp_path / 'kits_pred.nii.gz')
  slices, scan_meta = data.load_scan(meta.image_path, config)
  np.testing.assert_array_equal(slices, images)
  assert scan_meta.affine == meta.affine and scan_meta.header == meta.header


def test_msd_layout_ct(tmp_path):
  config = _config(tmp_path, dataset='msd', root=str(SHARED_DATA / 'msd_layout_ct'),
                   image_size=128, split=(1, 0, 0), window=(-100.0, 240.0),
                   foreground_labels=(1,))
  ds = data.prepare(config, split_file=tmp_path / 'splits.json')
  meta = ds.case_meta('pancreas_001')
  assert (meta.shape, meta.slice_axis, meta.in_plane_shape) == ((122, 101, 112), 2, (122, 101))
  images, labels = ds.case_arrays('pancreas_001')
  assert images.shape == (112, 128, 128, 1) and 0 < labels.sum()
  _assert_written_back_exactly(ds, 'pancreas_001', tmp_path / 'msd_pred.nii.gz')


def test_chaos_mri_kidneys_are_labels_2_and_3(tmp_path):
  root = _msd_subset(tmp_path, 'chaos_mri', ['chaos_001', 'chaos_002'])
  config = _config(tmp_path, dataset='msd', root=str(root), modality='mri', image_size=256,
                   foreground_labels=(2, 3), split=(1, 1, 0))
  with pytest.raises(data.DataError) as error:
    data.prepare(config, split_file=tmp_path / 'splits.json')
  assert str(error.value).startswith(
      f'{root / "labelsTr" / "chaos_001.nii.gz"}: label values [1, 4] are neither background')
  config.other_labels = 'background'  # liver and spleen -> background
  ds = data.prepare(config, split_file=tmp_path / 'splits.json')
  meta = ds.case_meta('chaos_001')
  assert nib.aff2axcodes(np.array(meta.affine)) == ('L', 'A', 'S')  # stack is RAS, file LAS
  assert meta.stack_spacing == pytest.approx((7.7, 1.25, 1.25))
  images, labels = ds.case_arrays('chaos_001')
  assert images.shape == (37, 256, 256, 1) and set(np.unique(labels)) == {0, 1}
  assert labels.sum() == _mapped_label(meta).sum()  # native size: every kidney voxel kept
  assert abs(images.mean()) < 1e-3 and abs(images.std() - 1) < 1e-3  # per-volume z-score
  _assert_written_back_exactly(ds, 'chaos_001', tmp_path / 'chaos_pred.nii.gz')


def test_la_mri_left_atrium(tmp_path):
  root = _msd_subset(tmp_path, 'la_mri', ['la_001', 'la_002'])
  config = _config(tmp_path, dataset='msd', root=str(root), modality='mri', image_size=192,
                   foreground_labels=(1,), split=(1, 0, 1))
  ds = data.prepare(config, split_file=tmp_path / 'splits.json')
  assert json.loads((tmp_path / 'splits.json').read_text())['train'] == ds.split_cases('train')
  meta = ds.case_meta('la_001')
  assert (meta.shape, meta.in_plane_shape, meta.num_slices) == ((183, 140, 88), (183, 140), 88)
  images, labels = ds.case_arrays('la_001')
  assert images.shape == (88, 192, 192, 1) and set(np.unique(labels)) == {0, 1}
  assert 0 < len(meta.foreground_slices) < 88
  assert images[labels == 1].mean() > images[labels == 0].mean() + 0.5  # bright blood pool in LGE
