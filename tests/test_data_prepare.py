"""prepare(): layouts, the cache (reuse, rebuild, atomicity), splits, slice selection, the synthetic
demo set, writing predictions back, and one clear DataError per bad input with nothing changed."""

import json
import logging
import pathlib

import nibabel as nib
import numpy as np
import pytest

from configs import default
from ecm_jax import data
from ecm_jax.data import preprocess, readers

AFFINE = np.array([[0, 0, -1.5, 0], [0, -1.5, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])  # KiTS-like


def _config(tmp_path, **overrides):
  config = default.get_config().data
  config.update(dict(cache_dir=str(tmp_path / 'cache'), image_size=16, num_workers=0))
  config.update(overrides)
  return config


def _save(path, array, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, affine), path)


def _volume(seed, shape=(6, 16, 16)):
  """A CT-like image (int16 HU) and a label with kidney (1) and tumour (2) on some slices."""
  rng = np.random.default_rng(seed)
  image = rng.normal(40, 30, shape).astype(np.int16)
  label = np.zeros(shape, np.uint8)
  label[1:4, 4:9, 5:11] = 1
  label[2, 6:8, 6:8] = 2
  return image, label


def _kits(root, n=2, shape=(6, 16, 16)):
  """A KiTS19-layout dataset of n cases."""
  for i in range(n):
    image, label = _volume(i, shape)
    _save(root / f'case_{i:05d}' / 'imaging.nii.gz', image)
    _save(root / f'case_{i:05d}' / 'segmentation.nii.gz', label)
  return root


def _snapshot(folder: pathlib.Path):
  return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_mtime_ns)
          for p in sorted(folder.rglob('*'))}


def test_prepare_caches_slices_with_their_meta(tmp_path):
  root = _kits(tmp_path / 'kits')
  config = _config(tmp_path, root=str(root), split=(1, 0, 1))
  ds = data.prepare(config, split_file=tmp_path / 'run' / 'splits.json')
  assert ds.case_ids == ('case_00000', 'case_00001')
  images, labels = ds.case_arrays('case_00000')
  image, label = _volume(0)
  np.testing.assert_array_equal(images[..., 0], preprocess.window_ct(image, config.window))
  np.testing.assert_array_equal(labels, np.isin(label, (1, 2)))
  meta = ds.case_meta('case_00000')
  assert (meta.shape, meta.num_slices, meta.slice_axis, meta.zooms) == ((6, 16, 16), 6, 0,
                                                                       (3.0, 1.5, 1.5))
  assert meta.foreground_slices == (1, 2, 3)
  np.testing.assert_array_equal(meta.affine, AFFINE)
  record = ds.source('test')[2]
  assert record['case'] == 1 and record['slice'] == 2
  np.testing.assert_array_equal(record['image'], ds.case_arrays('case_00001')[0][2])


def test_unchanged_config_reuses_the_cache_and_a_change_rebuilds_it(tmp_path, monkeypatch):
  config = _config(tmp_path, root=str(_kits(tmp_path / 'kits')), split=(2, 0, 0))
  first = data.prepare(config, split_file=tmp_path / 'splits.json')
  index_mtime = (first.cache_path / 'index.json').stat().st_mtime_ns

  def must_not_read(*args):
    raise AssertionError('an unchanged config must not re-read the volumes')

  with monkeypatch.context() as patch:
    patch.setattr(readers, 'read_case', must_not_read)
    again = data.prepare(config, split_file=tmp_path / 'splits.json')
  assert again.cache_path == first.cache_path
  assert (first.cache_path / 'index.json').stat().st_mtime_ns == index_mtime
  config.window = (-100.0, 240.0)
  changed = data.prepare(config, split_file=tmp_path / 'splits.json')
  assert changed.cache_path != first.cache_path
  assert not np.array_equal(changed.case_arrays('case_00000')[0],
                            first.case_arrays('case_00000')[0])


