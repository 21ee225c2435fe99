"""CoAG-MuSFu, collaborative-attention-guided multi-scale fusion at the bottleneck (Sec. III-A)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecm_jax.models.aspp import MultiScale
from ecm_jax.models.attention import CollaborativeAttention
from ecm_jax.models.layers import ConvBNReLU, LayerSettings

FUSIONS = ('fuse', 'add', 'series')


class CoAGMuSFu(nn.Module):
  """F -> F_out on the last encoder feature map F, C channels in and out.

  CoA (eq. 4, `coa`) gives F_A, MuS (`mus`) gives F_S, and `fusion` joins them (Table III):
  'fuse' (eq. 10): F_out = ReLU(BN(Conv1x1(concat(F_A, F_S)))) (`fuse`); 'add': F_A + F_S;
  'series': MuS(CoA(F)). With only one of CoA (cc or sc on) and MuS, F_out is that block's output;
  with neither, F_out = F (plain U-Net).
  """
  cc: bool = True
  sc: bool = True
  mus: bool = True
  fusion: str = 'fuse'
  cc_hidden: int = 8
  sc_scale: str = 'none'
  mus_channels: int = 256
  mus_rates: Sequence[int] = (6, 12, 18)
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    if self.fusion not in FUSIONS:
      raise ValueError(f'fusion must be one of {FUSIONS}, got {self.fusion!r}')
    use_coa = self.cc or self.sc
    if use_coa:
      coa = CollaborativeAttention(self.cc, self.sc, self.cc_hidden, self.sc_scale, self.settings,
                                   name='coa')
    if self.mus:
      mus = MultiScale(self.mus_channels, tuple(self.mus_rates), self.settings, name='mus')
    if not self.mus:
      return coa(f, train) if use_coa else f
    if not use_coa:
      return mus(f, train)
    if self.fusion == 'series':
      return mus(coa(f, train), train)
    f_a, f_s = coa(f, train), mus(f, train)
    if self.fusion == 'add':
      return f_a + f_s
    fused = jnp.concatenate([f_a, f_s], axis=-1)  # eq. (10)
    return ConvBNReLU(f.shape[-1], (1, 1), settings=self.settings, name='fuse')(fused, train)
