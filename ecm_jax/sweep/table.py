"""The table of a sweep, from its finished runs' own files.

Per row: the mean ± sd over seeds (sd with ddof 1; none for one seed) of each seed's test figures
in `eval/test/metrics.json` (pooled DSC / sensitivity / precision, eqs. 16, 15, 14; per-case 3D
Dice and HD95, each averaged over the cases), the parameters and forward GFLOPs of one image
(`ecm_jax.models.summary`, at the run's image size), and the train time (`train_seconds` of
`sweep_run.json`). Per row but the baseline, the difference of per-case 3D Dice from the baseline
row: each case's Dice (`per_case.csv`) averaged over the row's seeds, minus the same for the
baseline, averaged over the cases both rows have, with a paired bootstrap 95 % interval (cases
resampled with replacement, `BOOTSTRAP_RESAMPLES` times, generator seed `BOOTSTRAP_SEED`) and the
two-sided Wilcoxon signed-rank p-value over the cases (exact for few cases; zero differences
dropped). With n cases no p-value can be below 2 / 2^n.

Written atomically into the sweep folder: table.md (the table and how to read it), table.csv (its
figures unrounded, a line per row), table.json (the rows, and each run's own figures), dice.png
(per row, each seed's DSC and 3D Dice, and their mean ± sd).
"""

from collections.abc import Sequence
import csv
import dataclasses
import io
import json
import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import ml_collections
import numpy as np
from scipy import stats

from ecm_jax import files, tables
from ecm_jax.data import synthetic
from ecm_jax.errors import UserError
from ecm_jax.models import summary
from ecm_jax.sweep import runs as runs_lib

# (key, column, path in metrics.json, scale to the column's unit)
METRICS = (
    ('dsc', 'DSC %', ('pooled', 'dice'), 100),
    ('sensitivity', 'Sens. %', ('pooled', 'sensitivity'), 100),
    ('precision', 'Prec. %', ('pooled', 'precision'), 100),
    ('dice_3d', '3D Dice %', ('per_case', 'dice', 'mean'), 100),
    ('hd95_mm', 'HD95 mm', ('hd95_mm', 'mean'), 1),
)
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MISSING = '–'


class TableError(UserError):
  """A finished run's files cannot be read (named in the message)."""


@dataclasses.dataclass(frozen=True)
class RunFigures:
  """What the table takes from one finished run."""
  row: str
  seed: int
  folder: str
  metrics: dict  # METRICS keys -> value in the column's unit, or None when missing
  case_dice: dict  # case -> 3D Dice %, the cases whose Dice is defined
  train_seconds: float
  eval_seconds: float
  num_cases: int


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise TableError(f'{path}: cannot be read ({e}); run the sweep again to redo the run') from e


def read_run(run: runs_lib.Run) -> RunFigures:
  eval_dir = run.folder / 'eval' / runs_lib.SPLIT
  document = _read_json(eval_dir / 'metrics.json')
  values = {}
  for key, _, path, scale in METRICS:
    value = document
    for part in path:
      if not isinstance(value, dict) or part not in value:
        raise TableError(f'{eval_dir / "metrics.json"}: no "{".".join(path)}"; run eval.py on '
                         f'{run.folder} again')
      value = value[part]
    values[key] = None if value is None else scale * value
  with open(eval_dir / 'per_case.csv', newline='') as f:
    case_dice = {r['case']: 100 * float(r['dice']) for r in csv.DictReader(f) if r['dice']}
  state = runs_lib.read_state(run.folder)
  return RunFigures(run.row, run.seed, str(run.folder), values, case_dice, state['train_seconds'],
                    state['eval_seconds'], document['num_cases'])


def mean_sd(values: Sequence[float | None]) -> dict:
  """{'mean', 'sd' (ddof 1; None for fewer than two), 'n'} of the values that are not None."""
  present = [v for v in values if v is not None]
  return {'mean': float(np.mean(present)) if present else None,
          'sd': float(np.std(present, ddof=1)) if len(present) > 1 else None, 'n': len(present)}


