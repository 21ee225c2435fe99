"""SegFormer (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021), a Table I baseline: the Mix Transformer (MiT) encoder B0..B5 and the
all-MLP decoder, as in the official code (NVlabs/SegFormer at commit 65fa8cfa,
`mmseg/models/backbones/mix_transformer.py` and `mmseg/models/decode_heads/segformer_head.py`,
with mmcv 1.2.7's `ConvModule` for the decoder's fuse layer).

x (B, H, W, Cin) -> four stages i = 1..4 at strides 4, 8, 16, 32 (`stage{i}`), each:
  * overlapping patch embedding (`patch_embed`): Conv k x k, stride s, padding k // 2, with bias
    (7x7 s4 in stage 1, 3x3 s2 after), then LayerNorm (eps 1e-5);
  * `depths[i]` transformer blocks (`block{j}`), pre-norm (LayerNorm eps 1e-6):
      x = x + DropPath(Attn(LN(x))),  x = x + DropPath(MixFFN(LN(x)));
    efficient self-attention with spatial reduction ratio R (8, 4, 2, 1):
      Q = x W_q,  x_r = LN(Conv_{R x R, stride R}(x)) (eps 1e-5; x_r = x when R = 1),
      [K, V] = x_r W_kv,  Attn = softmax(Q K^T / sqrt(d_head)) V W_proj,
    heads 1, 2, 5, 8; Mix-FFN: Linear(C, 4C) -> depthwise Conv3x3 (bias) -> GELU (exact, erf) ->
    Linear(4C, C);
  * a closing LayerNorm (eps 1e-6), giving the stage's map F_i (B, H/s_i, W/s_i, C_i).
All-MLP decoder (`decode_head`): Linear(C_i, D) per stage, bilinear to H/4 (align_corners False),
concat [F_4, F_3, F_2, F_1] (4D) -> Conv1x1 (no bias) -> BN -> ReLU -> channel dropout
(`Dropout2d`) -> Conv1x1 with bias to the classes, at H/4; the logits are resized bilinearly to the
input size (x4), as mmseg's `EncoderDecoder` does.

Widths, depths and D per size are `SIZES` (B0: 3,711,265 parameters at 1 channel and 1 class,
as the official code). The official head also holds BaseDecodeHead's `conv_seg`, which its
forward never uses; it is left out (no effect on the function). Stochastic depth rises linearly from 0 (first block)
to `drop_path` (last block) over all blocks, the decoder dropout is `dropout` (both 0.1 in the
official configs); both are active only for `train=True` with a rate > 0 and draw from the
'dropout' rng (`self.make_rng('dropout')`, via `flax.linen.Dropout`, which draws nothing at rate 0).

Initialisation as the official code (no pretrained weights: the paper trains from scratch):
encoder Linear weights timm `trunc_normal_(std=0.02)` (a normal truncated to +-2 absolute, i.e.
100 std), biases 0; LayerNorm 1, 0; encoder convs N(0, 2 / fan_out) with fan_out = k * k * Cout /
groups, biases 0. Decoder: the per-stage Linears and the classifier keep PyTorch's default init
(nothing re-initialises them), the fuse conv is mmcv `kaiming_init` (normal, fan_out, relu: the same
N(0, 2 / fan_out)), BatchNorm 1, 0.

Under a 16-bit compute dtype LayerNorm statistics and the attention logits and softmax are float32
(`at_least_float32`); the logits are returned in float32.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecm_jax.models.layers import (
  Conv2D,
  Dense,
  LayerSettings,
  at_least_float32,
  check_input,
  layer_norm,
  matmul_precision_scope,
)
from ecm_jax.models.ops import resize_bilinear


@dataclasses.dataclass(frozen=True)
class MiTSize:
  """One SegFormer size: the stage widths C_i, blocks per stage and the decoder width D."""
  widths: tuple[int, int, int, int]
  depths: tuple[int, int, int, int]
  decoder_width: int


# mit_b0..mit_b5 and the decoder embed_dim of the official configs (256 for B0/B1, 768 above).
SIZES = {
    'b0': MiTSize((32, 64, 160, 256), (2, 2, 2, 2), 256),
    'b1': MiTSize((64, 128, 320, 512), (2, 2, 2, 2), 256),
    'b2': MiTSize((64, 128, 320, 512), (3, 4, 6, 3), 768),
    'b3': MiTSize((64, 128, 320, 512), (3, 4, 18, 3), 768),
    'b4': MiTSize((64, 128, 320, 512), (3, 8, 27, 3), 768),
    'b5': MiTSize((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
HEADS = (1, 2, 5, 8)
REDUCTIONS = (8, 4, 2, 1)  # spatial-reduction ratio R of each stage's attention
PATCHES = ((7, 4), (3, 2), (3, 2), (3, 2))  # (kernel, stride) of each stage's patch embedding
MLP_RATIO = 4
# The official MiT passes norm_layer=partial(nn.LayerNorm, eps=1e-6) to the blocks and the stage
# ends, while the patch embeddings and the spatial reduction build nn.LayerNorm with its default.
BLOCK_EPSILON, EMBED_EPSILON = 1e-6, 1e-5
TRUNC_STD = 0.02


def mit_size(size: str) -> MiTSize:
  """The `SIZES` row of `size`; ValueError naming `model.segformer_size` and the choices."""
  if size not in SIZES:
    raise ValueError(f'model.segformer_size must be one of {tuple(SIZES)}, got {size!r}')
  return SIZES[size]


def drop_path_rates(depths: tuple[int, ...], drop_path: float) -> list[float]:
  """Per-block stochastic-depth rates: linear from 0 to `drop_path` over all blocks, in order."""
  total = sum(depths)
  return [drop_path * i / (total - 1) for i in range(total)]


def trunc_normal_init(std: float = TRUNC_STD) -> nn.initializers.Initializer:
  """timm's `trunc_normal_(w, std=std)`: N(0, std^2) truncated to [-2, 2] (absolute bounds)."""

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)

  return init


