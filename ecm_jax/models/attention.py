"""Attention blocks: the paper's CC, SC and CoA (eqs. 4-9), and the baselines' SE, CBAM,
Attention-U-Net gate and DA-Net position/channel attention.

Every block maps NHWC features to features of the same shape (SC returns the map S). Softmaxes and
global reductions run in at least float32 (`layers.at_least_float32`: float32 under bfloat16,
float64 in a float64 model). CC, SC and CoA `sow` their maps into the 'intermediates' collection
(`cc_weights`, `sc_attention`, `coa_output`), which is only kept when the caller passes
`mutable=['intermediates']`.
"""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from ecm_jax.models.layers import (
  Conv1D,
  Conv2D,
  ConvBNReLU,
  LayerSettings,
  PatchUpsample1D,
  at_least_float32,
)


class ChannelCorrelation(nn.Module):
  """CC, channel-correlation attention, eqs. (5)-(7) and Fig. 2(b).

  theta_k = mean_{i,j} F_{i,j,k} (eq. 5) is read as a length-C sequence with one channel and mapped
  to channel weights Theta in (0, 1) (eq. 6) by a 1D encoder-decoder:
  Conv1D(k=3) -> BN -> ReLU, Conv1D(k=7, stride 2) -> BN -> ReLU (length C/2),
  ConvTranspose1D(k=2, stride 2) -> BN -> ReLU (length C), Conv1D(k=3, 1 channel, bias) -> sigmoid.
  The paper gives neither the hidden width (`hidden`) nor the deconv kernel; k=2 restores length C
  exactly. Returns F_C = F * Theta (eq. 7); sows Theta (B, C) as `cc_weights`. Runs in float32
  (float64 in a float64 model).
  """
  hidden: int = 8
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    channels = f.shape[-1]
    if channels % 2:
      raise ValueError(f'channel-correlation attention needs an even channel count (stride-2 '
                       f'encoder-decoder over channels), got {channels}')
    wide = self.settings.param_dtype
    bn = lambda name: self.settings.batch_norm(name, dtype=wide)
    theta = jnp.mean(f.astype(wide), axis=(1, 2))  # eq. (5), (B, C)
    h = theta[:, :, None]  # a length-C sequence with one channel
    h = nn.relu(bn('bn_in')(Conv1D(self.hidden, 3, dtype=wide, name='conv_in')(h), train))
    h = nn.relu(bn('bn_down')(Conv1D(self.hidden, 7, stride=2, dtype=wide, name='conv_down')(h),
                              train))
    h = nn.relu(bn('bn_up')(PatchUpsample1D(self.hidden, 2, dtype=wide, name='deconv_up')(h),
                            train))
    weights = nn.sigmoid(Conv1D(1, 3, use_bias=True, dtype=wide, name='conv_out')(h))[..., 0]  # (6)
    self.sow('intermediates', 'cc_weights', weights)
    return f * weights[:, None, None, :].astype(f.dtype)  # eq. (7)


class SpatialCorrelation(nn.Module):
  """SC, spatial-correlation attention, eqs. (8)-(9) and Fig. 2(a): S = softmax(E E^T), (B, HW, HW).

  E = reshape(F) to (B, HW, C) (eq. 8); S_ij = exp((E E^T)_ij) / sum_j exp((E E^T)_ij) (eq. 9), no
  learned projections. `scale`: 'none' (the paper) or 'rsqrt_c' (logits times 1/sqrt(C)). The logits
  and the softmax are at least float32 (unscaled logits are large). Sows S as `sc_attention`.
  """
  scale: str = 'none'

  @nn.compact
  def __call__(self, f: jax.Array) -> jax.Array:
    b, h, w, c = f.shape
    e = f.reshape(b, h * w, c).astype(at_least_float32(f.dtype))  # eq. (8)
    logits = jnp.einsum('bic,bjc->bij', e, e, precision=lax.Precision.HIGHEST)
    if self.scale == 'rsqrt_c':
      logits = logits * c**-0.5
    elif self.scale != 'none':
      raise ValueError(f"sc_scale must be 'none' or 'rsqrt_c', got {self.scale!r}")
    s = jax.nn.softmax(logits, axis=-1)  # eq. (9)
    self.sow('intermediates', 'sc_attention', s)
    return s