def test_a_failed_build_leaves_nothing_and_leftover_temporaries_are_never_trusted(tmp_path,
                                                                                  monkeypatch):
  config = _config(tmp_path, root=str(_kits(tmp_path / 'kits', n=3)), split=(3, 0, 0))
  calls = []

  def crash_on_second_case(stack, config, path):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a build
    return preprocess.image_slices(stack, config, path)

  with monkeypatch.context() as patch:
    patch.setattr('ecm_jax.data.cache.preprocess.image_slices', crash_on_second_case)
    with pytest.raises(KeyboardInterrupt):
      data.prepare(config, split_file=tmp_path / 'splits.json')
  assert not (tmp_path / 'cache').exists() and not (tmp_path / 'splits.json').exists()
  junk = tmp_path / 'cache' / '.kits19-0123456789abcdef.tmp-deadbeef'
  junk.mkdir(parents=True)
  (junk / 'index.json').write_text('{"half": "written"}')
  ds = data.prepare(config, split_file=tmp_path / 'splits.json')
  assert ds.cache_path.name.startswith('kits19-') and '.tmp-' not in str(ds.cache_path)
  assert len(ds.source('train')) == 18


def test_split_is_drawn_written_and_then_honoured(tmp_path):
  config = _config(tmp_path, root=str(_kits(tmp_path / 'kits', n=4)), split=(2, 1, 1))
  split_file = tmp_path / 'splits.json'
  ds = data.prepare(config, split_file=split_file)
  stored = json.loads(split_file.read_text())
  assert {k: stored[k] for k in ('train', 'val', 'test')} == {
      name: ds.split_cases(name) for name in ('train', 'val', 'test')}
  assert (stored['dataset'], stored['split_seed'], stored['counts']) == ('kits19', 0, [2, 1, 1])
  assert sorted(sum((stored[k] for k in ('train', 'val', 'test')), [])) == list(ds.case_ids)
  custom = {'train': ['case_00003'], 'val': ['case_00000', 'case_00001'], 'test': []}
  split_file.write_text(json.dumps(custom))
  ds = data.prepare(config, split_file=split_file)
  assert {name: ds.split_cases(name) for name in custom} == custom
  assert json.loads(split_file.read_text()) == custom  # honoured, not rewritten
  assert len(ds.source('val')) == 12 and len(ds.source('test')) == 0


def test_slice_selection_keeps_foreground_plus_a_fraction_of_the_rest_in_train_only(tmp_path):
  config = _config(tmp_path, root=str(_kits(tmp_path / 'kits', n=4, shape=(20, 16, 16))),
                   split=(3, 1, 0), slices='foreground', background_fraction=0.25)
  ds = data.prepare(config, split_file=tmp_path / 'splits.json')
  train = ds.source('train')
  foreground = [ds.source('train')[i]['label'].any() for i in range(len(train))]
  assert sum(foreground) == 3 * 3  # slices 1-3 of each train case
  assert len(train) - sum(foreground) == round(0.25 * 3 * 17)
  assert len(ds.source('val')) == 20  # evaluation sees every slice


def test_separate_classes_keep_tumour_apart(tmp_path):
  config = _config(tmp_path, root=str(_kits(tmp_path / 'kits', n=1)), split=(1, 0, 0),
                   merge_foreground=False)
  labels = data.prepare(config, split_file=tmp_path / 's.json').case_arrays('case_00000')[1]
  np.testing.assert_array_equal(labels, _volume(0)[1])


