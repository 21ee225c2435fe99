"""Evaluation outputs of a run, and one markdown table of several runs shaped like Table I/II.

    python -m ecm_jax.evaluate.report RUN_DIR [RUN_DIR ...] [--split test] [--out report.md]

reads each run's `config.json` (the resolved config, written by train.py) and
`eval/<split>/metrics.json` (written by eval.py), and prints one table: a row per model variant
(`config.variant`), a column group per dataset, cells the pooled DSC / sensitivity / precision in %
(eqs. 16, 15, 14). Below a run row of U-Net, Attention U-Net or EC-CaM-UNet comes the paper's
reported DSC (Table I, Section IV-E) in the dataset columns the paper has.

Dataset columns, from `config.data`: nih_pancreas -> TCIA; msd with modality ct -> MSD (Task07
Pancreas); msd with modality mri -> Cardiac (Task02 Heart); kits19 -> KiTS; any other dataset
(e.g. synthetic) keeps its name and has no paper numbers.

`eval/<split>/metrics.json`, built by `metrics_document` and written by `write_eval_outputs`:

    {
      "split": "test",
      "checkpoint_step": 12000,      # step of the evaluated checkpoint, or null
      "num_cases": 30,               # volumes evaluated
      "num_slices": 4512,            # 2D slices evaluated, with and without foreground
      "pooled": {                    # the paper's numbers: counts pooled over all slices' pixels
        "dice": 0.95, "sensitivity": 0.96, "precision": 0.94,   # eqs. (16), (15), (14)
        "tp": 123, "fp": 4, "fn": 5, "tn": 678},
      "per_slice": {                 # over the slices with ground-truth foreground only
        "num_slices": 1234, "dice": S, "sensitivity": S, "precision": S},
      "per_case": {                  # 3D, on each reassembled volume
        "dice": S, "sensitivity": S, "precision": S},
      "hd95_mm": S                   # per-case 3D HD95 in millimetres (voxel spacing)
    }
    S = {"mean": m, "std": s, "median": q, "count": n_present, "missing": n_missing}

Ratios are fractions in [0, 1]; std is the population std (ddof 0). Undefined values (see the
empty-mask rules in `ecm_jax.evaluate.metrics`) are missing: skipped by the summaries, counted in
"missing", written as null (the file is strict JSON). `per_case.csv` beside it has one row per
case: the columns of the case rows given (e.g. case, dice, sensitivity, precision, hd95_mm),
missing values left empty.
"""

from collections.abc import Mapping, Sequence
import csv
import dataclasses
import io
import json
import math
import pathlib
import sys

import numpy as np

from ecm_jax import files, tables
from ecm_jax.errors import UserError
from ecm_jax.evaluate import metrics

PAPER_DATASETS = ('TCIA', 'MSD', 'KiTS', 'Cardiac')  # Table I's column order
# Table I (Section IV-E): DSC % reported by the paper, by variant.
PAPER_DSC = {
    'unet': ('U-Net', {'TCIA': 67.80, 'MSD': 65.35, 'KiTS': 93.83, 'Cardiac': 74.41}),
    'attention_unet': ('Attention U-Net',
                       {'TCIA': 71.37, 'MSD': 70.01, 'KiTS': 94.45, 'Cardiac': 74.61}),
    'ec_cam_unet': ('EC-CaM-UNet', {'TCIA': 72.64, 'MSD': 71.68, 'KiTS': 95.02, 'Cardiac': 79.32}),
}
CELL_METRICS = (('dice', 'DSC'), ('sensitivity', 'Sens.'), ('precision', 'Prec.'))
NOT_AVAILABLE = '–'


class ReportError(UserError):
  """A run folder cannot be reported (no config, no eval metrics, malformed files, ...)."""


# --- The eval outputs -----------------------------------------------------------------------------

