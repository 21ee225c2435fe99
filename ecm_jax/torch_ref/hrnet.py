"""torch.nn mirror of `ecm_jax.models.hrnet`: HRNetV2 (Wang et al., TPAMI 2020) as in
HRNet/HRNet-Semantic-Segmentation `lib/models/seg_hrnet.py` (branch pytorch-v1.1, commit 88419ab1),
module for module under the Flax names (`stage2.module0.fuse1.from0.down0.conv.weight` <->
`params/stage2/module0/fuse1/from0/down0/conv/kernel`), so `ecm_jax.torch_ref.convert` maps the
variables. NCHW; parameters have PyTorch's default initialisation (load Flax variables to compare);
BatchNorm constants from `LayerSettings`.
"""

import torch
from torch import nn
import torch.nn.functional as F

from ecm_jax.models.hrnet import (
  BOTTLENECK_EXPANSION,
  STAGE1_PLANES,
  STEM_WIDTH,
  branch_widths,
  parse_size,
)
from ecm_jax.torch_ref.models import Conv2D, LayerSettings, resize_bilinear


class ConvBN(nn.Module):
  """k x k conv (no bias, stride `stride`) -> BN (`conv`, `bn`) [-> ReLU], `hrnet.ConvBN`."""

  def __init__(self, in_features: int, features: int, kernel_size: int = 3, stride: int = 1,
               relu: bool = True, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.relu = relu
    self.conv = Conv2D(in_features, features, (kernel_size, kernel_size), stride=stride)
    self.bn = settings.batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn(self.conv(x))
    return F.relu(y) if self.relu else y


class Stem(nn.Module):
  """Two 3x3 s2 convs to 64 with BN and ReLU (`conv1`, `bn1`, `conv2`, `bn2`), `hrnet.Stem`."""

  def __init__(self, in_channels: int, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv1 = Conv2D(in_channels, STEM_WIDTH, stride=2)
    self.bn1 = settings.batch_norm(STEM_WIDTH)
    self.conv2 = Conv2D(STEM_WIDTH, STEM_WIDTH, stride=2)
    self.bn2 = settings.batch_norm(STEM_WIDTH)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Bottleneck(nn.Module):
  """1x1 P, 3x3 P, 1x1 4P (`conv{1,2,3}`, `bn{1,2,3}`) + shortcut (`downsample_conv`,
  `downsample_bn` when the input is not 4P wide), `hrnet.Bottleneck`."""

  def __init__(self, in_features: int, planes: int, settings: LayerSettings = LayerSettings()):
    super().__init__()
    out = planes * BOTTLENECK_EXPANSION
    self.conv1 = Conv2D(in_features, planes, (1, 1))
    self.bn1 = settings.batch_norm(planes)
    self.conv2 = Conv2D(planes, planes, (3, 3))
    self.bn2 = settings.batch_norm(planes)
    self.conv3 = Conv2D(planes, out, (1, 1))
    self.bn3 = settings.batch_norm(out)
    self.projects = in_features != out
    if self.projects:
      self.downsample_conv = Conv2D(in_features, out, (1, 1))
      self.downsample_bn = settings.batch_norm(out)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = self.downsample_bn(self.downsample_conv(x)) if self.projects else x
    return F.relu(y + shortcut)


class BasicBlock(nn.Module):
  """ReLU(BN(3x3) . ReLU . BN(3x3) x + x) (`conv1`, `bn1`, `conv2`, `bn2`), `hrnet.BasicBlock`."""

  def __init__(self, features: int, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv1 = Conv2D(features, features)
    self.bn1 = settings.batch_norm(features)
    self.conv2 = Conv2D(features, features)
    self.bn2 = settings.batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(y)) + x)


class Branch(nn.Sequential):
  """`blocks` residual blocks (`block{b}`): Bottlenecks when `bottleneck`, else BasicBlocks,
  `hrnet.Branch`."""

  def __init__(self, in_features: int, features: int, blocks: int, bottleneck: bool = False,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    for b in range(blocks):
      if bottleneck:
        self.add_module(f'block{b}', Bottleneck(in_features, features, settings))
        in_features = features * BOTTLENECK_EXPANSION
      else:
        self.add_module(f'block{b}', BasicBlock(features, settings))


class Transition(nn.Module):
  """Branches of widths `in_widths` -> `widths` (`branch{i}` where a branch changes or is new),
  `hrnet.Transition`."""

  def __init__(self, in_widths: tuple[int, ...], widths: tuple[int, ...],
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.count_in = len(in_widths)
    self.changed = []
    for i, width in enumerate(widths):
      if i < len(in_widths) and in_widths[i] == width:
        continue
      stride, source = (1, in_widths[i]) if i < len(in_widths) else (2, in_widths[-1])
      self.add_module(f'branch{i}', ConvBN(source, width, 3, stride, settings=settings))
      self.changed.append(i)
    self.count_out = len(widths)

  def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for i in range(self.count_out):
      if i not in self.changed:
        out.append(xs[i])
      else:
        out.append(self.get_submodule(f'branch{i}')(xs[i] if i < self.count_in else xs[-1]))
    return out


class Downsample(nn.Sequential):
  """`steps` times 3x3 s2 conv + BN (`down{k}`), ReLU between, `hrnet.Downsample`."""

  def __init__(self, in_features: int, features: int, steps: int,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    for k in range(steps):
      last = k == steps - 1
      self.add_module(f'down{k}', ConvBN(in_features, features if last else in_features, 3, 2,
                                         relu=not last, settings=settings))


class Fuse(nn.Module):
  """Output branch `index` of an HR module's fusion (`from{j}`), `hrnet.Fuse`."""

  def __init__(self, index: int, widths: tuple[int, ...],
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.index, self.count = index, len(widths)
    for j, width in enumerate(widths):
      if j > index:
        self.add_module(f'from{j}', ConvBN(width, widths[index], 1, relu=False,
                                           settings=settings))
      elif j < index:
        self.add_module(f'from{j}', Downsample(width, widths[index], index - j, settings))

  def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
    target = xs[self.index]
    y = 0
    for j, x in enumerate(xs):
      if j != self.index:
        x = self.get_submodule(f'from{j}')(x)
      if j > self.index:
        x = resize_bilinear(x, tuple(target.shape[2:]))
      y = y + x
    return F.relu(y)


class HRModule(nn.Module):
  """BasicBlocks per branch (`branch{i}`), then the fusion (`fuse{i}`), `hrnet.HRModule`."""

  def __init__(self, widths: tuple[int, ...], blocks: int,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.count = len(widths)
    for i, width in enumerate(widths):
      self.add_module(f'branch{i}', Branch(width, width, blocks, settings=settings))
    for i in range(self.count):
      self.add_module(f'fuse{i}', Fuse(i, widths, settings))

  def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    xs = [self.get_submodule(f'branch{i}')(x) for i, x in enumerate(xs)]
    return [self.get_submodule(f'fuse{i}')(xs) for i in range(self.count)]


class Stage(nn.Sequential):
  """`num_modules` HR modules (`module{m}`), `hrnet.Stage`."""

  def __init__(self, widths: tuple[int, ...], num_modules: int, blocks: int,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    for m in range(num_modules):
      self.add_module(f'module{m}', HRModule(widths, blocks, settings))


class Head(nn.Module):
  """Resize every branch to branch 0's size, concat, 1x1 conv with bias (`conv1`), BN (`bn`), ReLU,
  1x1 conv with bias -> classes (`conv2`), `hrnet.Head`."""

  def __init__(self, in_features: int, num_classes: int,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv1 = Conv2D(in_features, in_features, (1, 1), use_bias=True)
    self.bn = settings.batch_norm(in_features)
    self.conv2 = Conv2D(in_features, num_classes, (1, 1), use_bias=True)

  def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
    size = tuple(xs[0].shape[2:])
    y = torch.cat([resize_bilinear(x, size) for x in xs], dim=1)
    return self.conv2(F.relu(self.bn(self.conv1(y))))


class HRNetV2(nn.Module):
  """`hrnet.HRNetV2`: x (B, in_channels, H, W) -> {'logits': (B, num_classes, H, W)}."""

  def __init__(self, size: str = 'w18', in_channels: int = 1, num_classes: int = 1,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    width, structure = parse_size(size)
    self.in_channels = in_channels
    self.stem = Stem(in_channels, settings)
    self.stage1 = Branch(STEM_WIDTH, STAGE1_PLANES, structure.stage1_blocks, bottleneck=True,
                         settings=settings)
    widths = (STAGE1_PLANES * BOTTLENECK_EXPANSION,)
    for n, num_modules in enumerate(structure.modules, start=2):
      new = branch_widths(width, n)
      self.add_module(f'transition{n - 1}', Transition(widths, new, settings))
      self.add_module(f'stage{n}', Stage(new, num_modules, structure.blocks, settings))
      widths = new
    self.head = Head(sum(widths), num_classes, settings)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % 32 or x.shape[3] % 32:
      raise ValueError(f'HRNetV2 takes (B, {self.in_channels}, H, W) with H, W multiples of 32, '
                       f'got {tuple(x.shape)}')
    xs = [self.stage1(self.stem(x))]
    for n in range(2, 5):
      xs = self.get_submodule(f'stage{n}')(self.get_submodule(f'transition{n - 1}')(xs))
    return {'logits': resize_bilinear(self.head(xs), tuple(x.shape[2:]))}


# The modules whose outputs the parity report compares (each returns one tensor).
BLOCK_TYPES = (Stem, Bottleneck, Fuse, Head)
