"""NIH Pancreas-CT (TCIA), NIfTI conversion, CT, 512x512, split 57/5/20.

python train.py --config configs/nih_pancreas.py --config.data.root=/data/Pancreas-CT
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
