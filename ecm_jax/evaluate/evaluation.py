"""Evaluation of a trained run on a split, and prediction on new scans (what eval.py runs).

Metrics (see ecm_jax/evaluate/metrics.py for the empty-mask rules):
- pooled DSC / sensitivity / precision over every pixel of the split's slices at the network's
  resolution (`data.image_size`): the paper's eqs. (14)-(16);
- per-slice means over slices with foreground;
- per case, on the volume reassembled in its original geometry (predictions resized back to the
  original in-plane size with nearest neighbour, against the original label after the label
  mapping): 3D Dice, sensitivity, precision and HD95 in mm with the file's voxel spacing.

In a multi-process job (eval.py started like train.py, `ecm_jax.cluster`) each process predicts
every `process_count`-th case on its own devices; the per-slice counts and per-case metrics are
then gathered bit for bit, so the figures are those of one process, and process 0 writes them.
"""

import pathlib

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from ecm_jax import data, files
from ecm_jax.data import dicom, preprocess, readers, synthetic
from ecm_jax.evaluate import metrics, plots, report
from ecm_jax.evaluate.inference import Predictor
from ecm_jax.train import logs

NUM_PICTURE_SLICES = 4  # best and worst test slices shown in the overlay pictures


def _write_prediction_atomic(mask_slices, meta, out_path: pathlib.Path) -> None:
  with files.atomic_path(out_path) as temporary:
    data.write_prediction(mask_slices, meta, temporary)


def _original_label(meta, config) -> np.ndarray:
  """The case's label slices (N,H,W) at original resolution, after the label mapping."""
  files = readers.CaseFiles(meta.case_id, pathlib.Path(meta.image_path),
                            pathlib.Path(meta.label_path))
  _, label_stack, _ = readers.read_case(files, config)
  return preprocess.map_labels(label_stack, config, files.label)


def evaluate_split(predictor: Predictor, ds, split: str, out_dir: pathlib.Path, *,
                   export_nifti: bool = False) -> dict:
  """Predicts every case of `split`, writes metrics.json, per_case.csv and pictures to `out_dir`
  (each process exports its own cases' masks with `export_nifti`; the rest is process 0's).

  Returns the metrics document (`report.metrics_document`), on every process.
  """
  config = predictor.config
  cases = ds.split_cases(split)
  if not cases:
    raise data.DataError(f'the {split} split of {ds} has no cases')
  if export_nifti:
    (out_dir / 'predictions').mkdir(parents=True, exist_ok=True)
  own = {}  # case id -> (per-slice counts (N, 4), case metrics) of this process's cases
  # disable=None: a bar on a terminal only, no carriage returns in log files.
  for case_id in tqdm(cases[jax.process_index()::jax.process_count()], desc=f'eval {split}',
                      unit='case', disable=None if jax.process_index() == 0 else True):
    meta = ds.case_meta(case_id)
    images, labels = ds.case_arrays(case_id)
    pred = predictor.predict(np.asarray(images))
    original_pred = preprocess.resize_nearest(pred, meta.in_plane_shape)
    own[case_id] = (metrics.confusion_counts(pred, labels, axis=(1, 2)),
                    metrics.case_metrics(original_pred, _original_label(meta, config.data),
                                         meta.stack_spacing))
    if export_nifti:
      _write_prediction_atomic(pred, meta, out_dir / 'predictions' / f'{case_id}.nii.gz')
  counts_per_case, case_rows = _gather_cases(ds, cases, own)
  slice_counts = np.concatenate(counts_per_case)
  document = report.metrics_document(slice_counts, case_rows, split=split,
                                     checkpoint_step=predictor.step)
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_eval_outputs(out_dir, document, case_rows)
    pictures = [(case_id, k, counts[k])
                for case_id, counts in zip(cases, counts_per_case) for k in range(len(counts))]
    written = _pictures(predictor, ds, pictures, slice_counts, out_dir)
    logs.add_images(predictor.workdir, predictor.step,
                    {f'eval_{split}/{path.stem}': path for path in written})
  return document


def _allgather_bits(array: np.ndarray) -> np.ndarray:
  """(process_count, *array.shape): every process's `array` (same shape and dtype everywhere),
  exactly: 64-bit values travel as pairs of uint32 (JAX arrays are 32-bit by default)."""
  words = np.ascontiguousarray(array).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(words))
  return gathered.view(array.dtype).reshape(len(gathered), *array.shape)