def test_msd_layout_skips_macos_files_and_nih_layout_pairs_by_number(tmp_path):
  msd = tmp_path / 'msd'
  image, label = _volume(0)
  _save(msd / 'imagesTr' / 'pancreas_001.nii.gz', image)
  _save(msd / 'labelsTr' / 'pancreas_001.nii.gz', label)
  (msd / 'imagesTr' / '._pancreas_001.nii.gz').write_bytes(b'\x00\x05\x16\x07 macOS metadata')
  (msd / 'dataset.json').write_text(json.dumps({'modality': {'0': 'CT'}}))
  ds = data.prepare(_config(tmp_path, dataset='msd', root=str(msd), split=(1, 0, 0)),
                    split_file=tmp_path / 'msd.json')
  assert ds.case_ids == ('pancreas_001',)
  assert ds.case_meta('pancreas_001').slice_axis == 2
  nih = tmp_path / 'nih'
  for number in ('0001', '0002'):
    _save(nih / 'images' / f'PANCREAS_{number}.nii.gz', image)
    _save(nih / 'TCIA_pancreas_labels' / f'label{number}.nii.gz', (label > 0).astype(np.uint8))
  config = _config(tmp_path, dataset='nih_pancreas', root=str(nih), split=(1, 1, 0),
                   foreground_labels=(1,))
  ds = data.prepare(config, split_file=tmp_path / 'nih.json')
  assert ds.case_ids == ('PANCREAS_0001', 'PANCREAS_0002')
  assert ds.case_meta('PANCREAS_0002').label_path == str(
      nih / 'TCIA_pancreas_labels' / 'label0002.nii.gz')


def test_missing_labels_can_be_skipped(tmp_path):
  root = _kits(tmp_path / 'kits', n=2)
  (root / 'case_00001' / 'segmentation.nii.gz').unlink()  # like KiTS19's unlabelled test cases
  config = _config(tmp_path, root=str(root), split=(1, 0, 0), missing_labels='skip')
  assert data.prepare(config, split_file=tmp_path / 's.json').case_ids == ('case_00000',)


def test_synthetic_demo_data_is_deterministic_and_labelled_synthetic(tmp_path, caplog):
  overrides = dict(dataset='synthetic', synthetic_cases=3, synthetic_slices=6, synthetic_size=32,
                   image_size=32, split=(1, 1, 1))
  with caplog.at_level(logging.INFO):
    ds = data.prepare(_config(tmp_path / 'a', **overrides), split_file=tmp_path / 'a.json')
  assert 'SYNTHETIC' in caplog.text and 'SYNTHETIC' in repr(ds) and ds.synthetic
  assert all(case.startswith('synthetic_case_') for case in ds.case_ids)
  root = pathlib.Path(ds.case_meta(ds.case_ids[0]).image_path).parents[1]
  assert json.loads((root / 'dataset.json').read_text())['synthetic'] is True
  assert (root / 'README.txt').read_text().startswith('SYNTHETIC DATA')
  assert b'SYNTHETIC' in nib.load(root / ds.case_ids[0] / 'imaging.nii.gz').header['descrip'].item()
  again = data.prepare(_config(tmp_path / 'b', **overrides), split_file=tmp_path / 'b.json')
  for case_id in ds.case_ids:
    for a, b in zip(ds.case_arrays(case_id), again.case_arrays(case_id)):
      np.testing.assert_array_equal(a, b)
  labels = np.concatenate([ds.case_arrays(c)[1] for c in ds.case_ids])
  assert 0.005 < labels.mean() < 0.1  # a small target, present on part of the slices


def test_predictions_are_written_back_in_the_original_geometry(tmp_path):
  root = tmp_path / 'msd'
  image, label = _volume(0, shape=(20, 24, 6))
  lps = np.array([[-2.0, 0, 0, 10], [0, -2.5, 0, 20], [0, 0, 4.0, -30], [0, 0, 0, 1]])
  _save(root / 'imagesTr' / 'x_001.nii.gz', image, lps)
  _save(root / 'labelsTr' / 'x_001.nii.gz', label, lps)
  (root / 'dataset.json').write_text(json.dumps({'modality': {'0': 'CT'}}))
  config = _config(tmp_path, dataset='msd', root=str(root), split=(1, 0, 0), image_size=32)
  ds = data.prepare(config, split_file=tmp_path / 's.json')
  meta = ds.case_meta('x_001')
  data.write_prediction(ds.case_arrays('x_001')[1], meta, tmp_path / 'pred.nii.gz')
  written = nib.load(tmp_path / 'pred.nii.gz')
  np.testing.assert_array_equal(np.asanyarray(written.dataobj), (label > 0).astype(np.uint8))
  assert written.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(written.affine, lps)
  assert written.header.get_zooms() == (2.0, 2.5, 4.0)
  slices, scan_meta = data.load_scan(root / 'imagesTr' / 'x_001.nii.gz', config)
  np.testing.assert_array_equal(slices, ds.case_arrays('x_001')[0])
  assert scan_meta.label_path is None and scan_meta.num_slices == meta.num_slices == 6
  with pytest.raises(data.DataError) as error:
    data.write_prediction(np.zeros((6, 16, 16)), meta, tmp_path / 'bad.nii.gz')
  assert str(error.value) == (f'{tmp_path / "bad.nii.gz"}: prediction of shape (6, 16, 16) for '
                              'case x_001; expected (6, 32, 32)')
  assert not (tmp_path / 'bad.nii.gz').exists()


