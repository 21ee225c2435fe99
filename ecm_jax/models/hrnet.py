"""HRNetV2 for segmentation (Wang et al., "Deep High-Resolution Representation Learning for Visual
Recognition", TPAMI 2020): the Table I "HR-Net" baseline.

Built as HRNet/HRNet-Semantic-Segmentation `lib/models/seg_hrnet.py` on its `pytorch-v1.1` branch
(commit 88419ab1: plain BatchNorm, bilinear resizes with align_corners=False), trained from scratch
with a 1-channel stem:

  stem        3x3 s2 conv 64, BN, ReLU, 3x3 s2 conv 64, BN, ReLU              -> 1/4, 64
  stage1      Bottlenecks (1x1 64, 3x3 64, 1x1 256; projection shortcut first)  -> 1/4, 256
  stage2..4   transition (existing branch: 3x3 conv BN ReLU where the width changes; new branch:
              3x3 s2 conv BN ReLU from the lowest one), then HR modules: per branch i (1/2^(i+2),
              width W 2^i) BasicBlocks, then fusion out_i = ReLU(sum_j f_ij(x_j)) with
              f_ii = identity, f_ij (j > i) = bilinear resize of BN(conv1x1 x_j),
              f_ij (j < i) = i - j times 3x3 s2 conv + BN (ReLU between, none after the last)
  head        every branch resized bilinearly to 1/4, concat (15W), 1x1 conv with bias, BN, ReLU,
              1x1 conv with bias -> classes; bilinear x4 to the input size (logits)

Sizes: 'w<N>' is the HRNetV2 structure (stage1 4 Bottlenecks; stages 2/3/4 of 1/4/3 modules, 4
BasicBlocks per branch) at width N ('w18', 'w32', 'w48' as published), 'w<N>_small_v2' the small
one (2 Bottlenecks; 1/3/2 modules; 2 BasicBlocks per branch; 'w18_small_v2' as published). The stem
(64) and stage 1 (64 -> 256) have the same widths at every size, as in the official experiment
files.

Initialisation as the official `init_weights`: every conv kernel normal with std 0.001, BatchNorm
scale 1 and bias 0; the two head convs' biases keep PyTorch's default (uniform +-1/sqrt(fan_in)),
which `init_weights` does not touch. BatchNorm momentum and epsilon come from `LayerSettings`
(the shared `config.model.bn_momentum`, default 0.9 = PyTorch 0.1; the official file uses PyTorch
0.01, flax 0.99).
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecm_jax.models import ops
from ecm_jax.models.layers import (
  Conv2D,
  LayerSettings,
  at_least_float32,
  check_input,
  matmul_precision_scope,
)

STEM_WIDTH = 64
STAGE1_PLANES = 64  # Bottleneck inner width in stage 1; its output is 4x this
BOTTLENECK_EXPANSION = 4
# The official init_weights: nn.init.normal_(conv.weight, std=0.001).
KERNEL_INIT = nn.initializers.normal(stddev=0.001)


@dataclasses.dataclass(frozen=True)
class Structure:
  """Depth of HRNetV2: stage-1 Bottlenecks, HR modules in stages 2, 3, 4 (2, 3, 4 branches), and
  BasicBlocks per branch in every module."""
  stage1_blocks: int
  modules: tuple[int, int, int]
  blocks: int


# Keyed by the size suffix after 'w<N>' (the official experiment yaml files' STAGE configs).
STRUCTURES = {'': Structure(4, (1, 4, 3), 4), '_small_v2': Structure(2, (1, 3, 2), 2)}
PUBLISHED_SIZES = ('w18_small_v2', 'w18', 'w32', 'w48')


def parse_size(size: str) -> tuple[int, Structure]:
  """'w<N>' or 'w<N>_small_v2' -> (width N, its Structure); ValueError naming the choices else."""
  match = re.fullmatch(r'w([1-9][0-9]*)(_small_v2)?', size)
  if match is None:
    raise ValueError(f'model.hrnet_size must be one of {PUBLISHED_SIZES} (or any w<N> / '
                     f'w<N>_small_v2: the same structure at width N), got {size!r}')
  return int(match.group(1)), STRUCTURES[match.group(2) or '']


def branch_widths(width: int, branches: int) -> tuple[int, ...]:
  """Branch i (resolution 1/2^(i+2)) has width W 2^i."""
  return tuple(width * 2**i for i in range(branches))


class ConvBN(nn.Module):
  """k x k conv (no bias, stride `stride`, padding (k-1)/2) -> BN (`conv`, `bn`), then ReLU when
  `relu`: the official `nn.Sequential(Conv2d, BatchNorm2d[, ReLU])` of transitions and fusions."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  relu: bool = True
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k = self.kernel_size
    y = Conv2D(self.features, (k, k), stride=self.stride, kernel_init=KERNEL_INIT,
               settings=self.settings, name='conv')(x)
    y = self.settings.batch_norm('bn')(y, train)
    return nn.relu(y) if self.relu else y