def _gather_cases(ds, cases, own) -> tuple[list[np.ndarray], list[dict]]:
  """Per case of `cases` (in order): its per-slice counts and its metrics row, from the process
  that evaluated it."""
  if jax.process_count() == 1:
    return [own[c][0] for c in cases], [{'case': c, **own[c][1]} for c in cases]
  sizes = [ds.case_meta(c).num_slices for c in cases]
  starts = np.cumsum([0] + sizes)
  counts = np.zeros((starts[-1], 4), np.int64)
  values = np.zeros((len(cases), len(metrics.CASE_METRICS)), np.float64)
  for index, case_id in enumerate(cases):
    if case_id in own:
      counts[starts[index]:starts[index + 1]] = own[case_id][0]
      values[index] = [own[case_id][1][name] for name in metrics.CASE_METRICS]
  counts = _allgather_bits(counts).sum(axis=0)  # each slice's row is non-zero on one process only
  values = _allgather_bits(values)
  owner = np.arange(len(cases)) % jax.process_count()
  rows = [{'case': case_id, **dict(zip(metrics.CASE_METRICS, map(float, values[owner[i], i])))}
          for i, case_id in enumerate(cases)]
  return [counts[starts[i]:starts[i + 1]] for i in range(len(cases))], rows


def _pictures(predictor: Predictor, ds, pictures, slice_counts,
              out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Overlays of the best and worst slices, the CoA attention map of the best, learning curves;
  returns the PNG paths written."""
  written = []
  note = synthetic.NAME if ds.synthetic else None
  best, worst = plots.best_and_worst_slices(slice_counts, NUM_PICTURE_SLICES)
  for name, chosen in (('best', best), ('worst', worst)):
    if not len(chosen):
      continue
    images, labels, preds, titles = [], [], [], []
    for index in chosen:
      case_id, k, counts = pictures[index]
      case_images, case_labels = ds.case_arrays(case_id)
      images.append(case_images[k, ..., 0])
      labels.append(case_labels[k])
      preds.append(predictor.predict(np.asarray(case_images[k:k + 1]))[0])
      titles.append(f'{case_id}\nslice {k}: Dice {float(metrics.dice(counts)):.3f}')
    written.append(plots.overlay_grid(images, labels, preds, out_dir / f'overlay_{name}.png', titles,
                       f'{name.capitalize()} slices (green: ground truth, magenta: prediction)',
                       subtitle=note))
  model = predictor.config.model
  if len(best) and model.name == 'ec_cam_unet' and (model.cc or model.sc):  # CoA present
    case_id, k, _ = pictures[best[0]]
    case_images, case_labels = ds.case_arrays(case_id)
    coa_output = predictor.attention(np.asarray(case_images[k]))['coa_output']
    written.append(plots.attention_map(
        case_images[k, ..., 0], coa_output, out_dir / 'attention.png',
        f'CoA activation |F_A|, {case_id} slice {k}', label=case_labels[k], subtitle=note))
  jsonl = predictor.workdir / 'metrics.jsonl'
  if jsonl.exists():
    plots.learning_curves(jsonl, out_dir / 'learning_curves.png', subtitle=note)
  return written


def scan_paths(path) -> list[pathlib.Path]:
  """The scans `path` names: a .nii/.nii.gz file or a DICOM series folder (one series at or
  below it), or a folder of such files and series folders (sorted)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise data.DataError(f'{path}: no such file or folder')
  if not path.is_dir():
    return [path]
  nifti = sorted(p for p in path.iterdir()
                 if p.name.endswith(('.nii', '.nii.gz')) and not p.name.startswith('._'))
  if not nifti and len(dicom.series_folders(path)) == 1:  # a series or a patient folder
    return [path]
  found = sorted(nifti + [p for p in path.iterdir() if p.is_dir() and dicom.series_folders(p)])
  if not found:
    raise data.DataError(f'{path}: no .nii or .nii.gz files or DICOM series folders in this '
                         'folder')
  return found


def predict_scans(predictor: Predictor, inputs, output_dir) -> list[pathlib.Path]:
  """Segments new scans: each input (NIfTI or DICOM series folder) -> a uint8 mask NIfTI of the
  same name (a series folder's name + .nii.gz) and geometry. In a multi-process job each process
  segments every `process_count`-th scan; returns the paths this process wrote."""
  output_dir = pathlib.Path(output_dir)
  paths = scan_paths(inputs)[jax.process_index()::jax.process_count()]
  output_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for path in tqdm(paths, desc='predict', unit='scan', disable=None):
    slices, meta = data.load_scan(path, predictor.config.data)
    name = path.name + '.nii.gz' if path.is_dir() else path.name.removesuffix('.gz') + '.gz'
    out_path = output_dir / name
    _write_prediction_atomic(predictor.predict(slices), meta, out_path)
    written.append(out_path)
  return written
