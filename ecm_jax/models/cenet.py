"""CE-Net, a Table I baseline: Gu et al., "CE-Net: Context Encoder Network for 2D Medical Image
Segmentation", IEEE TMI 2019, as in the authors' code (Guzaiwang/CE-Net, `networks/cenet.py`,
class `CE_Net_`, commit 5ca9bcc1), whose encoder is torchvision's `resnet34` (He et al., "Deep
Residual Learning for Image Recognition", CVPR 2016).

  stem          7x7 stride-2 conv (no bias) -> BN -> ReLU -> 3x3 stride-2 max-pool (pad 1)    1/4
  encoder1..4   ResNet-34 stages of 3, 4, 6, 3 basic blocks at features[0..3]; encoder2..4
                halve the map in their first block                    e1..e4 at 1/4 .. 1/32
  dac           Dense Atrous Convolution on e4, one set of weights shared by its branches
  rmp           Residual Multi-kernel Pooling: e4 and four pooled 1-channel maps
                (features[3] + 4 channels)
  decoder4..1   1x1 conv -> 3x3 stride-2 transposed conv -> 1x1 conv, each with BN and ReLU; the
                skips are ADDED: d4 = dec4(rmp) + e3, d3 = dec3(d4) + e2, d2 = dec2(d3) + e1,
                d1 = dec1(d2); widths features[2], features[1], features[0], features[0]    1/2
  head          4x4 stride-2 transposed conv -> ReLU -> 3x3 conv -> ReLU -> 3x3 conv      1/1
                (width features[0] // 2, then num_classes)

Our choices, as the paper trains every model from scratch on 1-channel slices: a 1-channel stem
(the original wraps the 3-channel ImageNet `resnet34(pretrained=True)` and ignores
`num_channels`), no ImageNet weights, and logits out (the original applies the sigmoid inside
`forward`). At the defaults (64, 128, 256, 512): 28,996,821 parameters.

Initialisation as the official code leaves it: the encoder convs as torchvision's ResNet,
kaiming_normal_(mode='fan_out', nonlinearity='relu') = N(0, 2 / (kh kw Cout)) (not truncated), BN
scale 1 and bias 0; DAC's kernels PyTorch's default with zero biases (`DACblock` zeroes them);
every other layer PyTorch's default (`layers`).
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecm_jax.models import ops
from ecm_jax.models.layers import (
  Conv2D,
  ConvTranspose2D,
  LayerSettings,
  at_least_float32,
  check_input,
  matmul_precision_scope,
)

RESNET34_BLOCKS = (3, 4, 6, 3)  # basic blocks per encoder stage
DAC_DILATIONS = (1, 3, 5)  # the three 3x3 convs of DAC
RMP_POOLS = (2, 3, 5, 6)  # RMP max-pool windows (= strides, floor mode)
STRIDE = 32  # stem conv, stem max-pool, encoder2, encoder3, encoder4: five halvings


def resnet_kernel_init() -> nn.initializers.Initializer:
  """torchvision ResNet's conv init, kaiming_normal_(mode='fan_out', nonlinearity='relu'):
  N(0, 2 / fan_out), fan_out = kh * kw * Cout, a plain (untruncated) normal."""
  return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Stem(nn.Module):
  """ResNet stem: Conv7x7 stride 2 pad 3, no bias (`conv`) -> BN (`bn`) -> ReLU -> MaxPool3x3
  stride 2 pad 1: (B, H, W, Cin) -> (B, H/4, W/4, features)."""
  features: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = Conv2D(self.features, (7, 7), stride=2, padding=3, kernel_init=resnet_kernel_init(),
               settings=self.settings, name='conv')(x)
    y = nn.relu(self.settings.batch_norm('bn')(y, train))
    # 3x3 s2 p1 max-pool; flax pads with -inf, as PyTorch does.
    return nn.max_pool(y, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """ResNet basic block: relu(BN(Conv3x3(relu(BN(Conv3x3_s(x))))) + shortcut(x)) (`conv1`, `bn1`,
  `conv2`, `bn2`); the first conv carries the stride. The shortcut is the identity, or
  BN(Conv1x1_s(x)) (`shortcut_conv`, `shortcut_bn`) where the stride or the width changes."""
  features: int
  stride: int = 1
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s = self.settings
    conv = functools.partial(Conv2D, self.features, kernel_init=resnet_kernel_init(), settings=s)
    y = nn.relu(s.batch_norm('bn1')(conv(stride=self.stride, name='conv1')(x), train))
    y = s.batch_norm('bn2')(conv(name='conv2')(y), train)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv((1, 1), stride=self.stride, padding=0, name='shortcut_conv')(x)
      shortcut = s.batch_norm('shortcut_bn')(shortcut, train)
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """`blocks` basic blocks (`block0`, ...) at `features`, the first with `stride`."""
  features: int
  blocks: int
  stride: int = 1
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.blocks):
      x = BasicBlock(self.features, self.stride if i == 0 else 1, self.settings,
                     name=f'block{i}')(x, train)
    return x


class DenseAtrousConv(nn.Module):
  """DAC: four cascaded branches of 3x3 convs of dilation 1, 3, 5 (`dilate1`, `dilate3`,
  `dilate5`) and a 1x1 conv (`conv1x1`), all C -> C with bias, no BN; each conv's weights are
  shared by every branch it appears in:

    out = x + relu(D1 x) + relu(P D3 x) + relu(P D3 D1 x) + relu(P D5 D3 D1 x).
  """
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    conv = functools.partial(Conv2D, channels, use_bias=True, bias_init=nn.initializers.zeros,
                             settings=self.settings)
    d1, d3, d5 = (conv((3, 3), rate, name=f'dilate{rate}') for rate in DAC_DILATIONS)
    project = conv((1, 1), name='conv1x1')
    y1 = d1(x)
    y31 = d3(y1)
    branches = (y1, project(d3(x)), project(y31), project(d5(y31)))
    return x + sum(nn.relu(branch) for branch in branches)


class ResidualMultiKernelPooling(nn.Module):
  """RMP: per window k in RMP_POOLS a k x k stride-k max-pool (floor), one shared 1x1 conv C -> 1
  with bias (`conv`), bilinear resize back to H x W (align_corners=False); then
  concat[p2, p3, p5, p6, x]: (B, H, W, C) -> (B, H, W, C + 4). Needs H, W >= 6."""
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    size = x.shape[1:3]
    conv = Conv2D(1, (1, 1), use_bias=True, settings=self.settings, name='conv')
    pooled = [ops.resize_bilinear(conv(nn.max_pool(x, (k, k), (k, k))), size) for k in RMP_POOLS]
    return jnp.concatenate(pooled + [x], axis=-1)


class DecoderBlock(nn.Module):
  """Cin -> Cin/4 -> upsample x2 -> `features`: Conv1x1 (`conv1`), ConvTranspose3x3 stride 2
  pad 1 output_padding 1 (`deconv2`), Conv1x1 (`conv3`), all with bias, each followed by BN
  (`bn1`, `bn2`, `bn3`) and ReLU."""
  features: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s = self.settings
    inner = x.shape[-1] // 4
    y = Conv2D(inner, (1, 1), use_bias=True, settings=s, name='conv1')(x)
    y = nn.relu(s.batch_norm('bn1')(y, train))
    y = ConvTranspose2D(inner, 3, 2, padding=1, output_padding=1, settings=s, name='deconv2')(y)
    y = nn.relu(s.batch_norm('bn2')(y, train))
    y = Conv2D(self.features, (1, 1), use_bias=True, settings=s, name='conv3')(y)
    return nn.relu(s.batch_norm('bn3')(y, train))


class Head(nn.Module):
  """ConvTranspose4x4 stride 2 pad 1 to `features` (`deconv`) -> ReLU -> Conv3x3 (`conv`) ->
  ReLU -> Conv3x3 to `num_classes` (`classifier`), all with bias: logits at twice the size."""
  features: int
  num_classes: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.settings
    y = nn.relu(ConvTranspose2D(self.features, 4, 2, padding=1, settings=s, name='deconv')(x))
    y = nn.relu(Conv2D(self.features, (3, 3), use_bias=True, settings=s, name='conv')(y))
    return Conv2D(self.num_classes, (3, 3), use_bias=True, settings=s, name='classifier')(y)


class CENet(nn.Module):
  """CE-Net (`CE_Net_`): see the module docstring. `features`: the ResNet-34 stage widths (the
  stem has features[0])."""
  features: Sequence[int] = (64, 128, 256, 512)
  in_channels: int = 1
  num_classes: int = 1
  settings: LayerSettings = LayerSettings()

  def input_multiple(self) -> int:
    return STRIDE

  def smallest_input(self) -> int:
    # RMP's 6x6 pool needs the 1/32 map e4 to be at least 6 x 6.
    return STRIDE * max(RMP_POOLS)

  @nn.compact
  @matmul_precision_scope
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    if len(self.features) != len(RESNET34_BLOCKS) or self.features[0] < 2:
      raise ValueError(f'CENet needs {len(RESNET34_BLOCKS)} stage widths, the first at least 2 '
                       f'(the head has features[0] // 2), got {tuple(self.features)}')
    check_input(x, self, 'five stride-2 steps: stem conv, stem max-pool, encoder2..4')
    s, f = self.settings, tuple(self.features)
    y = Stem(f[0], s, name='stem')(x.astype(s.dtype), train)
    skips = []
    for i, (width, blocks) in enumerate(zip(f, RESNET34_BLOCKS)):
      y = ResNetStage(width, blocks, 1 if i == 0 else 2, s, name=f'encoder{i + 1}')(y, train)
      skips.append(y)
    y = DenseAtrousConv(s, name='dac')(y)
    y = ResidualMultiKernelPooling(s, name='rmp')(y)
    # decoder4 .. decoder1, each followed by the encoder skip of its output size (none after d1).
    for level, width, skip in zip((4, 3, 2, 1), (f[2], f[1], f[0], f[0]), (*skips[2::-1], None)):
      y = DecoderBlock(width, s, name=f'decoder{level}')(y, train)
      if skip is not None:
        y = y + skip
    logits = Head(f[0] // 2, self.num_classes, s, name='head')(y)
    return {'logits': logits.astype(at_least_float32(logits.dtype))}
