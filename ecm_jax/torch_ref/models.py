"""torch.nn mirror of `ecm_jax.models`: the same networks, module for module, under the same names.

`build_torch_model(config.model)` builds what `ecm_jax.models.networks.build_model` builds,
for every row of `configs.default.VARIANTS`. Each class here has the name of its Flax counterpart
(in `ecm_jax.models`: `layers`, `attention`, `aspp`, `bottleneck`, `side_output`, `networks`) and its children
the Flax submodule names, so a torch state_dict key is the Flax variable path joined by dots
(`encoder.level0.block0.conv3x3.weight` <-> `params/encoder/level0/block0/conv3x3/kernel`);
`ecm_jax.torch_ref.convert` maps the values.

Differences that are conventions, not maths:
  * NCHW: the model maps x (B, in_channels, H, W) to a dict of (B, num_classes, H, W) logits.
  * Torch modules need their input widths at construction (Flax infers them), so every
    constructor takes them first.
  * Train / eval mode is `module.train()` / `module.eval()` rather than a `train` argument.
  * BatchNorm is `torch.nn.BatchNorm2d/1d` with momentum 1 - `bn_momentum` (`bn_momentum` is the
    Flax convention) and eps `bn_epsilon`; the Flax `layers.BatchNorm` has these exact semantics.
  * Parameters are float32 (`.double()` for float64); `model.dtype` and `model.conv_impl` select
    JAX kernels and have no torch counterpart.
  * The 2x2 max-pool is `F.max_pool2d`; `ops.max_pool_2x2` sends a window's gradient to its first
    maximum in row-major order as torch does, so the gradients agree even on ties.
"""

from collections.abc import Sequence
import dataclasses

import ml_collections
import torch
from torch import nn
import torch.nn.functional as F

from ecm_jax.models import networks as flax_models
from ecm_jax.models.layers import EC_BRANCHES
from ecm_jax.models.side_output import SIDE_SCALES

# --- layers (ecm_jax.models.layers) ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerSettings:
  """BatchNorm constants from `config.model`; `bn_momentum` is the Flax one (0.9 = torch 0.1)."""
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  def batch_norm(self, num_features: int, ndim: int = 2) -> nn.Module:
    """BatchNorm2d (ndim 2, NCHW) or BatchNorm1d (ndim 1, (B, C, L)) with these constants."""
    cls = nn.BatchNorm2d if ndim == 2 else nn.BatchNorm1d
    return cls(num_features, eps=self.bn_epsilon, momentum=1.0 - self.bn_momentum)


class Conv2D(nn.Conv2d):
  """2D convolution, `layers.Conv2D`: padding None is 'same' for odd kernels."""

  def __init__(self, in_features: int, features: int, kernel_size: tuple[int, int] = (3, 3),
               dilation: int = 1, use_bias: bool = False, stride: int = 1,
               padding: int | None = None, groups: int = 1):
    kh, kw = kernel_size
    if padding is None:
      padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    super().__init__(in_features, features, (kh, kw), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=use_bias)


class ConvTranspose2D(nn.ConvTranspose2d):
  """Transposed convolution, `layers.ConvTranspose2D`."""

  def __init__(self, in_features: int, features: int, kernel_size: int, stride: int,
               padding: int = 0, output_padding: int = 0, use_bias: bool = True):
    super().__init__(in_features, features, kernel_size, stride=stride, padding=padding,
                     output_padding=output_padding, bias=use_bias)


class Dense(nn.Linear):
  """`layers.Dense` (`torch.nn.Linear`)."""

  def __init__(self, in_features: int, features: int, use_bias: bool = True):
    super().__init__(in_features, features, bias=use_bias)


class LayerNorm(nn.LayerNorm):
  """`layers.layer_norm` (`torch.nn.LayerNorm` over the last axis)."""

  def __init__(self, features: int, epsilon: float):
    super().__init__(features, eps=epsilon)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
  """`ops.resize_bilinear` on NCHW."""
  if tuple(x.shape[2:]) == tuple(size):
    return x
  return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class PatchUpsample(nn.ConvTranspose2d):
  """Transposed convolution with kernel == stride, `layers.PatchUpsample`."""

  def __init__(self, in_features: int, features: int, scale: int = 2, use_bias: bool = True):
    super().__init__(in_features, features, scale, stride=scale, bias=use_bias)


