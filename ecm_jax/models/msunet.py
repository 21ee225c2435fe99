"""MSU-Net, a Table I baseline: Su et al., "MSU-Net: Multi-Scale U-Net for 2D Medical Image
Segmentation", Frontiers in Genetics 2021, as in the authors' code (CN-zdy/MSU_Net, `models.py`,
class `MSU_Net`, commit 471393f5).

A U-Net (Ronneberger et al. 2015) of depth 5 whose every block is the multi-scale block
`conv_3_1`: two (3x3 conv -> BN -> ReLU) in parallel with two (7x7 conv -> BN -> ReLU), the two
concatenated [3x3, 7x7] and projected by a 1x1 conv with bias (no BN, no activation):

  encoder0..4   multi-scale blocks at features[0..4], 2x2 max-pool between levels
  up{i}         2x2 stride-2 transposed conv with bias features[i+1] -> features[i] (no BN/ReLU)
  decoder{i}    multi-scale block on concat[skip_i, up_i] (2 features[i] -> features[i])
  head          1x1 conv with bias to num_classes: logits at the input's size

Every conv has a bias, also those followed by BN (as the original). Initialisation: PyTorch's
default everywhere (the original defines `init_weights` but never calls it). At the defaults
(32, 64, 128, 256, 512): 47,084,545 parameters.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecm_jax.models import ops
from ecm_jax.models.layers import (
  Conv2D,
  LayerSettings,
  PatchUpsample,
  at_least_float32,
  check_input,
  matmul_precision_scope,
)

BRANCH_KERNELS = (3, 7)  # the kernel sizes of a multi-scale block's parallel branches


class ConvBlock(nn.Module):
  """Two (k x k 'same' conv with bias -> BN -> ReLU): `conv0`, `bn0`, `conv1`, `bn1` (the
  original's `conv_block_3` / `conv_block_7`)."""
  features: int
  kernel_size: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k = self.kernel_size
    for i in range(2):
      x = Conv2D(self.features, (k, k), use_bias=True, settings=self.settings, name=f'conv{i}')(x)
      x = nn.relu(self.settings.batch_norm(f'bn{i}')(x, train))
    return x


class MultiScaleBlock(nn.Module):
  """`conv_3_1`: Conv1x1 with bias (`fuse`) of concat[branch3(x), branch7(x)], the branches
  `ConvBlock`s of kernel 3 and 7 (`branch3`, `branch7`): (B, H, W, Cin) -> (B, H, W, features)."""
  features: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    branches = [ConvBlock(self.features, k, self.settings, name=f'branch{k}')(x, train)
                for k in BRANCH_KERNELS]
    return Conv2D(self.features, (1, 1), use_bias=True, settings=self.settings, name='fuse')(
        jnp.concatenate(branches, axis=-1))


class MSUNet(nn.Module):
  """MSU-Net (`MSU_Net`): see the module docstring. `features`: the five level widths."""
  features: Sequence[int] = (32, 64, 128, 256, 512)
  in_channels: int = 1
  num_classes: int = 1
  settings: LayerSettings = LayerSettings()

  def input_multiple(self) -> int:
    return 2**(len(self.features) - 1)

  def smallest_input(self) -> int:
    return self.input_multiple()

  @nn.compact
  @matmul_precision_scope
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    check_input(x, self, f'{len(self.features) - 1} 2x2 max-pools')
    s = self.settings
    levels = []
    y = x.astype(s.dtype)
    for i, width in enumerate(self.features):
      if i:
        y = ops.max_pool_2x2(y)
      y = MultiScaleBlock(width, s, name=f'encoder{i}')(y, train)
      levels.append(y)
    for i in reversed(range(len(self.features) - 1)):
      up = PatchUpsample(self.features[i], 2, settings=s, name=f'up{i}')(y)
      y = MultiScaleBlock(self.features[i], s, name=f'decoder{i}')(
          jnp.concatenate([levels[i], up], axis=-1), train)
    logits = Conv2D(self.num_classes, (1, 1), use_bias=True, settings=s, name='head')(y)
    return {'logits': logits.astype(at_least_float32(logits.dtype))}
