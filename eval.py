"""Evaluates a trained run, or segments new scans with it.

  python eval.py --workdir runs/kits                        # test split, best checkpoint
  python eval.py --config configs/kits.py --workdir runs/kits --split val --checkpoint latest
  python eval.py --workdir runs/kits --export_nifti         # + predicted masks as .nii.gz
  python eval.py --workdir runs/kits --predict scans/ --output masks/   # new, unlabelled scans

Writes runs/<run>/eval/<split>/: metrics.json, per_case.csv, overlay_{best,worst}.png,
attention.png, learning_curves.png (and predictions/<case>.nii.gz with --export_nifti).
The run's own config.json defines the model and data; --config, if given, must agree on the model.
Multi-process: started like train.py (docs/training.md), each process evaluates its share of the
cases (or scans) on its devices; the figures are those of one process.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from ecm_jax import cli
from ecm_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (optional: checked against '
                                          'the run).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory written by train.py.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', 'best | latest | a step number.')
_SPLIT = flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'], 'Split to evaluate.')
_EXPORT = flags.DEFINE_bool('export_nifti', False, 'Write predicted masks per case as .nii.gz in '
                            'the original geometry.')
_PREDICT = flags.DEFINE_string('predict', None, 'A scan to segment (a .nii.gz file or a DICOM '
                               'series folder) or a folder of them (instead of evaluating a split).')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the masks of --predict.')
_FOLD = flags.DEFINE_bool('fold', True, 'Use the EC fold (one 3x3 conv per EC block) for inference.')


def main(argv):
  del argv
  if _PREDICT.value and not _OUTPUT.value:
    raise app.UsageError('--predict needs --output (a folder for the masks)')
  # pylint: disable=g-import-not-at-top  (JAX after the process start-up)
  import jax

  from ecm_jax import data, files
  from ecm_jax.evaluate import evaluation, report
  from ecm_jax.evaluate.inference import Predictor
  workdir = pathlib.Path(_WORKDIR.value)
  if _PREDICT.value:  # checked before anything is loaded or computed
    files.check_writable(_OUTPUT.value, '--output')
  predictor = Predictor(workdir, _CHECKPOINT.value, config=_CONFIG.value, fold=_FOLD.value)
  if _PREDICT.value:
    written = evaluation.predict_scans(predictor, _PREDICT.value, _OUTPUT.value)
    print(f'{len(written)} mask(s) written to {_OUTPUT.value}'
          + (f' by process {jax.process_index()}' if jax.process_count() > 1 else ''))
    return
  out_dir = files.check_writable(workdir / 'eval' / _SPLIT.value, 'the eval folder')
  ds = data.prepare(predictor.config.data, split_file=workdir / 'splits.json',
                    write_split=jax.process_index() == 0)
  document = evaluation.evaluate_split(predictor, ds, _SPLIT.value, out_dir,
                                       export_nifti=_EXPORT.value)
  if jax.process_index() != 0:
    return
  print(f'{workdir} checkpoint {predictor.step}, {_SPLIT.value} split'
        f'{" (SYNTHETIC demo data)" if ds.synthetic else ""}:\n')
  print(report.summary_table(document))
  print(f'\nwritten to {out_dir}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  cli.run(main, UserError, distributed=True)
