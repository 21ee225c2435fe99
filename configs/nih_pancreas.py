"""NIH Pancreas-CT (TCIA), CT, 512x512, split 57/5/20.

data.root holds the TCIA download (Pancreas-CT/PANCREAS_XXXX/<study>/<series>/*.dcm and
TCIA_pancreas_labels-02-05-2017/labelXXXX.nii.gz) or a NIfTI conversion (PANCREAS_XXXX.nii.gz with
labelXXXX.nii.gz); see docs/data.md.

python train.py --config configs/nih_pancreas.py --config.data.root=/data/nih_pancreas
"""

from configs import default


def get_config(variant: str = 'ec_cam_unet'):
  config = default.get_config(variant)
  config.data.dataset = 'nih_pancreas'
  config.data.window = (-100.0, 240.0)
  config.data.foreground_labels = (1,)
  config.data.split = (57, 5, 20)
  config.train.weight_decay = 2e-4
  return config