class Stem(nn.Module):
  """Two 3x3 s2 convs to 64, each with BN and ReLU (`conv1`, `bn1`, `conv2`, `bn2`): 1/4."""
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in (1, 2):
      x = Conv2D(STEM_WIDTH, (3, 3), stride=2, kernel_init=KERNEL_INIT, settings=self.settings,
                 name=f'conv{i}')(x)
      x = nn.relu(self.settings.batch_norm(f'bn{i}')(x, train))
    return x


class Bottleneck(nn.Module):
  """ReLU(BN(1x1 4P) . ReLU . BN(3x3 P) . ReLU . BN(1x1 P) x + shortcut), P = `planes`; the
  shortcut is BN(1x1 conv x) (`downsample_conv`, `downsample_bn`) when x is not 4P wide."""
  planes: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s, out = self.settings, self.planes * BOTTLENECK_EXPANSION
    y = x
    for i, (width, k) in enumerate(((self.planes, 1), (self.planes, 3), (out, 1)), start=1):
      if i > 1:
        y = nn.relu(y)
      y = Conv2D(width, (k, k), kernel_init=KERNEL_INIT, settings=s, name=f'conv{i}')(y)
      y = s.batch_norm(f'bn{i}')(y, train)
    shortcut = x
    if x.shape[-1] != out:
      shortcut = Conv2D(out, (1, 1), kernel_init=KERNEL_INIT, settings=s,
                        name='downsample_conv')(x)
      shortcut = s.batch_norm('downsample_bn')(shortcut, train)
    return nn.relu(y + shortcut)


class BasicBlock(nn.Module):
  """ReLU(BN(3x3) . ReLU . BN(3x3) x + x) (`conv1`, `bn1`, `conv2`, `bn2`); input width = output
  width in every HR module, so the shortcut is the identity."""
  features: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s = self.settings
    y = Conv2D(self.features, (3, 3), kernel_init=KERNEL_INIT, settings=s, name='conv1')(x)
    y = nn.relu(s.batch_norm('bn1')(y, train))
    y = Conv2D(self.features, (3, 3), kernel_init=KERNEL_INIT, settings=s, name='conv2')(y)
    return nn.relu(s.batch_norm('bn2')(y, train) + x)


class Branch(nn.Module):
  """`blocks` residual blocks in sequence (`block{b}`): Bottlenecks of `features` planes when
  `bottleneck` (stage 1), else BasicBlocks of width `features` (one branch of an HR module)."""
  features: int
  blocks: int
  bottleneck: bool = False
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    block = Bottleneck if self.bottleneck else BasicBlock
    for b in range(self.blocks):
      x = block(self.features, self.settings, name=f'block{b}')(x, train)
    return x


class Transition(nn.Module):
  """Branches in -> `widths` branches out: an existing branch i passes unchanged when its width is
  widths[i], else through 3x3 conv BN ReLU (`branch{i}`); each new branch is 3x3 s2 conv BN ReLU of
  the lowest-resolution input (`branch{i}`)."""
  widths: tuple[int, ...]
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, xs: list[jax.Array], train: bool) -> list[jax.Array]:
    out = []
    for i, width in enumerate(self.widths):
      if i < len(xs) and xs[i].shape[-1] == width:
        out.append(xs[i])
      else:
        stride, source = (1, xs[i]) if i < len(xs) else (2, xs[-1])
        out.append(ConvBN(width, 3, stride, settings=self.settings, name=f'branch{i}')(
            source, train))
    return out


class Downsample(nn.Module):
  """Fusion path from branch j to a lower-resolution branch i (`steps` = i - j): 3x3 s2 conv + BN
  (`down{k}`) `steps` times, width x_j's until the last (width `features`), ReLU between."""
  features: int
  steps: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for k in range(self.steps):
      last = k == self.steps - 1
      x = ConvBN(self.features if last else x.shape[-1], 3, 2, relu=not last,
                 settings=self.settings, name=f'down{k}')(x, train)
    return x


