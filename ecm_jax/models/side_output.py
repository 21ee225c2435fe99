"""DWS, the deeply supervised side output from the bottleneck (Sec. III-B, Fig. 2d)."""

from collections.abc import Sequence

import flax.linen as nn
import jax

from ecm_jax.models.layers import Conv2D, LayerSettings, PatchUpsample, at_least_float32

# Upsampling factors of the three deconvs: 2 x 2 x 4 = 16, bottleneck (1/16) to full resolution.
SIDE_SCALES = (2, 2, 4)


class SideOutput(nn.Module):
  """F_out (B, H/16, W/16, C) -> side logits (B, H, W, num_classes), float32 (float64 in float64).

  DeConv 2x -> BN -> ReLU, DeConv 2x -> BN -> ReLU, DeConv 4x -> BN -> ReLU (`deconv{i}`, `bn{i}`,
  widths `features`; kernel == stride, no bias as BN follows), then Conv1x1 with bias (`head`).
  A training signal only (the BCE term of eq. 13); prediction uses the main head.
  """
  features: Sequence[int] = (256, 64, 16)
  num_classes: int = 1
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    if len(self.features) != len(SIDE_SCALES):
      raise ValueError(f'side_features needs {len(SIDE_SCALES)} widths (deconvs x2, x2, x4), '
                       f'got {tuple(self.features)}')
    y = f
    for i, (width, scale) in enumerate(zip(self.features, SIDE_SCALES)):
      y = PatchUpsample(width, scale, use_bias=False, settings=self.settings, name=f'deconv{i}')(y)
      y = nn.relu(self.settings.batch_norm(f'bn{i}')(y, train))
    logits = Conv2D(self.num_classes, (1, 1), use_bias=True, settings=self.settings, name='head')(y)
    return logits.astype(at_least_float32(logits.dtype))
