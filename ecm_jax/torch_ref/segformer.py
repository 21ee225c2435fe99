"""torch.nn mirror of `ecm_jax.models.segformer`: SegFormer (Xie et al., NeurIPS 2021), the MiT
encoder and the all-MLP decoder of the official NVlabs/SegFormer code (commit 65fa8cfa), under
the Flax module names (`stage1.block0.attn.kv.weight` <-> `params/stage1/block0/attn/kv/kernel`).

Conventions as `ecm_jax.torch_ref.models`: NCHW in and out, input widths at construction, train /
eval by `module.train()` / `.eval()`. Inside a block the map is a token sequence (B, HW, C), as in
the official code; every block, stage and the decoder take and return NCHW maps, so that their
outputs are the parity report's per-block rows (`BLOCK_TYPES`).

The parameters are initialised as the official code initialises them (the Flax module docstring
lists the rules), so that a mirror built here is also a reference for the Flax initialisation.
"""

import math

import torch
from torch import nn
import torch.nn.functional as F

from ecm_jax.models.segformer import (
  BLOCK_EPSILON,
  EMBED_EPSILON,
  HEADS,
  MLP_RATIO,
  PATCHES,
  REDUCTIONS,
  TRUNC_STD,
  drop_path_rates,
  mit_size,
)
from ecm_jax.torch_ref.models import (
  Conv2D,
  Dense,
  LayerNorm,
  LayerSettings,
  resize_bilinear,
)


def _tokens(x: torch.Tensor) -> torch.Tensor:
  """(B, C, H, W) -> (B, HW, C), positions in row-major (h, w) order."""
  return x.flatten(2).transpose(1, 2)


def _map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
  """(B, HW, C) -> (B, C, H, W)."""
  return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _init_encoder(module: nn.Module) -> None:
  """MiT's `_init_weights`: Linear trunc_normal(std 0.02) bias 0, LayerNorm 1 / 0 (the default),
  Conv N(0, 2 / fan_out) with fan_out = k * k * Cout // groups, bias 0."""
  if isinstance(module, nn.Linear):
    nn.init.trunc_normal_(module.weight, std=TRUNC_STD, a=-2.0, b=2.0)
    nn.init.zeros_(module.bias)
  elif isinstance(module, nn.Conv2d):
    kh, kw = module.kernel_size
    fan_out = kh * kw * module.out_channels // module.groups
    nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    nn.init.zeros_(module.bias)


