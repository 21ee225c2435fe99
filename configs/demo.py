"""Built-in demo: SYNTHETIC CT-like data (no dataset needed), 64x64 slices, a small network.

python train.py --config configs/demo.py
The data are generated on first use under data.cache_dir (KiTS19 layout, labelled SYNTHETIC).
"""

from configs import default


def get_config(variant: str = 'ec_cam_unet'):
  config = default.get_config(variant)
  config.data.dataset = 'synthetic'
  config.data.image_size = 64  # from the generator's 96x96
  config.data.split = (6, 1, 1)  # of data.synthetic_cases = 8
  config.data.num_workers = 0  # 64x64 slices are cheap: worker start-up would cost more
  config.model.features = (16, 32, 64, 128, 256)
  config.model.mus_channels = 32
  config.model.side_features = (32, 16, 8)
  # A few minutes on 2 CPU cores: the paper's lr 1e-5 over 150 epochs would take hours here.
  config.train.learning_rate = 1e-3
  config.train.num_epochs = 12  # 48 steps an epoch at batch 4
  return config