def _missing_as_none(value):
  if isinstance(value, Mapping):
    return {k: _missing_as_none(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def metrics_document(slice_counts, case_rows: Sequence[Mapping], *, split: str,
                     checkpoint_step: int | None = None) -> dict:
  """The `metrics.json` content (schema in the module docstring) of one evaluated split.

  `slice_counts` (N, 4): (TP, FP, FN, TN) of every evaluated slice (`metrics.example_counts_jnp`
  rows of real slices); `case_rows`: one `metrics.case_metrics` dict per case (extra keys allowed).
  """
  slice_counts = np.asarray(slice_counts, np.int64).reshape(-1, len(metrics.COUNT_FIELDS))
  pooled = metrics.pool_counts([slice_counts])
  document = {
      'split': split,
      'checkpoint_step': None if checkpoint_step is None else int(checkpoint_step),
      'num_cases': len(case_rows),
      'num_slices': len(slice_counts),
      'pooled': {**metrics.pooled_metrics(pooled),
                 **{name: int(n) for name, n in zip(metrics.COUNT_FIELDS, pooled)}},
      'per_slice': metrics.foreground_slice_summary(slice_counts),
      'per_case': metrics.summarise(case_rows, metrics.RATIO_METRICS),
      'hd95_mm': metrics.summarise_values(row['hd95_mm'] for row in case_rows),
  }
  return _missing_as_none(document)


def _csv_cell(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ''
  return str(value)


def write_eval_outputs(eval_dir, document: Mapping,
                       case_rows: Sequence[Mapping]) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `metrics.json` (`document`) and `per_case.csv` (`case_rows`) atomically into `eval_dir`.

  Returns both paths.
  """
  eval_dir = pathlib.Path(eval_dir)
  table = io.StringIO()
  writer = csv.writer(table, lineterminator='\n')
  columns = list(case_rows[0]) if case_rows else ['case', *metrics.CASE_METRICS]
  writer.writerow(columns)
  for row in case_rows:
    if list(row) != columns:
      raise ValueError(f'case rows must share their columns: {list(row)} vs {columns}')
    writer.writerow([_csv_cell(row[c]) for c in columns])
  metrics_path, csv_path = eval_dir / 'metrics.json', eval_dir / 'per_case.csv'
  files.write_text(metrics_path, json.dumps(document, indent=2, allow_nan=False) + '\n')
  files.write_text(csv_path, table.getvalue())
  return metrics_path, csv_path


def _percent(value) -> str:
  return NOT_AVAILABLE if value is None else f'{100 * value:.2f}'


def _mean_std(summary: Mapping, scale: float, decimals: int) -> str:
  if summary['mean'] is None:
    text = NOT_AVAILABLE
  else:
    text = f'{scale * summary["mean"]:.{decimals}f} ± {scale * summary["std"]:.{decimals}f}'
  return text + (f' ({summary["missing"]} missing)' if summary['missing'] else '')


def summary_table(document: Mapping) -> str:
  """A markdown summary of one `metrics_document`: pooled, per-slice and per-case rows."""
  header = (f'{document["split"]}: {document["num_cases"]} cases, '
            f'{document["num_slices"]} slices', 'DSC %', 'Sensitivity %', 'Precision %', 'HD95 mm')
  ratio_names = metrics.RATIO_METRICS
  rows = [
      ('pooled over all slices (paper, eqs. 14-16)',
       *(_percent(document['pooled'][m]) for m in ratio_names), NOT_AVAILABLE),
      (f'per slice with foreground ({document["per_slice"]["num_slices"]}), mean ± std',
       *(_mean_std(document['per_slice'][m], 100, 2) for m in ratio_names), NOT_AVAILABLE),
      ('per case (3D), mean ± std',
       *(_mean_std(document['per_case'][m], 100, 2) for m in ratio_names),
       _mean_std(document['hd95_mm'], 1, 2)),
  ]
  return tables.markdown_table(header, rows, 'lrrrr') + '\n'


# --- Collecting runs ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunResult:
  run_dir: pathlib.Path
  variant: str
  dataset: str  # table column group, see `dataset_column`
  pooled: Mapping[str, float | None]  # dice, sensitivity, precision


def dataset_column(data_config: Mapping) -> str:
  """The Table I column of a run's `config.data` (mapping in the module docstring)."""
  dataset = data_config['dataset']
  if dataset == 'nih_pancreas':
    return 'TCIA'
  if dataset == 'kits19':
    return 'KiTS'
  if dataset == 'msd':
    return 'Cardiac' if data_config['modality'] == 'mri' else 'MSD'
  return dataset


def _read_json(path: pathlib.Path, run_dir: pathlib.Path, missing: str) -> dict:
  if not path.is_file():
    raise ReportError(f'{run_dir}: {missing} ({path} not found)')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ReportError(f'{path}: not valid JSON ({e.msg} at line {e.lineno})') from e


def _field(tree: Mapping, dotted: str, path: pathlib.Path):
  value = tree
  for key in dotted.split('.'):
    if not isinstance(value, Mapping) or key not in value:
      raise ReportError(f'{path}: missing "{dotted}"')
    value = value[key]
  return value


def load_run(run_dir, split: str = 'test') -> RunResult:
  """The variant, dataset column and pooled metrics of one evaluated run folder."""
  run_dir = pathlib.Path(run_dir)
  if not run_dir.is_dir():
    raise ReportError(f'{run_dir}: no such run folder')
  config_path = run_dir / 'config.json'
  config = _read_json(config_path, run_dir, 'no config.json, not a training run folder')
  metrics_path = run_dir / 'eval' / split / 'metrics.json'
  document = _read_json(metrics_path, run_dir,
                        f'no eval metrics for split "{split}"; run eval.py on it first')
  data_config = {'dataset': _field(config, 'data.dataset', config_path),
                 'modality': _field(config, 'data.modality', config_path)}
  return RunResult(run_dir=run_dir, variant=_field(config, 'variant', config_path),
                   dataset=dataset_column(data_config),
                   pooled={m: _field(document, f'pooled.{m}', metrics_path)
                           for m, _ in CELL_METRICS})


def results_table(results: Sequence[RunResult], split: str) -> str:
  """One markdown table: rows = variants (first-seen order), column groups = datasets, cells in %.

  Datasets in Table I's order, then any others by name.
  """
  def column_order(dataset: str) -> tuple[int, str]:
    in_paper = dataset in PAPER_DATASETS
    return (PAPER_DATASETS.index(dataset) if in_paper else len(PAPER_DATASETS), dataset)

  datasets = sorted({r.dataset for r in results}, key=column_order)
  cells: dict[tuple[str, str], RunResult] = {}
  for r in results:
    if (r.variant, r.dataset) in cells:
      raise ReportError(f'{cells[r.variant, r.dataset].run_dir} and {r.run_dir} are both '
                        f'{r.variant} on {r.dataset}; give one run per variant and dataset')
    cells[r.variant, r.dataset] = r
  variants = list(dict.fromkeys(r.variant for r in results))

  columns = [f'{dataset} {label}' for dataset in datasets for _, label in CELL_METRICS]
  rows = []
  for variant in variants:
    row = [variant]
    for dataset in datasets:
      run = cells.get((variant, dataset))
      row += [NOT_AVAILABLE if run is None else _percent(run.pooled[m]) for m, _ in CELL_METRICS]
    rows.append(row)
    paper_name, paper_dsc = PAPER_DSC.get(variant, (None, {}))
    if any(d in paper_dsc for d in datasets):
      row = [f'{paper_name} (paper, DSC)']
      for dataset in datasets:
        dsc = f'{paper_dsc[dataset]:.2f}' if dataset in paper_dsc else NOT_AVAILABLE
        row += [dsc] + [NOT_AVAILABLE] * (len(CELL_METRICS) - 1)
      rows.append(row)
  return (f'Pooled DSC / sensitivity / precision (%) on the {split} split, over all pixels of all '
          f'slices (eqs. 16, 15, 14).\n\n'
          + tables.markdown_table(['Model', *columns], rows, 'l' + 'r' * len(columns)) + '\n')


def write_results_table(run_dirs: Sequence, split: str = 'test', out=None) -> str:
  """The table of `results_table` for `run_dirs`, printed, and written to `out` if given."""
  table = results_table([load_run(d, split) for d in run_dirs], split)
  sys.stdout.write(table)
  if out is not None:
    files.write_text(out, table)
  return table


if __name__ == '__main__':
  from absl import flags

  from ecm_jax import cli

  _SPLIT = flags.DEFINE_enum('split', 'test', ['val', 'test'], 'Evaluated split.')
  _OUT = flags.DEFINE_string('out', None, 'Also write the table to this markdown file.')

  def main(argv):
    if len(argv) < 2:
      raise flags.Error('give one or more evaluated run folders: python -m '
                        'ecm_jax.evaluate.report RUN_DIR [RUN_DIR ...] [--split test] [--out F]')
    write_results_table(argv[1:], _SPLIT.value, _OUT.value)

  cli.run(main, UserError, positional=True)
