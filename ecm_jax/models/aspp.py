"""MuS, the atrous spatial pyramid pooling multi-scale block (Sec. III-A-2, Fig. 1c; DeepLabV3)."""

from collections.abc import Sequence
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecm_jax.models.layers import ConvBNReLU, LayerSettings, at_least_float32


class ImagePooling(nn.Module):
  """ASPP image-level branch: global mean -> Conv1x1 -> BN -> ReLU, broadcast to H x W.

  The branch runs in at least float32 whatever the compute dtype: it works on (B, 1, 1, C), so it
  costs nothing, and its BatchNorm normalises B values per channel, which in bfloat16 would turn
  rounding into most of its gradient. The broadcast output is in the compute dtype.
  """
  features: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    wide = at_least_float32(f.dtype)
    pooled = jnp.mean(f.astype(wide), axis=(1, 2), keepdims=True)
    settings = dataclasses.replace(self.settings, dtype=wide)
    y = ConvBNReLU(self.features, (1, 1), settings=settings, name='conv_bn_relu')(pooled, train)
    return jnp.broadcast_to(y.astype(f.dtype), f.shape[:3] + (self.features,))


class MultiScale(nn.Module):
  """MuS block: five parallel branches on F, each with `channels` outputs -> BN -> ReLU:
  Conv1x1 (`conv1x1`), Conv3x3 at each dilation of `rates` (`atrous0`, `atrous1`, ...) and image
  pooling (`image_pool`); concatenated with F itself ("concatenated the results with the input
  feature maps") and projected back to C channels by Conv1x1 -> BN -> ReLU (`project`): F_S.
  """
  channels: int = 256
  rates: Sequence[int] = (6, 12, 18)
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    s = self.settings
    branches = [ConvBNReLU(self.channels, (1, 1), settings=s, name='conv1x1')(f, train)]
    for i, rate in enumerate(self.rates):
      atrous = ConvBNReLU(self.channels, (3, 3), rate, settings=s, name=f'atrous{i}')
      branches.append(atrous(f, train))
    branches.append(ImagePooling(self.channels, s, name='image_pool')(f, train))
    stacked = jnp.concatenate(branches + [f], axis=-1)
    return ConvBNReLU(f.shape[-1], (1, 1), settings=s, name='project')(stacked, train)
