"""The eval outputs (metrics.json, per_case.csv) and the Table I/II-shaped report of fake runs."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from ecm_jax.evaluate import metrics, report
from helpers import REPO

# Four slices: TP, FP, FN, TN. Pooled: TP 15, FP 6, FN 8 -> DSC 30/44, sens 15/23, prec 15/21.
SLICE_COUNTS = np.array([[10, 2, 3, 100], [0, 0, 0, 115], [0, 4, 0, 111], [5, 0, 5, 105]])
CASE_ROWS = [
    {'case': 'case_00001', 'dice': 0.8, 'sensitivity': 0.9, 'precision': 0.7, 'hd95_mm': 3.0},
    {'case': 'case_00002', 'dice': 0.0, 'sensitivity': 0.0, 'precision': math.nan,
     'hd95_mm': math.nan},
]


def fake_run(root, name, *, variant, dataset, modality='ct', pooled=None):
  """A run folder as train.py + eval.py leave it: config.json and eval/test/metrics.json."""
  run = root / name
  run.mkdir()
  config = {'variant': variant, 'model': {'name': 'ec_cam_unet'},
            'data': {'dataset': dataset, 'modality': modality}}
  (run / 'config.json').write_text(json.dumps(config))
  document = report.metrics_document(SLICE_COUNTS, CASE_ROWS, split='test', checkpoint_step=100)
  if pooled is not None:
    document['pooled'].update(pooled)
  report.write_eval_outputs(run / 'eval' / 'test', document, CASE_ROWS)
  return run


def test_metrics_document_follows_the_schema():
  document = report.metrics_document(SLICE_COUNTS, CASE_ROWS, split='test', checkpoint_step=100)
  assert document['split'] == 'test' and document['checkpoint_step'] == 100
  assert document['num_cases'] == 2 and document['num_slices'] == 4
  assert document['pooled'] == {'dice': pytest.approx(30 / 44, rel=1e-12),
                                'sensitivity': pytest.approx(15 / 23, rel=1e-12),
                                'precision': pytest.approx(15 / 21, rel=1e-12),
                                'tp': 15, 'fp': 6, 'fn': 8, 'tn': 431}
  assert document['per_slice']['num_slices'] == 2  # slices 0 and 3 have ground truth
  assert document['per_slice']['dice']['mean'] == pytest.approx((20 / 25 + 10 / 15) / 2, rel=1e-12)
  assert document['per_case']['dice'] == {'mean': 0.4, 'std': 0.4, 'median': 0.4, 'count': 2,
                                          'missing': 0}
  assert document['per_case']['precision'] == {'mean': 0.7, 'std': 0.0, 'median': 0.7, 'count': 1,
                                               'missing': 1}
  assert document['hd95_mm'] == {'mean': 3.0, 'std': 0.0, 'median': 3.0, 'count': 1, 'missing': 1}
  no_hd95 = report.metrics_document(SLICE_COUNTS, CASE_ROWS[1:], split='val')
  assert no_hd95['hd95_mm'] == {'mean': None, 'std': None, 'median': None, 'count': 0, 'missing': 1}


def test_write_eval_outputs_strict_json_and_csv_with_empty_missing_cells(tmp_path):
  document = report.metrics_document(SLICE_COUNTS, CASE_ROWS, split='test')
  metrics_path, csv_path = report.write_eval_outputs(tmp_path / 'eval' / 'test', document,
                                                     CASE_ROWS)
  assert json.loads(metrics_path.read_text(), parse_constant=pytest.fail) == document  # no NaN
  with csv_path.open() as f:
    rows = list(csv.reader(f))
  assert rows == [['case', *metrics.CASE_METRICS], ['case_00001', '0.8', '0.9', '0.7', '3.0'],
                  ['case_00002', '0.0', '0.0', '', '']]
  assert sorted(p.name for p in metrics_path.parent.iterdir()) == ['metrics.json', 'per_case.csv']


def test_summary_table_shows_pooled_per_slice_and_per_case_rows():
  table = report.summary_table(report.metrics_document(SLICE_COUNTS, CASE_ROWS, split='test'))
  lines = table.splitlines()
  assert lines[0] == '| test: 2 cases, 4 slices | DSC % | Sensitivity % | Precision % | HD95 mm |'
  assert lines[2] == '| pooled over all slices (paper, eqs. 14-16) | 68.18 | 65.22 | 71.43 | – |'
  assert lines[4] == ('| per case (3D), mean ± std | 40.00 ± 40.00 | 45.00 ± 45.00 '
                      '| 70.00 ± 0.00 (1 missing) | 3.00 ± 0.00 (1 missing) |')


def test_report_table_rows_variants_columns_datasets_with_paper_reference(tmp_path, capsys):
  runs = [fake_run(tmp_path, 'kits_unet', variant='unet', dataset='kits19',
                   pooled={'dice': 0.9, 'sensitivity': 0.95, 'precision': 0.875}),
          fake_run(tmp_path, 'heart_unet', variant='unet', dataset='msd', modality='mri',
                   pooled={'dice': 0.7, 'sensitivity': 0.75, 'precision': 0.8}),
          fake_run(tmp_path, 'kits_coa', variant='unet+coa', dataset='kits19',
                   pooled={'dice': 0.925, 'sensitivity': 0.5, 'precision': 0.25}),
          fake_run(tmp_path, 'demo', variant='unet+coa', dataset='synthetic',
                   pooled={'dice': 0.5, 'sensitivity': None, 'precision': 1.0})]
  out = tmp_path / 'report.md'
  report.write_results_table(runs, out=out)
  printed = capsys.readouterr().out
  assert out.read_text() == printed
  assert printed.splitlines()[2:] == [
      '| Model | KiTS DSC | KiTS Sens. | KiTS Prec. | Cardiac DSC | Cardiac Sens. | Cardiac Prec. '
      '| synthetic DSC | synthetic Sens. | synthetic Prec. |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
      '| unet | 90.00 | 95.00 | 87.50 | 70.00 | 75.00 | 80.00 | – | – | – |',
      '| U-Net (paper, DSC) | 93.83 | – | – | 74.41 | – | – | – | – | – |',
      '| unet+coa | 92.50 | 50.00 | 25.00 | – | – | – | 50.00 | – | 100.00 |',
  ]


def test_dataset_columns_follow_the_paper():
  assert report.dataset_column({'dataset': 'nih_pancreas', 'modality': 'ct'}) == 'TCIA'
  assert report.dataset_column({'dataset': 'msd', 'modality': 'ct'}) == 'MSD'
  assert report.dataset_column({'dataset': 'msd', 'modality': 'mri'}) == 'Cardiac'
  assert report.dataset_column({'dataset': 'kits19', 'modality': 'ct'}) == 'KiTS'
  assert report.dataset_column({'dataset': 'synthetic', 'modality': 'ct'}) == 'synthetic'


def test_run_without_eval_metrics_is_named_in_the_error(tmp_path):
  run = fake_run(tmp_path, 'evaluated', variant='unet', dataset='kits19')
  bare = tmp_path / 'not_evaluated'
  bare.mkdir()
  (bare / 'config.json').write_text((run / 'config.json').read_text())
  out = tmp_path / 'report.md'
  # The command line: one error line, exit status 2, nothing written.
  command = [sys.executable, '-m', 'ecm_jax.evaluate.report', str(run), str(bare), '--out', str(out)]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {bare}: no eval metrics for split "test"; run eval.py on it first '
      f'({bare}/eval/test/metrics.json not found)')
  assert 'Traceback' not in result.stderr
  assert not out.exists()
  with pytest.raises(report.ReportError, match=f'^{run}: no eval metrics for split "val"'):
    report.write_results_table([run], split='val')
  with pytest.raises(report.ReportError, match=f'^{tmp_path / "missing"}: no such run folder$'):
    report.load_run(tmp_path / 'missing')


def test_malformed_files_and_duplicate_cells_raise_clear_errors(tmp_path):
  run = fake_run(tmp_path, 'a', variant='unet', dataset='kits19')
  twin = fake_run(tmp_path, 'b', variant='unet', dataset='kits19')
  with pytest.raises(report.ReportError,
                     match=f'^{run} and {twin} are both unet on KiTS; give one run per variant and '
                           f'dataset$'):
    report.results_table([report.load_run(run), report.load_run(twin)], 'test')
  metrics_path = twin / 'eval' / 'test' / 'metrics.json'
  metrics_path.write_text(json.dumps({'pooled': {'dice': 0.5}}))
  with pytest.raises(report.ReportError, match=f'^{metrics_path}: missing "pooled.sensitivity"$'):
    report.load_run(twin)
  metrics_path.write_text('{"pooled": ')
  with pytest.raises(report.ReportError, match=f'^{metrics_path}: not valid JSON '):
    report.load_run(twin)
