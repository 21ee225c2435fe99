"""Evaluation and prediction of a run: outputs, EC fold at inference, NIfTI geometry, bad input."""

import json
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from configs import demo
from ecm_jax import data
from ecm_jax.evaluate import evaluation
from ecm_jax.evaluate.inference import Predictor
from ecm_jax.models.networks import build_model
from ecm_jax.train import checkpoint, train_state
from ecm_jax.train import workdir as workdir_lib
from helpers import REPO, tensorboard_events  # noqa: E402


def _config(tmp):
  config = demo.get_config('unet+ec')  # EC on: inference goes through the fold
  config.update_from_flattened_dict({
      'data.image_size': 32, 'data.cache_dir': str(tmp / 'cache'),
      'model.features': (4, 8, 8, 16, 16), 'train.eval_batch_size': 8,
      'model.conv_impl': 'xla'})  # compiles faster than CPU's 'gemm' (tests/test_ops.py covers it)
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A run directory with a checkpoint of randomly initialised, non-trivial BN statistics."""
  tmp = tmp_path_factory.mktemp('eval')
  config = _config(tmp)
  workdir = tmp / 'run'
  workdir_lib.record_config(workdir, config, has_checkpoint=False, allow_config_change=False)
  model = build_model(config.model)
  tx = train_state.make_optimizer(config, total_steps=1)
  state = train_state.create_train_state(model, tx, 0)
  rng = np.random.default_rng(0)
  stats = jax.tree.map(lambda x: np.asarray(x) + rng.uniform(0.1, 0.5, x.shape).astype(np.float32),
                       state.batch_stats)
  state = state.replace(batch_stats=stats)
  manager = checkpoint.checkpoint_manager(workdir, 2)
  checkpoint.save(manager, 1, state, {'val_dice': 0.5})
  manager.wait_until_finished()
  manager.close()
  return tmp, config, workdir


def test_fold_gives_the_same_output(run):
  _, _, workdir = run
  folded, unfolded = Predictor(workdir), Predictor(workdir, fold=False)
  assert folded.deploy_model is not folded.model and unfolded.deploy_model is unfolded.model
  images = np.random.default_rng(1).normal(size=(5, 32, 32, 1)).astype(np.float32)
  a, b = folded.logits(images), unfolded.logits(images)
  assert a.shape == (5, 32, 32, 1)
  np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())


def test_evaluate_split_writes_metrics_pictures_and_nifti(run):
  _, config, workdir = run
  predictor = Predictor(workdir)
  ds = data.prepare(config.data, split_file=workdir / 'splits.json')
  out = workdir / 'eval' / 'test'
  document = evaluation.evaluate_split(predictor, ds, 'test', out, export_nifti=True)
  assert json.loads((out / 'metrics.json').read_text())['pooled'] == document['pooled']
  assert document['num_cases'] == 1 and document['checkpoint_step'] == 1
  for name in ('per_case.csv', 'overlay_best.png', 'overlay_worst.png'):
    assert (out / name).stat().st_size > 0, name
  images = tensorboard_events(workdir)['images']  # the pictures, at the checkpoint's step
  assert images['eval_test/overlay_best'] == [(1, 410, 1200)]  # 4 columns of 300, a row of 330+80
  assert set(images) == {'eval_test/overlay_best', 'eval_test/overlay_worst'}  # unet+ec: no CoA
  (case_id,) = ds.split_cases('test')
  meta = ds.case_meta(case_id)
  written = nib.load(out / 'predictions' / f'{case_id}.nii.gz')
  original = nib.load(meta.image_path)
  assert written.shape == original.shape
  np.testing.assert_allclose(written.affine, original.affine)
  assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
  # The per-case Dice is that of the exported volume against the original label.
  label = nib.load(meta.label_path).get_fdata() > 0
  pred = np.asarray(written.dataobj) > 0
  dice = 2 * np.sum(pred & label) / (np.sum(pred) + np.sum(label))
  row = (out / 'per_case.csv').read_text().splitlines()[1].split(',')
  np.testing.assert_allclose(float(row[1]), dice, rtol=1e-6)


def test_predict_scans_keeps_geometry(run):
  tmp, config, workdir = run
  ds = data.prepare(config.data, split_file=workdir / 'splits.json')
  meta = ds.case_meta(ds.split_cases('val')[0])
  written = evaluation.predict_scans(Predictor(workdir), meta.image_path, tmp / 'masks')
  mask, scan = nib.load(written[0]), nib.load(meta.image_path)
  assert mask.shape == scan.shape and mask.get_data_dtype() == np.uint8
  np.testing.assert_allclose(mask.affine, scan.affine)
  np.testing.assert_allclose(mask.header.get_zooms(), scan.header.get_zooms())


def test_bad_inputs_have_clear_messages(run, tmp_path):
  tmp, config, workdir = run
  with pytest.raises(checkpoint.WorkdirError, match='no such run directory'):
    Predictor(tmp_path / 'missing')
  other = _config(tmp)
  other.model.features = (8, 8, 8, 16, 16)
  with pytest.raises(checkpoint.WorkdirError, match=r'different model config.*\n  model.features'):
    Predictor(workdir, config=other)
  assert Predictor(workdir, config=config).step == 1  # the training config, tuples and all
  with pytest.raises(checkpoint.WorkdirError, match=r"no checkpoint '7'.*have best, latest, 1"):
    Predictor(workdir, '7')
  flat = tmp_path / 'flat.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
  with pytest.raises(data.DataError, match=r'flat.nii.gz: 2D volume of shape \(8, 8\); expected a 3D'):
    evaluation.predict_scans(Predictor(workdir), flat, tmp_path / 'out')
  assert not (tmp_path / 'out' / 'flat.nii.gz').exists()


def test_eval_command_reports_missing_workdir(tmp_path):
  result = subprocess.run([sys.executable, str(REPO / 'eval.py'), '--workdir', str(tmp_path / 'x')],
                          capture_output=True, text=True)
  assert result.returncode == 2
  assert f'error: {tmp_path / "x"}: no such run directory' in result.stderr