def paired_difference(row: Sequence[RunFigures], baseline: Sequence[RunFigures]) -> dict | None:
  """Per-case 3D Dice of `row` minus `baseline`, seeds averaged first (module doc); None when the
  two have no case in common."""
  runs = [*row, *baseline]
  cases = sorted(set.intersection(*(set(r.case_dice) for r in runs)))
  if not cases:
    return None

  def average(figures):
    return np.array([np.mean([r.case_dice[case] for r in figures]) for case in cases])

  d = average(row) - average(baseline)
  rng = np.random.default_rng(BOOTSTRAP_SEED)
  means = d[rng.integers(0, len(d), (BOOTSTRAP_RESAMPLES, len(d)))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  p = float(stats.wilcoxon(d).pvalue) if np.any(d) else 1.0
  return {'cases': len(cases), 'mean': float(d.mean()), 'ci95': [float(low), float(high)],
          'p_wilcoxon': p}


def model_cost(config: dict) -> tuple[int, float]:
  """Parameters and forward GFLOPs per image of a run's recorded config, as the summary table
  (`ecm_jax.models.summary`, where they are computed) prints them."""
  image_size = config['data']['image_size']
  line = summary.summary_table({config['variant']: ml_collections.ConfigDict(config['model'])},
                               image_size).splitlines()[-1]
  cells = [cell.strip() for cell in line.strip('| ').split('|')]
  return int(cells[2].replace(',', '')), float(cells[3])


def _cell(summary: dict, seeds: int, decimals: int = 2) -> str:
  """'mean ± sd', '(k of n seeds)' added where some seeds have no value."""
  if summary['mean'] is None:
    return MISSING
  text = f'{summary["mean"]:.{decimals}f}'
  if summary['sd'] is not None:
    text += f' ± {summary["sd"]:.{decimals}f}'
  return text + (f' ({summary["n"]} of {seeds} seeds)' if summary['n'] < seeds else '')


def _budget(config: dict) -> str:
  t, d = config['train'], config['data']
  length = f'{t["max_steps"]} steps' if t['max_steps'] else f'{t["num_epochs"]} epochs'
  return (f'{length} of batch {t["batch_size"]}, lr {t["learning_rate"]:g}, '
          f'{d["image_size"]}x{d["image_size"]} slices')


def _plot(summaries: Sequence[dict], figures: Sequence[RunFigures], out_png: pathlib.Path,
          subtitle: str) -> None:
  """Per row, each seed's pooled DSC and 3D Dice (points) and their mean ± sd (black)."""
  names = [s['row'] for s in summaries]
  fig = Figure(figsize=(max(6.0, 1.4 + 0.9 * len(names)), 7.5), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  for ax, key, title in zip(fig.subplots(2, 1, sharex=True), ('dsc', 'dice_3d'),
                            ('pooled DSC %', 'per-case 3D Dice %')):
    for x, s in enumerate(summaries):
      seeds = [r.metrics[key] for r in figures if r.row == s['row'] and r.metrics[key] is not None]
      ax.plot([x - 0.1] * len(seeds), seeds, 'o', color='C0', alpha=0.6, markersize=5,
              label='a seed' if x == 0 else None)
      if s[key]['mean'] is not None:
        ax.errorbar(x + 0.1, s[key]['mean'], yerr=s[key]['sd'] or 0, fmt='_', color='k',
                    markersize=16, capsize=6, label='mean ± sd' if x == 0 else None)
    ax.set(ylabel=title, xlim=(-0.6, len(names) - 0.4))
    ax.grid(axis='y', alpha=0.3)
    ax.legend(loc='lower right')
  ax.set_xticks(range(len(names)), names, rotation=30, ha='right')
  fig.suptitle(f'Test split, per row over seeds\n{subtitle}')
  with files.atomic_path(out_png) as temporary:
    fig.savefig(temporary, format='png')


def _duration(seconds: float) -> str:
  minutes = round(seconds / 60)
  return f'{minutes // 60} h {minutes % 60:02d} min' if minutes >= 60 else f'{minutes} min'


def summarise(figures: Sequence[RunFigures], configs: dict, rows: Sequence[str],
              baseline: str) -> list[dict]:
  """Per row (in order): seeds, mean_sd of each metric and of the train minutes, params, GFLOPs
  (from the row's recorded config in `configs`) and the `paired_difference` from `baseline`."""
  by_row = {row: [f for f in figures if f.row == row] for row in rows}
  summaries = []
  for row in rows:
    ran = by_row[row]
    s = {'row': row, 'seeds': [r.seed for r in ran]}
    for key, *_ in METRICS:
      s[key] = mean_sd([r.metrics[key] for r in ran])
    s['train_minutes'] = mean_sd([r.train_seconds / 60 for r in ran])
    s['params'], s['gflops'] = model_cost(configs[row]) if ran else (None, None)
    s['vs_baseline'] = (paired_difference(ran, by_row[baseline])
                        if ran and by_row[baseline] and row != baseline else None)
    summaries.append(s)
  return summaries


def _markdown_rows(summaries: Sequence[dict], baseline: str) -> tuple[list[str], list[list]]:
  header = ['Row', 'Seeds', *(label for _, label, *_ in METRICS), 'Params', 'GFLOPs', 'Train min',
            f'Δ 3D Dice vs {baseline}, pp [95 % CI]', 'p']
  lines = []
  for s in summaries:
    delta, seeds = s['vs_baseline'], len(s['seeds'])
    if delta is None:
      difference, p = ('baseline' if s['row'] == baseline else MISSING), MISSING
    else:
      low, high = delta['ci95']
      difference = f'{delta["mean"]:+.2f} [{low:+.2f}, {high:+.2f}]'
      p = f'{delta["p_wilcoxon"]:.3f}'
    lines.append([s['row'], seeds, *(_cell(s[key], seeds) for key, *_ in METRICS),
                  MISSING if s['params'] is None else f'{s["params"]:,}',
                  MISSING if s['gflops'] is None else f'{s["gflops"]:.2f}',
                  _cell(s['train_minutes'], seeds, 1), difference, p])
  return header, lines


def _explanation(cases: int, baseline: str) -> str:
  power = ''
  if cases:
    power = f' With {cases} cases no p can be below {2 / 2 ** cases:.3g}' + (
        ': the test cannot show any difference at 0.05.' if 2 / 2 ** cases > 0.05 else '.')
  return (f'Mean ± sd over seeds (sd with ddof 1) of each seed\'s test figures: DSC, sensitivity '
          f'and precision pooled over all pixels of the test slices (eqs. 16, 15, 14); 3D Dice and '
          f'HD95 per case, averaged over the {cases} cases. Params and GFLOPs: the network, one '
          f'image forward. Train min: wall time of train.py per seed (start-up, compilation, '
          f'validation included). Δ: per-case 3D Dice of the row minus `{baseline}`, each case '
          f'averaged over seeds first, mean over the cases with a paired bootstrap 95 % interval '
          f'({BOOTSTRAP_RESAMPLES:,} resamples of the cases, seed {BOOTSTRAP_SEED}); p: two-sided '
          f'Wilcoxon signed-rank test over the cases.{power}')


def _csv(summaries: Sequence[dict]) -> str:
  text = io.StringIO()
  writer = csv.writer(text, lineterminator='\n')
  writer.writerow(['row', 'seeds', *(f'{key}_{m}' for key, *_ in METRICS for m in ('mean', 'sd')),
                   'params', 'gflops', 'train_minutes_mean', 'train_minutes_sd', 'cases',
                   'delta_dice_3d', 'delta_ci95_low', 'delta_ci95_high', 'p_wilcoxon'])
  for s in summaries:
    delta = s['vs_baseline'] or {'cases': None, 'mean': None, 'ci95': [None, None],
                                 'p_wilcoxon': None}
    writer.writerow(['' if v is None else v for v in [
        s['row'], len(s['seeds']), *(s[key][m] for key, *_ in METRICS for m in ('mean', 'sd')),
        s['params'], s['gflops'], s['train_minutes']['mean'], s['train_minutes']['sd'],
        delta['cases'], delta['mean'], *delta['ci95'], delta['p_wilcoxon']]])
  return text.getvalue()


def _data_description(data: dict) -> str:
  """The data a sweep ran on: the dataset folder and the labels merged into the target."""
  if data['dataset'] == 'synthetic':
    return synthetic.NAME
  labels = ', '.join(map(str, data['foreground_labels']))
  return f'{pathlib.Path(data["root"]).name} ({data["dataset"]}, foreground labels {labels})'


def write(out: pathlib.Path, finished: Sequence[runs_lib.Run], rows: Sequence[str],
          baseline: str, command: str) -> str:
  """table.md, table.csv, table.json and dice.png of the `finished` runs into `out`; returns the
  markdown. `rows`: the table's order; `command`: how the sweep was asked for (shown)."""
  figures = [read_run(run) for run in finished]
  configs = {}
  for run in finished:
    configs.setdefault(run.row, _read_json(run.folder / 'config.json'))
  summaries = summarise(figures, configs, rows, baseline)

  config = next(iter(configs.values()), None)
  cases = max((f.num_cases for f in figures), default=0)
  dataset = MISSING if config is None else _data_description(config['data'])
  subtitle = f'{dataset}, {cases} test cases, {len(figures)} run{"s" * (len(figures) != 1)}'
  train, evaluation = (sum(f.train_seconds for f in figures), sum(f.eval_seconds for f in figures))
  header, lines = _markdown_rows(summaries, baseline)
  text = '\n'.join([
      f'# Sweep `{pathlib.Path(out).name}`: {subtitle}', '', f'`{command}`', '',
      f'Budget: {MISSING if config is None else _budget(config)}. Wall time of the runs: '
      f'{_duration(train)} training, {_duration(evaluation)} evaluation.', '',
      tables.markdown_table(header, lines, 'll' + 'r' * (len(header) - 2)), '',
      _explanation(cases, baseline), ''])

  files.write_text(out / 'table.md', text)
  files.write_text(out / 'table.csv', _csv(summaries))
  files.write_json(out / 'table.json', {
      'command': command, 'split': runs_lib.SPLIT, 'baseline': baseline,
      'bootstrap': {'resamples': BOOTSTRAP_RESAMPLES, 'seed': BOOTSTRAP_SEED},
      'rows': summaries, 'runs': [dataclasses.asdict(f) for f in figures]})
  if figures:
    _plot(summaries, figures, out / 'dice.png', subtitle)
  return text
