"""MSD Task02 Heart (left atrium, label 1), MRI, native 320x320; the paper gives no split: 14/2/4.

python train.py --config configs/msd_heart.py --config.data.root=/data/Task02_Heart
"""

from configs import default


def get_config(variant: str = 'ec_cam_unet'):
  config = default.get_config(variant)
  config.data.dataset = 'msd'
  config.data.modality = 'mri'
  config.data.foreground_labels = (1,)
  config.data.image_size = 320
  config.data.split = (14, 2, 4)
  config.train.weight_decay = 2e-4
  return config
