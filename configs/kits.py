"""KiTS19 kidney (labels 1 kidney + 2 tumour), CT, 512x512, split 170/10/30 (paper Section IV).

python train.py --config configs/kits.py --config.data.root=/data/kits19/data
Table rows: --config configs/kits.py:unet (see configs/default.py VARIANTS).
"""

from configs import default


def get_config(variant: str = 'ec_cam_unet'):
  config = default.get_config(variant)
  config.data.dataset = 'kits19'
  config.data.window = (-79.0, 304.0)
  config.data.foreground_labels = (1, 2)
  config.data.split = (170, 10, 30)
  config.data.missing_labels = 'skip'  # cases 210-299 of the KiTS19 release have no segmentation
  config.train.weight_decay = 1e-4
  return config
