"""MSD Task07 Pancreas (labels 1 pancreas + 2 tumour), CT, 512x512, split 236/5/40.

python train.py --config configs/msd_pancreas.py --config.data.root=/data/Task07_Pancreas
"""

from configs import default


def get_config(variant: str = 'ec_cam_unet'):
  config = default.get_config(variant)
  config.data.dataset = 'msd'
  config.data.window = (-100.0, 240.0)
  config.data.foreground_labels = (1, 2)
  config.data.split = (236, 5, 40)
  config.train.weight_decay = 1e-4
  return config