# Bad input: each maker writes a dataset under tmp and returns (config overrides, expected message).
# `...` at the end of a message means "starts with".

def _missing_root(tmp):
  return dict(root=str(tmp / 'absent')), (
      f'{tmp / "absent"}: dataset root does not exist (data.root)')


def _empty(tmp):
  (tmp / 'kits').mkdir()
  return dict(root=str(tmp / 'kits')), (f"{tmp / 'kits'}: no cases found for data.dataset='kits19' "
                                        '(expected case_XXXXX/imaging.nii.gz)')


def _root_not_set(tmp):
  return dict(), 'config.data.root is not set: the folder of the kits19 dataset'


def _missing_label(tmp):
  case = _kits(tmp / 'kits', n=2) / 'case_00001'
  (case / 'segmentation.nii.gz').unlink()
  return dict(root=str(tmp / 'kits'), split=(2, 0, 0)), (
      f'{case / "imaging.nii.gz"}: no label file (expected {case / "segmentation.nii.gz"}); '
      '1 image(s) without labels, see data.missing_labels')


def _corrupt(tmp):
  path = _kits(tmp / 'kits', n=2) / 'case_00001' / 'imaging.nii.gz'
  path.write_bytes(b'this is not a NIfTI file')
  return dict(root=str(tmp / 'kits'), split=(2, 0, 0)), f'{path}: cannot read NIfTI (...'


def _truncated(tmp):
  path = _kits(tmp / 'kits', n=3, shape=(6, 64, 64)) / 'case_00002' / 'imaging.nii.gz'
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 2 // 3])
  return dict(root=str(tmp / 'kits'), split=(3, 0, 0)), f'{path}: cannot read NIfTI (...'


def _shape_mismatch(tmp):
  case = _kits(tmp / 'kits', n=1) / 'case_00000'
  _save(case / 'segmentation.nii.gz', np.zeros((6, 16, 17), np.uint8))
  return dict(root=str(tmp / 'kits')), (
      f'{case / "segmentation.nii.gz"}: shape (6, 16, 17) differs from the image '
      f'{case / "imaging.nii.gz"} shape (6, 16, 16)')


def _affine_mismatch(tmp):
  case = _kits(tmp / 'kits', n=1) / 'case_00000'
  shifted = AFFINE.copy()
  shifted[0, 3] += 0.5
  _save(case / 'segmentation.nii.gz', _volume(0)[1], shifted)
  return dict(root=str(tmp / 'kits')), (
      f'{case / "segmentation.nii.gz"}: affine differs from the image {case / "imaging.nii.gz"} '
      'by up to 0.5 mm (> data.affine_tolerance=0.001)')


def _label_outside_mapping(tmp):
  case = _kits(tmp / 'kits', n=1) / 'case_00000'
  label = _volume(0)[1]
  label[5, 0, 0] = 3
  _save(case / 'segmentation.nii.gz', label)
  return dict(root=str(tmp / 'kits')), (
      f'{case / "segmentation.nii.gz"}: label values [3] are neither background (0) nor in '
      'data.foreground_labels (1, 2); set data.other_labels="background" to map them to 0')