class DropPath(nn.Module):
  """Stochastic depth (timm's `DropPath`): in train mode a sample's input is zeroed with
  probability `rate` and the rest scaled by 1 / (1 - rate); identity in eval mode or at rate 0."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.rate == 0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class OverlapPatchEmbed(nn.Module):
  """Conv k x k stride s padding k // 2 with bias (`proj`) -> LayerNorm eps 1e-5 (`norm`).
  `segformer.OverlapPatchEmbed`."""

  def __init__(self, in_features: int, features: int, kernel: int, stride: int):
    super().__init__()
    self.proj = Conv2D(in_features, features, (kernel, kernel), use_bias=True, stride=stride,
                       padding=kernel // 2)
    self.norm = LayerNorm(features, EMBED_EPSILON)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.proj(x)
    return _map(self.norm(_tokens(y)), *y.shape[2:])


class EfficientSelfAttention(nn.Module):
  """softmax(Q K^T / sqrt(d_head)) V W_proj with K, V from the map reduced R x R (`q`, `sr`,
  `norm`, `kv`, `proj`), on tokens (B, HW, C). `segformer.EfficientSelfAttention`."""

  def __init__(self, features: int, heads: int, reduction: int):
    super().__init__()
    self.heads, self.reduction = heads, reduction
    self.q = Dense(features, features)
    if reduction > 1:
      self.sr = Conv2D(features, features, (reduction, reduction), use_bias=True, stride=reduction,
                       padding=0)
      self.norm = LayerNorm(features, EMBED_EPSILON)
    self.kv = Dense(features, 2 * features)
    self.proj = Dense(features, features)

  def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, c = x.shape
    head_dim = c // self.heads
    q = self.q(x).reshape(b, n, self.heads, head_dim).transpose(1, 2)
    if self.reduction > 1:
      x = self.norm(_tokens(self.sr(_map(x, h, w))))
    kv = self.kv(x).reshape(b, -1, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
    attention = torch.softmax((q @ kv[0].transpose(-2, -1)) * head_dim**-0.5, dim=-1)
    return self.proj((attention @ kv[1]).transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
  """Linear(C, 4C) (`fc1`) -> depthwise Conv3x3 (`dwconv`) -> GELU -> Linear (`fc2`), on tokens.
  `segformer.MixFFN`."""

  def __init__(self, features: int):
    super().__init__()
    hidden = MLP_RATIO * features
    self.fc1 = Dense(features, hidden)
    self.dwconv = Conv2D(hidden, hidden, (3, 3), use_bias=True, groups=hidden)
    self.fc2 = Dense(hidden, features)

  def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    y = _tokens(self.dwconv(_map(self.fc1(x), h, w)))
    return self.fc2(F.gelu(y))


class MixBlock(nn.Module):
  """Pre-norm transformer block with stochastic depth on both branches (`norm1`, `attn`, `norm2`,
  `mlp`), on an NCHW map. `segformer.MixBlock`."""

  def __init__(self, features: int, heads: int, reduction: int, drop_path: float = 0.0):
    super().__init__()
    self.norm1 = LayerNorm(features, BLOCK_EPSILON)
    self.attn = EfficientSelfAttention(features, heads, reduction)
    self.norm2 = LayerNorm(features, BLOCK_EPSILON)
    self.mlp = MixFFN(features)
    self.drop_path = DropPath(drop_path)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2:]
    t = _tokens(x)
    t = t + self.drop_path(self.attn(self.norm1(t), h, w))
    t = t + self.drop_path(self.mlp(self.norm2(t), h, w))
    return _map(t, h, w)


class MiTStage(nn.Module):
  """`patch_embed`, `block0`.., LayerNorm eps 1e-6 (`norm`). `segformer.MiTStage`."""

  def __init__(self, in_features: int, features: int, heads: int, reduction: int, kernel: int,
               stride: int, drop_paths: tuple[float, ...]):
    super().__init__()
    self.patch_embed = OverlapPatchEmbed(in_features, features, kernel, stride)
    for j, rate in enumerate(drop_paths):
      self.add_module(f'block{j}', MixBlock(features, heads, reduction, rate))
    self.depth = len(drop_paths)
    self.norm = LayerNorm(features, BLOCK_EPSILON)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.patch_embed(x)
    for j in range(self.depth):
      x = self.get_submodule(f'block{j}')(x)
    return _map(self.norm(_tokens(x)), *x.shape[2:])


class AllMLPDecoder(nn.Module):
  """`linear_c1`..`linear_c4`, `linear_fuse`, `bn`, Dropout2d, `linear_pred`, at stage 1's size.
  `segformer.AllMLPDecoder`."""

  def __init__(self, in_features: tuple[int, ...], features: int, num_classes: int, dropout: float,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    for i, width in enumerate(in_features):
      self.add_module(f'linear_c{i + 1}', Dense(width, features))
    self.linear_fuse = Conv2D(len(in_features) * features, features, (1, 1))
    self.bn = settings.batch_norm(features)
    self.dropout = nn.Dropout2d(dropout)
    self.linear_pred = Conv2D(features, num_classes, (1, 1), use_bias=True)
    # mmcv ConvModule: kaiming_init(mode='fan_out', nonlinearity='relu'), normal.
    nn.init.kaiming_normal_(self.linear_fuse.weight, mode='fan_out', nonlinearity='relu')

  def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
    size = tuple(stages[0].shape[2:])
    embedded = []
    for i, f in enumerate(stages):
      linear = self.get_submodule(f'linear_c{i + 1}')
      embedded.append(resize_bilinear(_map(linear(_tokens(f)), *f.shape[2:]), size))
    y = F.relu(self.bn(self.linear_fuse(torch.cat(embedded[::-1], dim=1))))
    return self.linear_pred(self.dropout(y))


class SegFormer(nn.Module):
  """`segformer.SegFormer`: `stage1`..`stage4`, `decode_head`, logits resized to the input."""

  def __init__(self, size: str = 'b0', drop_path: float = 0.1, dropout: float = 0.1,
               in_channels: int = 1, num_classes: int = 1,
               settings: LayerSettings = LayerSettings()):
    super().__init__()
    spec = mit_size(size)
    rates = drop_path_rates(spec.depths, drop_path)
    width, first = in_channels, 0
    for i, (features, depth) in enumerate(zip(spec.widths, spec.depths)):
      kernel, stride = PATCHES[i]
      self.add_module(f'stage{i + 1}', MiTStage(width, features, HEADS[i], REDUCTIONS[i], kernel,
                                                stride, tuple(rates[first:first + depth])))
      width, first = features, first + depth
    self.apply(_init_encoder)  # before the head exists: its layers keep their own init
    self.decode_head = AllMLPDecoder(spec.widths, spec.decoder_width, num_classes, dropout,
                                     settings)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    stages, y = [], x
    for i in range(len(HEADS)):
      y = self.get_submodule(f'stage{i + 1}')(y)
      stages.append(y)
    return {'logits': resize_bilinear(self.decode_head(stages), tuple(x.shape[2:]))}


BLOCK_TYPES = (MiTStage, MixBlock, AllMLPDecoder)