def fan_out_normal_init(groups: int = 1) -> nn.initializers.Initializer:
  """N(0, 2 / fan_out) for an HWIO kernel (kh, kw, Cin/groups, Cout), fan_out = kh * kw * Cout //
  groups: MiT's conv init and mmcv's kaiming_init(mode='fan_out', nonlinearity='relu')."""

  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, cout = shape
    return math.sqrt(2.0 / (kh * kw * cout // groups)) * jax.random.normal(key, shape, dtype)

  return init


def _encoder_dense(features: int, settings: LayerSettings, name: str) -> Dense:
  return Dense(features, kernel_init=trunc_normal_init(), bias_init=nn.initializers.zeros,
               settings=settings, name=name)


class OverlapPatchEmbed(nn.Module):
  """Conv k x k, stride s, padding k // 2, with bias (`proj`) -> LayerNorm eps 1e-5 (`norm`):
  (B, H, W, Cin) -> (B, H/s, W/s, features)."""
  features: int
  kernel: int
  stride: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = Conv2D(self.features, (self.kernel, self.kernel), use_bias=True, stride=self.stride,
               padding=self.kernel // 2, kernel_init=fan_out_normal_init(),
               bias_init=nn.initializers.zeros, settings=self.settings, name='proj')(x)
    return layer_norm(self.settings, EMBED_EPSILON, 'norm')(y)


class EfficientSelfAttention(nn.Module):
  """Multi-head self-attention with keys and values from the map reduced R x R (`q`, `sr`, `norm`,
  `kv`, `proj`): softmax(Q K^T / sqrt(d_head)) V W_proj, on a map (B, H, W, C).

  Q = x W_q (B, HW, heads, d_head); K, V = the two halves of LN(Conv_{R x R, stride R}(x)) W_kv
  (B, HW / R^2, heads, d_head), K first (no `sr`, `norm` when R = 1). Logits and softmax in
  at least float32.
  """
  heads: int
  reduction: int
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.settings
    b, h, w, c = x.shape
    head_dim = c // self.heads
    q = _encoder_dense(c, s, 'q')(x).reshape(b, h * w, self.heads, head_dim)
    if self.reduction > 1:
      x = Conv2D(c, (self.reduction, self.reduction), use_bias=True, stride=self.reduction,
                 padding=0, kernel_init=fan_out_normal_init(), bias_init=nn.initializers.zeros,
                 settings=s, name='sr')(x)
      x = layer_norm(s, EMBED_EPSILON, 'norm')(x)
    kv = _encoder_dense(2 * c, s, 'kv')(x).reshape(b, -1, 2, self.heads, head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]
    wide = at_least_float32(s.dtype)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(wide), k.astype(wide)) * head_dim**-0.5
    attention = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', attention.astype(s.dtype), v.astype(s.dtype))
    return _encoder_dense(c, s, 'proj')(out.reshape(b, h, w, c))


class MixFFN(nn.Module):
  """Linear(C, 4C) (`fc1`) -> depthwise Conv3x3 with bias (`dwconv`) -> GELU (erf) ->
  Linear(4C, C) (`fc2`), on a map (B, H, W, C)."""
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s, c = self.settings, x.shape[-1]
    hidden = MLP_RATIO * c
    y = _encoder_dense(hidden, s, 'fc1')(x)
    y = Conv2D(hidden, (3, 3), use_bias=True, groups=hidden,
               kernel_init=fan_out_normal_init(groups=hidden), bias_init=nn.initializers.zeros,
               settings=s, name='dwconv')(y)
    return _encoder_dense(c, s, 'fc2')(nn.gelu(y, approximate=False))


class MixBlock(nn.Module):
  """x + DropPath(Attn(LN(x))) then x + DropPath(MixFFN(LN(x))) (`norm1`, `attn`, `norm2`, `mlp`;
  LayerNorm eps 1e-6). DropPath zeroes a sample's whole branch with probability `drop_path` and
  scales the kept ones by 1 / (1 - drop_path) (timm's `DropPath`), in train mode only."""
  heads: int
  reduction: int
  drop_path: float = 0.0
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s = self.settings
    # One mask value per sample (broadcast over H, W, C), drawn anew for each branch.
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train,
                      name='drop_path')
    x = x + drop(EfficientSelfAttention(self.heads, self.reduction, s, name='attn')(
        layer_norm(s, BLOCK_EPSILON, 'norm1')(x)))
    return x + drop(MixFFN(s, name='mlp')(layer_norm(s, BLOCK_EPSILON, 'norm2')(x)))