def _non_finite(value, count):
  def make(tmp):
    case = _kits(tmp / 'kits', n=3) / 'case_00002'  # the last case: two were already cached
    image = _volume(2)[0].astype(np.float32)
    image.flat[:count] = value
    _save(case / 'imaging.nii.gz', image)
    return dict(root=str(tmp / 'kits'), split=(3, 0, 0)), (
        f'{case / "imaging.nii.gz"}: image has {count} NaN or Inf voxel(s)')
  make.__name__ = f'non_finite_{value}'
  return make


def _dimensions(shape):
  def make(tmp):
    case = _kits(tmp / 'kits', n=1) / 'case_00000'
    _save(case / 'imaging.nii.gz', np.zeros(shape, np.int16), np.eye(4))
    return dict(root=str(tmp / 'kits')), (
        f'{case / "imaging.nii.gz"}: {len(shape)}D volume of shape {shape}; expected a 3D volume')
  make.__name__ = f'{len(shape)}d_volume'
  return make


def _image_size(tmp):
  return dict(root=str(_kits(tmp / 'kits')), image_size=100), (
      'config.data.image_size=100: must be a positive multiple of 16 (the network halves the '
      'resolution four times)')


def _split_too_large(tmp):
  return dict(root=str(_kits(tmp / 'kits', n=2)), split=(2, 1, 0)), (
      f'{tmp / "kits"}: data.split=(2, 1, 0) asks for 3 cases but 2 labelled cases were found')


def _unknown_case_in_split_file(tmp):
  (tmp / 'run').mkdir()
  (tmp / 'run' / 'splits.json').write_text(
      json.dumps({'train': ['case_00000', 'case_00007'], 'val': [], 'test': []}))
  return dict(root=str(_kits(tmp / 'kits', n=2)), split=(2, 0, 0)), (
      f"{tmp / 'run' / 'splits.json'}: 1 case(s) not found in the dataset: ['case_00007']")


def _msd_without_dataset_json(tmp):
  image, label = _volume(0)
  _save(tmp / 'msd' / 'imagesTr' / 'a.nii.gz', image)
  _save(tmp / 'msd' / 'labelsTr' / 'a.nii.gz', label)
  return dict(dataset='msd', root=str(tmp / 'msd')), (
      f'{tmp / "msd" / "dataset.json"}: missing (the MSD layout has dataset.json beside imagesTr/)')


def _msd_wrong_modality(tmp):
  (tmp / 'msd').mkdir()
  (tmp / 'msd' / 'dataset.json').write_text(json.dumps({'modality': {'0': 'MRI'}}))
  return dict(dataset='msd', root=str(tmp / 'msd')), (
      f"{tmp / 'msd' / 'dataset.json'}: modality 'MRI' but data.modality='ct'")


@pytest.mark.parametrize('make', [
    _missing_root, _empty, _root_not_set, _missing_label, _corrupt, _truncated, _shape_mismatch,
    _affine_mismatch, _label_outside_mapping, _non_finite(np.nan, 1), _non_finite(np.inf, 2),
    _dimensions((16, 16)), _dimensions((6, 16, 16, 2)), _image_size, _split_too_large,
    _unknown_case_in_split_file, _msd_without_dataset_json, _msd_wrong_modality,
], ids=lambda make: make.__name__.strip('_'))
def test_bad_input_raises_one_clear_error_and_changes_nothing(tmp_path, make):
  overrides, message = make(tmp_path)
  config = _config(tmp_path, **{'split': (1, 0, 0), **overrides})
  before = _snapshot(tmp_path)
  with pytest.raises(data.DataError) as error:
    data.prepare(config, split_file=tmp_path / 'run' / 'splits.json')
  if message.endswith('...'):
    assert str(error.value).startswith(message[:-3])
  else:
    assert str(error.value) == message
  assert _snapshot(tmp_path) == before
