"""torch.nn mirror of `ecm_jax.models.msunet`: MSU-Net (Su et al., Front. Genet. 2021; the
authors' CN-zdy/MSU_Net `MSU_Net`, commit 471393f5) module for module, under the Flax submodule
names. Conventions as `ecm_jax.torch_ref.models` (NCHW, input widths at construction, train/eval
by `module.train()` / `.eval()`); PyTorch's default init, as the original and the Flax model.
"""

from collections.abc import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ecm_jax.models import msunet as flax_msunet
from ecm_jax.torch_ref.models import Conv2D, LayerSettings, PatchUpsample, check_input


class ConvBlock(nn.Module):
  """Two (k x k conv with bias -> BN -> ReLU): `conv0`, `bn0`, `conv1`, `bn1`.
  `msunet.ConvBlock`."""

  def __init__(self, in_features: int, features: int, kernel_size: int,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    k = kernel_size
    self.conv0 = Conv2D(in_features, features, (k, k), use_bias=True)
    self.bn0 = settings.batch_norm(features)
    self.conv1 = Conv2D(features, features, (k, k), use_bias=True)
    self.bn1 = settings.batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.bn1(self.conv1(F.relu(self.bn0(self.conv0(x))))))


class MultiScaleBlock(nn.Module):
  """Conv1x1 with bias (`fuse`) of concat[branch3(x), branch7(x)] (`branch3`, `branch7`).
  `msunet.MultiScaleBlock`."""

  def __init__(self, in_features: int, features: int, settings: LayerSettings = LayerSettings()):
    super().__init__()
    for k in flax_msunet.BRANCH_KERNELS:
      self.add_module(f'branch{k}', ConvBlock(in_features, features, k, settings))
    self.fuse = Conv2D(len(flax_msunet.BRANCH_KERNELS) * features, features, (1, 1),
                       use_bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    branches = [self.get_submodule(f'branch{k}')(x) for k in flax_msunet.BRANCH_KERNELS]
    return self.fuse(torch.cat(branches, dim=1))


class MSUNet(nn.Module):
  """`encoder{i}` (2x2 max-pool between), `up{i}` (ConvTranspose2x2), `decoder{i}` on
  concat[skip, up], Conv1x1 `head`; returns {'logits'} (NCHW). `msunet.MSUNet`."""

  def __init__(self, features: Sequence[int] = (32, 64, 128, 256, 512), in_channels: int = 1,
               num_classes: int = 1, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.features, self.in_channels = tuple(features), in_channels
    widths_in = (in_channels, *features[:-1])
    for i, (width_in, width) in enumerate(zip(widths_in, features)):
      self.add_module(f'encoder{i}', MultiScaleBlock(width_in, width, settings))
    for i in reversed(range(len(features) - 1)):
      self.add_module(f'up{i}', PatchUpsample(features[i + 1], features[i], 2))
      self.add_module(f'decoder{i}', MultiScaleBlock(2 * features[i], features[i], settings))
    self.head = Conv2D(features[0], num_classes, (1, 1), use_bias=True)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    check_input(x, self.in_channels, len(self.features))
    levels = []
    y = x
    for i in range(len(self.features)):
      if i:
        y = F.max_pool2d(y, 2)
      y = self.get_submodule(f'encoder{i}')(y)
      levels.append(y)
    for i in reversed(range(len(self.features) - 1)):
      up = self.get_submodule(f'up{i}')(y)
      y = self.get_submodule(f'decoder{i}')(torch.cat([levels[i], up], dim=1))
    return {'logits': self.head(y)}


# The report rows of `ecm_jax.torch_ref.parity`: every encoder and decoder block.
BLOCK_TYPES = (MultiScaleBlock,)