class MiTStage(nn.Module):
  """One MiT stage: `patch_embed`, blocks `block0`.. (drop-path rates `drop_paths`), LayerNorm
  eps 1e-6 (`norm`): (B, H, W, Cin) -> (B, H/stride, W/stride, features)."""
  features: int
  heads: int
  reduction: int
  kernel: int
  stride: int
  drop_paths: tuple[float, ...]
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s = self.settings
    x = OverlapPatchEmbed(self.features, self.kernel, self.stride, s, name='patch_embed')(x)
    for j, rate in enumerate(self.drop_paths):
      x = MixBlock(self.heads, self.reduction, rate, s, name=f'block{j}')(x, train)
    return layer_norm(s, BLOCK_EPSILON, 'norm')(x)


class AllMLPDecoder(nn.Module):
  """SegFormer's head: Linear(C_i, D) per stage (`linear_c1`..`linear_c4`), bilinear to stage 1's
  size, concat [c4, c3, c2, c1] -> Conv1x1 no bias (`linear_fuse`) -> BN (`bn`) -> ReLU ->
  Dropout2d(`dropout`) -> Conv1x1 with bias (`linear_pred`): (B, H/4, W/4, num_classes)."""
  features: int
  num_classes: int
  dropout: float = 0.0
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, stages: list[jax.Array], train: bool) -> jax.Array:
    s = self.settings
    size = stages[0].shape[1:3]
    embedded = [resize_bilinear(Dense(self.features, settings=s, name=f'linear_c{i + 1}')(f), size)
                for i, f in enumerate(stages)]
    y = Conv2D(self.features, (1, 1), kernel_init=fan_out_normal_init(), settings=s,
               name='linear_fuse')(jnp.concatenate(embedded[::-1], axis=-1))
    y = nn.relu(s.batch_norm('bn')(y, train))
    # Dropout2d: a whole channel of a sample at once (one mask value per (b, c)).
    y = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train, name='dropout')(y)
    return Conv2D(self.num_classes, (1, 1), use_bias=True, settings=s, name='linear_pred')(y)


class SegFormer(nn.Module):
  """SegFormer-`size` (see the module docstring): MiT stages `stage1`..`stage4`, `decode_head`,
  logits resized bilinearly to the input size. H and W must be multiples of 32 (the stage strides
  4, 8, 16, 32, and stage i's reduction R_i divides its map: H/4 by 8, H/8 by 4, H/16 by 2)."""
  size: str = 'b0'
  drop_path: float = 0.1
  dropout: float = 0.1
  in_channels: int = 1
  num_classes: int = 1
  settings: LayerSettings = LayerSettings()

  def __post_init__(self):
    mit_size(self.size)  # an unknown size fails when the model is built, not at its first call
    rates = {'segformer_drop_path': self.drop_path, 'segformer_dropout': self.dropout}
    for field, rate in rates.items():
      if not 0 <= rate < 1:
        raise ValueError(f'model.{field} must be in [0, 1), got {rate}')
    super().__post_init__()

  def input_multiple(self) -> int:
    return 32

  def smallest_input(self) -> int:
    return 32

  @nn.compact
  @matmul_precision_scope
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    check_input(x, self, 'MiT stage strides 4..32; stage 1 reduces its H/4 map by 8')
    s, spec = self.settings, mit_size(self.size)
    rates = drop_path_rates(spec.depths, self.drop_path)
    y, stages, first = x.astype(s.dtype), [], 0
    for i, (width, depth) in enumerate(zip(spec.widths, spec.depths)):
      kernel, stride = PATCHES[i]
      y = MiTStage(width, HEADS[i], REDUCTIONS[i], kernel, stride,
                   tuple(rates[first:first + depth]), s, name=f'stage{i + 1}')(y, train)
      stages.append(y)
      first += depth
    logits = AllMLPDecoder(spec.decoder_width, self.num_classes, self.dropout, s,
                           name='decode_head')(stages, train)
    logits = resize_bilinear(logits, x.shape[1:3])
    return {'logits': logits.astype(at_least_float32(logits.dtype))}