class Fuse(nn.Module):
  """Output branch `index` i of an HR module's fusion: ReLU(sum_j f_ij(x_j)) over every branch j in
  order (module docstring); f_ij is `from{j}` (a 1x1 `ConvBN` without ReLU for j > i, then a
  bilinear resize to x_i's size; a `Downsample` for j < i)."""
  index: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, xs: list[jax.Array], train: bool) -> jax.Array:
    i, target = self.index, xs[self.index]
    y = 0
    for j, x in enumerate(xs):
      if j > i:
        x = ConvBN(target.shape[-1], 1, relu=False, settings=self.settings, name=f'from{j}')(
            x, train)
        x = ops.resize_bilinear(x, target.shape[1:3])
      elif j < i:
        x = Downsample(target.shape[-1], i - j, self.settings, name=f'from{j}')(x, train)
      y = y + x
    return nn.relu(y)


class HRModule(nn.Module):
  """One HR module: per branch `blocks` BasicBlocks (`branch{i}`), then the fusion (`fuse{i}`), for
  every output branch (HRNetV2 keeps all resolutions)."""
  blocks: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, xs: list[jax.Array], train: bool) -> list[jax.Array]:
    xs = [Branch(x.shape[-1], self.blocks, settings=self.settings, name=f'branch{i}')(x, train)
          for i, x in enumerate(xs)]
    return [Fuse(i, self.settings, name=f'fuse{i}')(xs, train) for i in range(len(xs))]


class Stage(nn.Module):
  """`num_modules` HR modules in sequence (`module{m}`)."""
  num_modules: int
  blocks: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, xs: list[jax.Array], train: bool) -> list[jax.Array]:
    for m in range(self.num_modules):
      xs = HRModule(self.blocks, self.settings, name=f'module{m}')(xs, train)
    return xs


class Head(nn.Module):
  """The HRNetV2 representation head (official `last_layer`): every branch resized bilinearly to
  branch 0's size (1/4), concat (C = sum of the widths), 1x1 conv C -> C with bias (`conv1`), BN
  (`bn`), ReLU, 1x1 conv -> classes with bias (`conv2`). Returns the 1/4-resolution logits."""
  num_classes: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, xs: list[jax.Array], train: bool) -> jax.Array:
    s, size = self.settings, xs[0].shape[1:3]
    y = jnp.concatenate([ops.resize_bilinear(x, size) for x in xs], axis=-1)
    y = Conv2D(y.shape[-1], (1, 1), use_bias=True, kernel_init=KERNEL_INIT, settings=s,
               name='conv1')(y)
    y = nn.relu(s.batch_norm('bn')(y, train))
    return Conv2D(self.num_classes, (1, 1), use_bias=True, kernel_init=KERNEL_INIT, settings=s,
                  name='conv2')(y)


class HRNetV2(nn.Module):
  """HRNetV2 segmentation network (module docstring): x (B, H, W, in_channels) -> {'logits':
  (B, H, W, num_classes)} float32, H and W multiples of 32 (the lowest branch is at 1/32).

  Submodules: `stem`, `stage1` (a Bottleneck `Branch`), `transition{1,2,3}`, `stage{2,3,4}`,
  `head`. `size`: 'w18_small_v2' | 'w18' | 'w32' | 'w48', or any 'w<N>' / 'w<N>_small_v2'.
  """
  size: str = 'w18'
  in_channels: int = 1
  num_classes: int = 1
  settings: LayerSettings = LayerSettings()

  def __post_init__(self):
    parse_size(self.size)  # a bad size fails where the model is built, not at its first call
    super().__post_init__()

  def input_multiple(self) -> int:
    return 32

  def smallest_input(self) -> int:
    return 32

  @nn.compact
  @matmul_precision_scope
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    check_input(x, self, 'five stride-2 convolutions: the lowest branch is at 1/32')
    s = self.settings
    width, structure = parse_size(self.size)
    y = Stem(s, name='stem')(x.astype(s.dtype), train)
    xs = [Branch(STAGE1_PLANES, structure.stage1_blocks, bottleneck=True, settings=s,
                 name='stage1')(y, train)]
    for n, modules in enumerate(structure.modules, start=2):
      xs = Transition(branch_widths(width, n), s, name=f'transition{n - 1}')(xs, train)
      xs = Stage(modules, structure.blocks, s, name=f'stage{n}')(xs, train)
    logits = ops.resize_bilinear(Head(self.num_classes, s, name='head')(xs, train), x.shape[1:3])
    return {'logits': logits.astype(at_least_float32(logits.dtype))}