class Conv1D(nn.Conv1d):
  """1D convolution of (B, Cin, L), padding (k-1)//2, `layers.Conv1D`."""

  def __init__(self, in_features: int, features: int, kernel_size: int, stride: int = 1,
               use_bias: bool = False):
    super().__init__(in_features, features, kernel_size, stride=stride,
                     padding=(kernel_size - 1) // 2, bias=use_bias)


class PatchUpsample1D(nn.ConvTranspose1d):
  """1D transposed convolution with kernel == stride, no bias, `layers.PatchUpsample1D`."""

  def __init__(self, in_features: int, features: int, scale: int = 2):
    super().__init__(in_features, features, scale, stride=scale, bias=False)


class ConvBNReLU(nn.Module):
  """Conv (no bias) -> BatchNorm -> ReLU (`conv`, `bn`), `layers.ConvBNReLU`."""

  def __init__(self, in_features: int, features: int, kernel_size: tuple[int, int] = (3, 3),
               dilation: int = 1, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv = Conv2D(in_features, features, kernel_size, dilation)
    self.bn = settings.batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.bn(self.conv(x)))


class EnhancedConv(nn.Module):
  """EC: ReLU(BN(Conv3x3 x) + BN(Conv1x3 x) + BN(Conv3x1 x)), own BN per branch (`conv3x3`,
  `bn3x3`, ...); `folded`: one 3x3 conv with bias (`conv_folded`) -> ReLU. `layers.EnhancedConv`."""

  def __init__(self, in_features: int, features: int, folded: bool = False,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.folded = folded
    if folded:
      self.conv_folded = Conv2D(in_features, features, (3, 3), use_bias=True)
    else:
      for branch, size in EC_BRANCHES.items():
        self.add_module(f'conv{branch}', Conv2D(in_features, features, size))
        self.add_module(f'bn{branch}', settings.batch_norm(features))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.folded:
      return F.relu(self.conv_folded(x))
    y = 0
    for branch in EC_BRANCHES:
      y = y + self.get_submodule(f'bn{branch}')(self.get_submodule(f'conv{branch}')(x))
    return F.relu(y)


class DoubleConv(nn.Module):
  """Two conv blocks (`block0`, `block1`), EC blocks when `ec`, `layers.DoubleConv`."""

  def __init__(self, in_features: int, features: int, ec: bool = False, ec_folded: bool = False,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    for i in range(2):
      width = in_features if i == 0 else features
      if ec:
        block = EnhancedConv(width, features, ec_folded, settings)
      else:
        block = ConvBNReLU(width, features, settings=settings)
      self.add_module(f'block{i}', block)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.block1(self.block0(x))


# --- attention blocks (ecm_jax.models.attention) --------------------------------------------------

def _positions(x: torch.Tensor) -> torch.Tensor:
  """(B, C, H, W) -> (B, HW, C), positions in row-major (h, w) order as the Flax reshape."""
  b, c, h, w = x.shape
  return x.reshape(b, c, h * w).transpose(1, 2)


def _unpositions(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
  """(B, HW, C) -> the (B, C, H, W) shape of `like`."""
  return x.transpose(1, 2).reshape(like.shape)


class ChannelCorrelation(nn.Module):
  """CC, eqs. (5)-(7): channel weights from a 1D encoder-decoder over the length-C sequence of
  channel means; returns F * Theta. `attention.ChannelCorrelation`."""

  def __init__(self, hidden: int = 8, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv_in = Conv1D(1, hidden, 3)
    self.bn_in = settings.batch_norm(hidden, ndim=1)
    self.conv_down = Conv1D(hidden, hidden, 7, stride=2)
    self.bn_down = settings.batch_norm(hidden, ndim=1)
    self.deconv_up = PatchUpsample1D(hidden, hidden, 2)
    self.bn_up = settings.batch_norm(hidden, ndim=1)
    self.conv_out = Conv1D(hidden, 1, 3, use_bias=True)

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    channels = f.shape[1]
    if channels % 2:
      raise ValueError(f'channel-correlation attention needs an even channel count (stride-2 '
                       f'encoder-decoder over channels), got {channels}')
    theta = f.mean(dim=(2, 3))  # eq. (5), (B, C)
    h = theta[:, None, :]  # one channel, length C
    h = F.relu(self.bn_in(self.conv_in(h)))
    h = F.relu(self.bn_down(self.conv_down(h)))
    h = F.relu(self.bn_up(self.deconv_up(h)))
    weights = torch.sigmoid(self.conv_out(h))[:, 0]  # eq. (6), (B, C)
    return f * weights[:, :, None, None]  # eq. (7)


class SpatialCorrelation(nn.Module):
  """SC, eqs. (8)-(9): S = softmax(E E^T) over positions, (B, HW, HW).
  `attention.SpatialCorrelation`."""

  def __init__(self, scale: str = 'none'):
    super().__init__()
    if scale not in ('none', 'rsqrt_c'):
      raise ValueError(f"sc_scale must be 'none' or 'rsqrt_c', got {scale!r}")
    self.scale = scale

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    e = _positions(f)  # eq. (8)
    logits = e @ e.transpose(1, 2)
    if self.scale == 'rsqrt_c':
      logits = logits * f.shape[1]**-0.5
    return torch.softmax(logits, dim=-1)  # eq. (9)


class CollaborativeAttention(nn.Module):
  """CoA, eq. (4): F_A = S @ F_C + F (`cc`, `sc`). `attention.CollaborativeAttention`."""

  def __init__(self, cc: bool = True, sc: bool = True, cc_hidden: int = 8, sc_scale: str = 'none',
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    if not (cc or sc):
      raise ValueError('CollaborativeAttention needs cc or sc (or both) on')
    self.cc = ChannelCorrelation(cc_hidden, settings) if cc else None
    self.sc = SpatialCorrelation(sc_scale) if sc else None

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    f_c = self.cc(f) if self.cc is not None else f
    if self.sc is not None:
      attended = _unpositions(self.sc(f) @ _positions(f_c), f)
    else:
      attended = f_c
    return attended + f  # eq. (4)


class SqueezeExcitation(nn.Module):
  """SE: F * sigmoid(W2 ReLU(W1 GAP(F))) (`squeeze`, `excite`). `attention.SqueezeExcitation`."""

  def __init__(self, channels: int, reduction: int = 16):
    super().__init__()
    hidden = max(channels // reduction, 1)
    self.squeeze = Conv2D(channels, hidden, (1, 1), use_bias=True)
    self.excite = Conv2D(hidden, channels, (1, 1), use_bias=True)

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    pooled = f.mean(dim=(2, 3), keepdim=True)
    return f * torch.sigmoid(self.excite(F.relu(self.squeeze(pooled))))


class CBAM(nn.Module):
  """CBAM: channel attention (shared MLP `mlp_in`, `mlp_out` on avg- and max-pooled F), then
  spatial attention sigmoid(BN(Conv7x7([mean_c, max_c]))) (`spatial_conv`, `spatial_bn`).
  `attention.CBAM`."""

  def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    hidden = max(channels // reduction, 1)
    self.mlp_in = Conv2D(channels, hidden, (1, 1), use_bias=True)
    self.mlp_out = Conv2D(hidden, channels, (1, 1), use_bias=True)
    self.spatial_conv = Conv2D(2, 1, (spatial_kernel, spatial_kernel))
    self.spatial_bn = settings.batch_norm(1)

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    mlp = lambda pooled: self.mlp_out(F.relu(self.mlp_in(pooled)))
    channel_gate = torch.sigmoid(mlp(f.mean(dim=(2, 3), keepdim=True)) +
                                 mlp(f.amax(dim=(2, 3), keepdim=True)))
    f = f * channel_gate
    pooled = torch.cat([f.mean(dim=1, keepdim=True), f.amax(dim=1, keepdim=True)], dim=1)
    return f * torch.sigmoid(self.spatial_bn(self.spatial_conv(pooled)))


class AttentionGate(nn.Module):
  """Additive attention gate: skip * sigmoid(BN(psi(ReLU(BN(W_x skip) + BN(W_g gate))))).
  `attention.AttentionGate`."""

  def __init__(self, skip_features: int, gate_features: int, inter_features: int,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.w_x = Conv2D(skip_features, inter_features, (1, 1))
    self.bn_x = settings.batch_norm(inter_features)
    self.w_g = Conv2D(gate_features, inter_features, (1, 1))
    self.bn_g = settings.batch_norm(inter_features)
    self.psi = Conv2D(inter_features, 1, (1, 1))
    self.bn_psi = settings.batch_norm(1)

  def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    x1 = self.bn_x(self.w_x(skip))
    g1 = self.bn_g(self.w_g(gate))
    return skip * torch.sigmoid(self.bn_psi(self.psi(F.relu(x1 + g1))))


class PositionAttention(nn.Module):
  """DA-Net PAM: gamma * (softmax(Q K^T) @ V) + F (`query`, `key`, `value`, `gamma`).
  `attention.PositionAttention`."""

  def __init__(self, channels: int):
    super().__init__()
    inter = max(channels // 8, 1)
    self.query = Conv2D(channels, inter, (1, 1), use_bias=True)
    self.key = Conv2D(channels, inter, (1, 1), use_bias=True)
    self.value = Conv2D(channels, channels, (1, 1), use_bias=True)
    self.gamma = nn.Parameter(torch.zeros(1))

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    query, key, value = (_positions(conv(f)) for conv in (self.query, self.key, self.value))
    attention = torch.softmax(query @ key.transpose(1, 2), dim=-1)
    return self.gamma * _unpositions(attention @ value, f) + f


class ChannelAttention(nn.Module):
  """DA-Net CAM: gamma * (softmax(max_row(X X^T) - X X^T) @ X) + F (`gamma`).
  `attention.ChannelAttention`."""

  def __init__(self):
    super().__init__()
    self.gamma = nn.Parameter(torch.zeros(1))

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    b, c, h, w = f.shape
    x = f.reshape(b, c, h * w)
    energy = x @ x.transpose(1, 2)  # (B, C, C)
    attention = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
    return self.gamma * (attention @ x).reshape(f.shape) + f


class DualAttention(nn.Module):
  """DA-Net head as a bottleneck block: (ConvBNReLU -> PAM -> ConvBNReLU) + (ConvBNReLU -> CAM ->
  ConvBNReLU) at C/4, then ConvBNReLU1x1 to C (`pam_in`, `pam`, `pam_out`, `cam_in`, `cam`,
  `cam_out`, `project`). `attention.DualAttention`."""

  def __init__(self, channels: int, settings: LayerSettings = LayerSettings()):
    super().__init__()
    inter = max(channels // 4, 1)
    self.pam_in = ConvBNReLU(channels, inter, settings=settings)
    self.pam = PositionAttention(inter)
    self.pam_out = ConvBNReLU(inter, inter, settings=settings)
    self.cam_in = ConvBNReLU(channels, inter, settings=settings)
    self.cam = ChannelAttention()
    self.cam_out = ConvBNReLU(inter, inter, settings=settings)
    self.project = ConvBNReLU(inter, channels, (1, 1), settings=settings)

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    position = self.pam_out(self.pam(self.pam_in(f)))
    channel = self.cam_out(self.cam(self.cam_in(f)))
    return self.project(position + channel)


# --- MuS (models.aspp) and CoAG-MuSFu (models.bottleneck) -----------------------------------------

class ImagePooling(nn.Module):
  """ASPP image-level branch: global mean -> ConvBNReLU1x1 (`conv_bn_relu`) -> broadcast to H x W.
  `aspp.ImagePooling`."""

  def __init__(self, in_features: int, features: int, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv_bn_relu = ConvBNReLU(in_features, features, (1, 1), settings=settings)

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    y = self.conv_bn_relu(f.mean(dim=(2, 3), keepdim=True))
    return y.expand(-1, -1, f.shape[2], f.shape[3])


class MultiScale(nn.Module):
  """MuS: `conv1x1`, `atrous{i}` (3x3 at each rate), `image_pool`, concatenated with F, projected
  back to C channels (`project`). `aspp.MultiScale`."""

  def __init__(self, in_features: int, channels: int = 256, rates: Sequence[int] = (6, 12, 18),
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.conv1x1 = ConvBNReLU(in_features, channels, (1, 1), settings=settings)
    self.num_rates = len(rates)
    for i, rate in enumerate(rates):
      self.add_module(f'atrous{i}', ConvBNReLU(in_features, channels, (3, 3), rate, settings))
    self.image_pool = ImagePooling(in_features, channels, settings)
    self.project = ConvBNReLU((len(rates) + 2) * channels + in_features, in_features, (1, 1),
                              settings=settings)

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    branches = [self.conv1x1(f)]
    branches += [self.get_submodule(f'atrous{i}')(f) for i in range(self.num_rates)]
    branches.append(self.image_pool(f))
    return self.project(torch.cat(branches + [f], dim=1))


class CoAGMuSFu(nn.Module):
  """F -> F_out: CoA (`coa`) and MuS (`mus`) joined by `fusion` ('fuse': ConvBNReLU1x1 on the
  concatenation, `fuse`; 'add'; 'series'). `bottleneck.CoAGMuSFu`."""

  def __init__(self, channels: int, cc: bool = True, sc: bool = True, mus: bool = True,
               fusion: str = 'fuse', cc_hidden: int = 8, sc_scale: str = 'none',
               mus_channels: int = 256, mus_rates: Sequence[int] = (6, 12, 18),
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.fusion = fusion
    use_coa = cc or sc
    self.coa = CollaborativeAttention(cc, sc, cc_hidden, sc_scale, settings) if use_coa else None
    self.mus = MultiScale(channels, mus_channels, mus_rates, settings) if mus else None
    if use_coa and mus and fusion == 'fuse':
      self.fuse = ConvBNReLU(2 * channels, channels, (1, 1), settings=settings)

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    if self.mus is None:
      return self.coa(f) if self.coa is not None else f
    if self.coa is None:
      return self.mus(f)
    if self.fusion == 'series':
      return self.mus(self.coa(f))
    f_a, f_s = self.coa(f), self.mus(f)
    if self.fusion == 'add':
      return f_a + f_s
    return self.fuse(torch.cat([f_a, f_s], dim=1))  # eq. (10)


# --- DWS (ecm_jax.models.side_output) -------------------------------------------------------------

class SideOutput(nn.Module):
  """F_out -> side logits at 16x: `deconv{i}` (kernel == stride 2, 2, 4, no bias) -> `bn{i}` ->
  ReLU, then Conv1x1 with bias (`head`). `side_output.SideOutput`."""

  def __init__(self, in_features: int, features: Sequence[int] = (256, 64, 16),
               num_classes: int = 1, settings: LayerSettings = LayerSettings()):
    super().__init__()
    if len(features) != len(SIDE_SCALES):
      raise ValueError(f'side_features needs {len(SIDE_SCALES)} widths (deconvs x2, x2, x4), '
                       f'got {tuple(features)}')
    width_in = in_features
    for i, (width, scale) in enumerate(zip(features, SIDE_SCALES)):
      self.add_module(f'deconv{i}', PatchUpsample(width_in, width, scale, use_bias=False))
      self.add_module(f'bn{i}', settings.batch_norm(width))
      width_in = width
    self.head = Conv2D(width_in, num_classes, (1, 1), use_bias=True)

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    y = f
    for i in range(len(SIDE_SCALES)):
      y = F.relu(self.get_submodule(f'bn{i}')(self.get_submodule(f'deconv{i}')(y)))
    return self.head(y)


# --- networks (ecm_jax.models.networks) -----------------------------------------------------------

def check_input(x: torch.Tensor, in_channels: int, depth: int) -> None:
  """Raises ValueError unless x is (B, in_channels, H, W) with H, W divisible by 2**(depth-1)."""
  if x.ndim != 4:
    raise ValueError(f'input x must have rank 4 (B, C, H, W), got shape {tuple(x.shape)}')
  if x.shape[1] != in_channels:
    raise ValueError(f'input x has {x.shape[1]} channels (axis 1) but model.in_channels is '
                     f'{in_channels}; shape {tuple(x.shape)}')
  factor = 2**(depth - 1)
  if x.shape[2] % factor or x.shape[3] % factor:
    raise ValueError(f'input H and W must be divisible by {factor} ({depth - 1} 2x2 max-pools), '
                     f'got H={x.shape[2]}, W={x.shape[3]}')


class Encoder(nn.Module):
  """`level{i}` (two conv blocks, EC when `ec`), 2x2 max-pool between levels; returns every level.
  `models.Encoder`."""

  def __init__(self, in_channels: int, features: Sequence[int], ec: bool = False,
               ec_folded: bool = False, settings: LayerSettings = LayerSettings()):
    super().__init__()
    widths_in = (in_channels, *features[:-1])
    for i, (width_in, width) in enumerate(zip(widths_in, features)):
      self.add_module(f'level{i}', DoubleConv(width_in, width, ec, ec_folded, settings))
    self.depth = len(features)

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    levels = []
    for i in range(self.depth):
      if i:
        x = F.max_pool2d(x, 2)
      x = self.get_submodule(f'level{i}')(x)
      levels.append(x)
    return levels


class DecoderStage(nn.Module):
  """ConvTranspose2x2 with bias (`upsample`), the skip (through `gate` when `attention_gate`)
  concatenated before the upsampled map, two plain conv blocks (`convs`). `models.DecoderStage`."""

  def __init__(self, in_features: int, skip_features: int, features: int,
               attention_gate: bool = False, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.upsample = PatchUpsample(in_features, features, 2)
    self.gate = (AttentionGate(skip_features, features, max(features // 2, 1), settings)
                 if attention_gate else None)
    self.convs = DoubleConv(skip_features + features, features, settings=settings)

  def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    up = self.upsample(x)
    if self.gate is not None:
      skip = self.gate(skip, up)
    return self.convs(torch.cat([skip, up], dim=1))


class UNet(nn.Module):
  """`encoder` -> `bottleneck` (None: identity) -> `decoder{i}` -> Conv1x1 `head`; `side_output`
  reads the bottleneck output. Returns {'logits'[, 'side_logits']}, NCHW. `models.UNet`."""

  def __init__(self, features: Sequence[int] = (64, 128, 256, 512, 1024), in_channels: int = 1,
               num_classes: int = 1, ec: bool = False, ec_folded: bool = False,
               bottleneck: nn.Module | None = None, attention_gates: bool = False,
               side_output: nn.Module | None = None, settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.features, self.in_channels = tuple(features), in_channels
    self.encoder = Encoder(in_channels, features, ec, ec_folded, settings)
    self.bottleneck = bottleneck
    self.side_output = side_output
    for i in reversed(range(len(features) - 1)):
      self.add_module(f'decoder{i}', DecoderStage(features[i + 1], features[i], features[i],
                                                  attention_gates, settings))
    self.head = Conv2D(features[0], num_classes, (1, 1), use_bias=True)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    check_input(x, self.in_channels, len(self.features))
    levels = self.encoder(x)
    y = levels[-1]
    if self.bottleneck is not None:
      y = self.bottleneck(y)
    outputs = {}
    if self.side_output is not None:
      outputs['side_logits'] = self.side_output(y)
    for i in reversed(range(len(self.features) - 1)):
      y = self.get_submodule(f'decoder{i}')(y, levels[i])
    outputs['logits'] = self.head(y)
    return outputs


class UNetPlusPlus(nn.Module):
  """U-Net++: nodes `x{i}_{j}` (two plain conv blocks) on concat(X^{i,0..j-1}, Up(X^{i+1,j-1})),
  Up = `up{i+1}_{j-1}` (ConvTranspose2x2); `head` on X^{0,4}; `side_output` on X^{4,0}.
  `models.UNetPlusPlus`."""

  def __init__(self, features: Sequence[int] = (64, 128, 256, 512, 1024), in_channels: int = 1,
               num_classes: int = 1, side_output: nn.Module | None = None,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    self.features, self.in_channels = tuple(features), in_channels
    depth = len(features)
    widths_in = (in_channels, *features[:-1])
    for i, (width_in, width) in enumerate(zip(widths_in, features)):
      self.add_module(f'x{i}_0', DoubleConv(width_in, width, settings=settings))
    for j in range(1, depth):
      for i in range(depth - j):
        self.add_module(f'up{i + 1}_{j - 1}', PatchUpsample(features[i + 1], features[i], 2))
        self.add_module(f'x{i}_{j}', DoubleConv((j + 1) * features[i], features[i],
                                                settings=settings))
    self.side_output = side_output
    self.head = Conv2D(features[0], num_classes, (1, 1), use_bias=True)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    check_input(x, self.in_channels, len(self.features))
    depth = len(self.features)
    node = lambda i, j: self.get_submodule(f'x{i}_{j}')
    nodes = {}
    y = x
    for i in range(depth):
      if i:
        y = F.max_pool2d(y, 2)
      y = nodes[i, 0] = node(i, 0)(y)
    for j in range(1, depth):
      for i in range(depth - j):
        up = self.get_submodule(f'up{i + 1}_{j - 1}')(nodes[i + 1, j - 1])
        nodes[i, j] = node(i, j)(torch.cat([nodes[i, k] for k in range(j)] + [up], dim=1))
    outputs = {}
    if self.side_output is not None:
      outputs['side_logits'] = self.side_output(nodes[depth - 1, 0])
    outputs['logits'] = self.head(nodes[0, depth - 1])
    return outputs


def build_torch_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """The torch network `config.model` describes: the mirror of `ecm_jax.models.build_model`.

  The config is validated by the Flax `build_model` (the same errors for the same config). The
  parameters have PyTorch's default initialisation; load Flax variables with
  `ecm_jax.torch_ref.convert.load_variables`.
  """
  m = model_config
  flax_models.build_model(m)  # validation only
  settings = LayerSettings(m.bn_momentum, m.bn_epsilon)
  # The Table I networks of their own design live in their own modules, which build on the layers
  # above (hence imported here, not at the top).
  from ecm_jax.torch_ref import cenet, hrnet, msunet, segformer  # pylint: disable=g-import-not-at-top
  io = dict(in_channels=m.in_channels, num_classes=m.num_classes, settings=settings)
  if m.name == 'cenet':
    return cenet.CENet(tuple(m.cenet_features), **io)
  if m.name == 'msunet':
    return msunet.MSUNet(tuple(m.msunet_features), **io)
  if m.name == 'hrnet':
    return hrnet.HRNetV2(m.hrnet_size, **io)
  if m.name == 'segformer':
    return segformer.SegFormer(m.segformer_size, m.segformer_drop_path, m.segformer_dropout, **io)
  features = tuple(m.features)
  side_output = (SideOutput(features[-1], tuple(m.side_features), m.num_classes, settings)
                 if m.dws else None)
  common = dict(features=features, in_channels=m.in_channels, num_classes=m.num_classes,
                side_output=side_output, settings=settings)
  if m.name == 'unet_pp':
    return UNetPlusPlus(**common)
  is_ec_cam_unet = m.name == 'ec_cam_unet'
  bottleneck = None
  if is_ec_cam_unet and (m.cc or m.sc or m.mus):
    bottleneck = CoAGMuSFu(features[-1], m.cc, m.sc, m.mus, m.fusion, m.cc_hidden, m.sc_scale,
                           m.mus_channels, tuple(m.mus_rates), settings)
  elif m.name == 'unet_se':
    bottleneck = SqueezeExcitation(features[-1], m.se_reduction)
  elif m.name == 'unet_cbam':
    bottleneck = CBAM(features[-1], m.se_reduction, settings=settings)
  elif m.name == 'danet':
    bottleneck = DualAttention(features[-1], settings)
  return UNet(ec=is_ec_cam_unet and m.ec, ec_folded=m.ec_folded, bottleneck=bottleneck,
              attention_gates=m.name == 'attention_unet', **common)
