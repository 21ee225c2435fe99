"""torch.nn mirror of `ecm_jax.models.cenet`: CE-Net (Gu et al., IEEE TMI 2019; the authors'
Guzaiwang/CE-Net `CE_Net_`, commit 5ca9bcc1) module for module, under the Flax submodule names.

Conventions as `ecm_jax.torch_ref.models` (NCHW, input widths at construction, train/eval by
`module.train()` / `.eval()`). The mirror is for numerics, so its parameters keep PyTorch's
default init: the Flax model's torchvision-ResNet and zero-bias DAC initialisation is reached by
loading its variables (`convert.load_variables`).
"""

from collections.abc import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ecm_jax.models import cenet as flax_cenet
from ecm_jax.torch_ref.models import Conv2D, ConvTranspose2D, LayerSettings, resize_bilinear


class Stem(nn.Module):
  """Conv7x7 stride 2 pad 3 (`conv`) -> BN (`bn`) -> ReLU -> MaxPool3x3 stride 2 pad 1.
  `cenet.Stem`."""

  def __init__(self, in_features: int, features: int, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv = Conv2D(in_features, features, (7, 7), stride=2, padding=3)
    self.bn = settings.batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, 2, padding=1)


class BasicBlock(nn.Module):
  """relu(BN(Conv3x3(relu(BN(Conv3x3_s x)))) + shortcut x) (`conv1`, `bn1`, `conv2`, `bn2`;
  `shortcut_conv`, `shortcut_bn` where the stride or width changes). `cenet.BasicBlock`."""

  def __init__(self, in_features: int, features: int, stride: int = 1,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv1 = Conv2D(in_features, features, stride=stride)
    self.bn1 = settings.batch_norm(features)
    self.conv2 = Conv2D(features, features)
    self.bn2 = settings.batch_norm(features)
    self.has_shortcut = stride != 1 or in_features != features
    if self.has_shortcut:
      self.shortcut_conv = Conv2D(in_features, features, (1, 1), stride=stride, padding=0)
      self.shortcut_bn = settings.batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    shortcut = self.shortcut_bn(self.shortcut_conv(x)) if self.has_shortcut else x
    return F.relu(y + shortcut)


class ResNetStage(nn.Module):
  """`block0`, ... basic blocks, the first with `stride`. `cenet.ResNetStage`."""

  def __init__(self, in_features: int, features: int, blocks: int, stride: int = 1,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    for i in range(blocks):
      self.add_module(f'block{i}', BasicBlock(in_features if i == 0 else features, features,
                                              stride if i == 0 else 1, settings))
    self.blocks = blocks

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i in range(self.blocks):
      x = self.get_submodule(f'block{i}')(x)
    return x


class DenseAtrousConv(nn.Module):
  """DAC: x + relu(D1 x) + relu(P D3 x) + relu(P D3 D1 x) + relu(P D5 D3 D1 x), weights shared
  (`dilate1`, `dilate3`, `dilate5`, `conv1x1`). `cenet.DenseAtrousConv`."""

  def __init__(self, channels: int):
    super().__init__()
    for rate in flax_cenet.DAC_DILATIONS:
      self.add_module(f'dilate{rate}', Conv2D(channels, channels, (3, 3), rate, use_bias=True))
    self.conv1x1 = Conv2D(channels, channels, (1, 1), use_bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y1 = self.dilate1(x)
    y31 = self.dilate3(y1)
    branches = (y1, self.conv1x1(self.dilate3(x)), self.conv1x1(y31),
                self.conv1x1(self.dilate5(y31)))
    return x + sum(F.relu(branch) for branch in branches)


class ResidualMultiKernelPooling(nn.Module):
  """RMP: concat[resize(conv(maxpool_k x)) for k in 2, 3, 5, 6; x], one shared 1x1 conv C -> 1
  (`conv`). `cenet.ResidualMultiKernelPooling`."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv = Conv2D(channels, 1, (1, 1), use_bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    size = tuple(x.shape[2:])
    pooled = [resize_bilinear(self.conv(F.max_pool2d(x, k, k)), size)
              for k in flax_cenet.RMP_POOLS]
    return torch.cat(pooled + [x], dim=1)


class DecoderBlock(nn.Module):
  """Conv1x1 to Cin/4 (`conv1`), ConvTranspose3x3 stride 2 pad 1 output_padding 1 (`deconv2`),
  Conv1x1 to `features` (`conv3`), each -> BN (`bn1`, `bn2`, `bn3`) -> ReLU.
  `cenet.DecoderBlock`."""

  def __init__(self, in_features: int, features: int, settings: LayerSettings = LayerSettings()):
    super().__init__()
    inner = in_features // 4
    self.conv1 = Conv2D(in_features, inner, (1, 1), use_bias=True)
    self.bn1 = settings.batch_norm(inner)
    self.deconv2 = ConvTranspose2D(inner, inner, 3, 2, padding=1, output_padding=1)
    self.bn2 = settings.batch_norm(inner)
    self.conv3 = Conv2D(inner, features, (1, 1), use_bias=True)
    self.bn3 = settings.batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.deconv2(y)))
    return F.relu(self.bn3(self.conv3(y)))


class Head(nn.Module):
  """ConvTranspose4x4 stride 2 pad 1 (`deconv`) -> ReLU -> Conv3x3 (`conv`) -> ReLU -> Conv3x3
  to classes (`classifier`). `cenet.Head`."""

  def __init__(self, in_features: int, features: int, num_classes: int):
    super().__init__()
    self.deconv = ConvTranspose2D(in_features, features, 4, 2, padding=1)
    self.conv = Conv2D(features, features, (3, 3), use_bias=True)
    self.classifier = Conv2D(features, num_classes, (3, 3), use_bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(F.relu(self.conv(F.relu(self.deconv(x)))))


class CENet(nn.Module):
  """`stem`, `encoder1..4`, `dac`, `rmp`, `decoder4..1` (skips added), `head`; returns
  {'logits'} (NCHW). `cenet.CENet`."""

  def __init__(self, features: Sequence[int] = (64, 128, 256, 512), in_channels: int = 1,
               num_classes: int = 1, settings: LayerSettings = LayerSettings()):
    super().__init__()
    f = tuple(features)
    self.in_channels = in_channels
    self.stem = Stem(in_channels, f[0], settings)
    widths_in = (f[0], *f[:-1])
    for i, (width_in, width, blocks) in enumerate(zip(widths_in, f, flax_cenet.RESNET34_BLOCKS)):
      self.add_module(f'encoder{i + 1}',
                      ResNetStage(width_in, width, blocks, 1 if i == 0 else 2, settings))
    self.dac = DenseAtrousConv(f[3])
    self.rmp = ResidualMultiKernelPooling(f[3])
    decoder_widths = (f[3] + len(flax_cenet.RMP_POOLS), f[2], f[1], f[0], f[0])
    for level, (width_in, width) in zip((4, 3, 2, 1), zip(decoder_widths, decoder_widths[1:])):
      self.add_module(f'decoder{level}', DecoderBlock(width_in, width, settings))
    self.head = Head(f[0], f[0] // 2, num_classes)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    stride, smallest = flax_cenet.STRIDE, flax_cenet.STRIDE * max(flax_cenet.RMP_POOLS)
    if x.ndim != 4 or x.shape[1] != self.in_channels:
      raise ValueError(f'input x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}')
    if x.shape[2] % stride or x.shape[3] % stride or min(x.shape[2:]) < smallest:
      raise ValueError(f'input H and W must be multiples of {stride}, at least {smallest}, got '
                       f'{tuple(x.shape[2:])}')
    y = self.stem(x)
    skips = []
    for i in range(1, 5):
      y = self.get_submodule(f'encoder{i}')(y)
      skips.append(y)
    y = self.rmp(self.dac(y))
    for level, skip in zip((4, 3, 2, 1), (*skips[2::-1], None)):
      y = self.get_submodule(f'decoder{level}')(y)
      if skip is not None:
        y = y + skip
    return {'logits': self.head(y)}


# The report rows of `ecm_jax.torch_ref.parity`: every stage of the network.
BLOCK_TYPES = (Stem, ResNetStage, DenseAtrousConv, ResidualMultiKernelPooling, DecoderBlock, Head)