class CollaborativeAttention(nn.Module):
  """CoA, multi-dimensional collaborative attention, eq. (4): F_A = S @ F_C + F.

  CC and SC both read the same F (eqs. 1-3). With SC off, S @ F_C becomes F_C; with CC off,
  F_C = F. Sows F_A (B, H, W, C) as `coa_output`.
  """
  cc: bool = True
  sc: bool = True
  cc_hidden: int = 8
  sc_scale: str = 'none'
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    if not (self.cc or self.sc):
      raise ValueError('CollaborativeAttention needs cc or sc (or both) on')
    f_c = ChannelCorrelation(self.cc_hidden, self.settings, name='cc')(f, train) if self.cc else f
    if self.sc:
      s = SpatialCorrelation(self.sc_scale, name='sc')(f)
      b, h, w, c = f.shape
      attended = jnp.einsum('bij,bjc->bic', s.astype(f.dtype), f_c.reshape(b, h * w, c))
      attended = attended.reshape(f.shape)
    else:
      attended = f_c
    f_a = attended + f  # eq. (4)
    self.sow('intermediates', 'coa_output', f_a)
    return f_a


class SqueezeExcitation(nn.Module):
  """SE block (Hu et al., CVPR 2018): F * sigmoid(W2 ReLU(W1 GAP(F))), W1 reducing C by `reduction`.

  The two fully connected layers are 1x1 convs with bias on the pooled (B,1,1,C) map. `train` is
  unused (no BatchNorm); every bottleneck block takes it.
  """
  reduction: int = 16
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    del train
    c = f.shape[-1]
    pooled = jnp.mean(f.astype(at_least_float32(f.dtype)), axis=(1, 2), keepdims=True)
    pooled = pooled.astype(f.dtype)
    hidden = nn.relu(Conv2D(max(c // self.reduction, 1), (1, 1), use_bias=True,
                            settings=self.settings, name='squeeze')(pooled))
    gate = nn.sigmoid(Conv2D(c, (1, 1), use_bias=True, settings=self.settings, name='excite')(hidden))
    return f * gate


class CBAM(nn.Module):
  """CBAM (Woo et al., ECCV 2018): channel attention, then spatial attention.

  Channel: sigmoid(MLP(avgpool F) + MLP(maxpool F)), shared MLP C -> C/`reduction` -> C (1x1 convs
  with bias). Spatial: sigmoid(BN(Conv7x7([mean_c F', max_c F']))), as in the authors' code.
  """
  reduction: int = 16
  spatial_kernel: int = 7
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    c = f.shape[-1]
    wide = at_least_float32(f.dtype)
    f_wide = f.astype(wide)
    mlp_in = Conv2D(max(c // self.reduction, 1), (1, 1), use_bias=True, settings=self.settings,
                    name='mlp_in')
    mlp_out = Conv2D(c, (1, 1), use_bias=True, settings=self.settings, name='mlp_out')
    mlp = lambda pooled: mlp_out(nn.relu(mlp_in(pooled.astype(f.dtype))))
    channel_gate = nn.sigmoid(mlp(jnp.mean(f_wide, axis=(1, 2), keepdims=True)) +
                              mlp(jnp.max(f_wide, axis=(1, 2), keepdims=True)))
    f = f * channel_gate
    f_wide = f.astype(wide)
    pooled = jnp.concatenate([jnp.mean(f_wide, axis=-1, keepdims=True),
                              jnp.max(f_wide, axis=-1, keepdims=True)], axis=-1)
    k = self.spatial_kernel
    spatial = Conv2D(1, (k, k), settings=self.settings, name='spatial_conv')(pooled.astype(f.dtype))
    return f * nn.sigmoid(self.settings.batch_norm('spatial_bn')(spatial, train))


class AttentionGate(nn.Module):
  """Additive attention gate of Attention U-Net (Oktay et al., MIDL 2018) on a skip connection.

  alpha = sigmoid(BN(psi(ReLU(BN(W_x x) + BN(W_g g))))), output x * alpha, where x is the encoder
  skip and g the gating signal: the decoder feature upsampled to the skip's resolution (the common
  PyTorch form). W_x, W_g: 1x1 convs to `inter_features`; psi: 1x1 conv to one channel.
  """
  inter_features: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, skip: jax.Array, gate: jax.Array, train: bool) -> jax.Array:
    s = self.settings
    one_by_one = lambda features, name: Conv2D(features, (1, 1), settings=s, name=name)
    x1 = s.batch_norm('bn_x')(one_by_one(self.inter_features, 'w_x')(skip), train)
    g1 = s.batch_norm('bn_g')(one_by_one(self.inter_features, 'w_g')(gate), train)
    psi = one_by_one(1, 'psi')(nn.relu(x1 + g1))
    alpha = nn.sigmoid(s.batch_norm('bn_psi')(psi, train))
    return skip * alpha


class PositionAttention(nn.Module):
  """DA-Net position attention module, PAM (Fu et al., CVPR 2019, eq. 2).

  Query/key 1x1 convs to C/8, value 1x1 conv to C (all with bias); s = softmax(Q K^T) over
  positions (at least float32); out = gamma * (s @ V) + F with a learned scalar gamma initialised
  to 0.
  """
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array) -> jax.Array:
    b, h, w, c = f.shape
    conv = lambda features, name: Conv2D(features, (1, 1), use_bias=True, settings=self.settings,
                                         name=name)(f).reshape(b, h * w, features)
    inter = max(c // 8, 1)
    query, key, value = conv(inter, 'query'), conv(inter, 'key'), conv(c, 'value')
    wide = self.settings.param_dtype
    energy = jnp.einsum('bic,bjc->bij', query.astype(wide), key.astype(wide))
    attention = jax.nn.softmax(energy, axis=-1)
    out = jnp.einsum('bij,bjc->bic', attention.astype(f.dtype), value).reshape(f.shape)
    gamma = self.param('gamma', nn.initializers.zeros, (1,), wide)
    return gamma.astype(f.dtype) * out + f


class ChannelAttention(nn.Module):
  """DA-Net channel attention module, CAM (Fu et al., CVPR 2019, eq. 4).

  energy = X X^T over channels (C x C), attention = softmax(max_row(energy) - energy) as in the
  authors' code (at least float32); out = gamma * (attention @ X) + F, gamma a learned scalar
  initialised to 0.
  """

  @nn.compact
  def __call__(self, f: jax.Array) -> jax.Array:
    b, h, w, c = f.shape
    wide = at_least_float32(f.dtype)
    x = f.reshape(b, h * w, c).astype(wide)
    energy = jnp.einsum('bic,bid->bcd', x, x)
    attention = jax.nn.softmax(jnp.max(energy, axis=-1, keepdims=True) - energy, axis=-1)
    out = jnp.einsum('bcd,bid->bic', attention, x).reshape(f.shape)
    gamma = self.param('gamma', nn.initializers.zeros, (1,), wide)
    return (gamma * out).astype(f.dtype) + f


class DualAttention(nn.Module):
  """DA-Net's attention head (Fu et al., CVPR 2019, Fig. 2) as a bottleneck block, C -> C channels.

  Two branches on F, each ConvBNReLU3x3(C/4) -> PAM | CAM -> ConvBNReLU3x3(C/4), summed (the
  paper's sum fusion), then ConvBNReLU1x1 back to C channels for the U-Net decoder.
  """
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, f: jax.Array, train: bool) -> jax.Array:
    c = f.shape[-1]
    inter = max(c // 4, 1)
    block = lambda name: ConvBNReLU(inter, settings=self.settings, name=name)
    position = block('pam_in')(f, train)
    position = block('pam_out')(PositionAttention(self.settings, name='pam')(position), train)
    channel = block('cam_in')(f, train)
    channel = block('cam_out')(ChannelAttention(name='cam')(channel), train)
    return ConvBNReLU(c, (1, 1), settings=self.settings, name='project')(position + channel, train)
