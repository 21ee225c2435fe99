"""Layers the networks are built from: convolutions, patch upsampling, BatchNorm, conv blocks, EC.

Every 2D convolution goes through `ecm_jax.ops` (`conv2d`, `upsample_patches`) so the kernels can be
swapped by `conv_impl` without touching the modules. Parameters, BatchNorm statistics, global
reductions and softmaxes are float32 under a 16-bit compute dtype (`at_least_float32`); parameters
are cast to the compute dtype at use, and activations, the residuals saved for the backward pass
and BatchNorm's input stay in the compute dtype (`BatchNorm`). Under float64 (jax_enable_x64)
everything is float64.

`LayerSettings.remat` chooses what the backward pass recomputes instead of keeping (`remat`);
`LayerSettings.matmul_precision` the float32 matmul/convolution precision of a whole network
(`matmul_precision_scope`, on each network's `__call__`).

Initialisation follows PyTorch's defaults (the paper's framework): kernels and biases uniform in
+-1/sqrt(fan_in), with fan_in computed as PyTorch does (for transposed convolutions from the output
channels); BatchNorm scale 1, bias 0, running mean 0, running var 1.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from ecm_jax.models import ops


def at_least_float32(dtype: Any) -> Any:
  """The dtype of parameters, BatchNorm statistics, global reductions and softmaxes for compute
  dtype `dtype`: float32 for float32 and 16-bit types, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


# model.remat: what the backward pass recomputes instead of keeping from the forward pass.
#   none    nothing: every residual is kept (fastest, most memory).
#   blocks  each conv block (Conv-BN-ReLU, EC block) of the U-Net levels, the bottleneck block and
#           the DWS side output keep only their input; their insides are recomputed in the
#           backward pass (about one more forward pass of compute).
#   levels  coarser: each encoder level (max-pool and its two blocks), each decoder stage
#           (upsampling, gate, concatenation, two blocks), the bottleneck and the side output keep
#           only their inputs (the skips); fewer saved maps, larger recomputed regions.
# Only the U-Net family (configs.default UNET names) has these units; the other networks take
# 'none' only. Parameters and results are the same whatever the choice (tests/test_remat.py).
REMATS = ('none', 'blocks', 'levels')
# model.matmul_precision: `jax.default_matmul_precision` for the network's float32 matmuls and
# convolutions. 'default' leaves JAX's (on GPUs: TF32 for float32, on TPUs: bfloat16 passes, on
# the CPU: float32), 'high' (TF32 / 3 bf16 passes), 'highest' (true float32: parity with PyTorch).
MATMUL_PRECISIONS = ('default', 'high', 'highest')


@dataclasses.dataclass(frozen=True)
class LayerSettings:
  """What every layer of a model shares, from `config.model`.

  dtype: compute dtype (params are `param_dtype`). conv_impl: `ops` kernel choice.
  bn_momentum: flax convention, running = m * running + (1 - m) * batch (0.9 = PyTorch 0.1).
  bn_axis_name: mapped axis for cross-replica BatchNorm statistics under `shard_map` (None: the
    statistics of the array as seen, which under `jit` with a sharded batch is the global batch).
  remat: one of `REMATS` (see there). matmul_precision: one of `MATMUL_PRECISIONS`.
  """
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None
  remat: str = 'none'
  matmul_precision: str = 'default'

  def __post_init__(self):
    if self.remat not in REMATS:
      raise ValueError(f'model.remat must be one of {REMATS}, got {self.remat!r}')
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f'model.matmul_precision must be one of {MATMUL_PRECISIONS}, '
                       f'got {self.matmul_precision!r}')

  @property
  def param_dtype(self) -> Any:
    """Parameters and reductions: float32, or float64 when computing in float64."""
    return at_least_float32(self.dtype)

  def batch_norm(self, name: str, dtype: Any = None) -> 'BatchNorm':
    """A `BatchNorm` with these constants (output dtype `dtype`, default the compute dtype)."""
    return BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                     axis_name=self.bn_axis_name, dtype=dtype or self.dtype, name=name)


def remat(module_class: type, settings: LayerSettings, units: tuple[str, ...],
          static_argnums: tuple[int, ...]):
  """`module_class`, or `nn.remat` of it when `settings.remat` is one of `units` ('blocks',
  'levels').

  The variables keep their names (a lifted transform adds no scope). `static_argnums` index the
  call's arguments with `self` as 0 (the `train` flag must be static).
  """
  if settings.remat not in units:
    return module_class
  return nn.remat(module_class, static_argnums=static_argnums)


def matmul_precision_scope(call):
  """Decorates a network's `__call__` (under `@nn.compact`) so that everything it traces runs
  under `jax.default_matmul_precision(self.settings.matmul_precision)` ('default': JAX's own)."""

  @functools.wraps(call)
  def wrapper(self, *args, **kwargs):
    precision = self.settings.matmul_precision
    if precision == 'default':
      return call(self, *args, **kwargs)
    with jax.default_matmul_precision(precision):
      return call(self, *args, **kwargs)

  return wrapper


def check_input(x: jax.Array, model: nn.Module, why: str) -> None:
  """Raises ValueError unless x is (B, H, W, model.in_channels) with H, W multiples of
  `model.input_multiple()` and at least `model.smallest_input()`; `why` names the reason for the
  multiple (e.g. '4 2x2 max-pools')."""
  if x.ndim != 4:
    raise ValueError(f'input x must have rank 4 (B, H, W, C), got shape {tuple(x.shape)}')
  if x.shape[-1] != model.in_channels:
    raise ValueError(f'input x has {x.shape[-1]} channels (last axis) but model.in_channels is '
                     f'{model.in_channels}; shape {tuple(x.shape)}')
  factor, smallest = model.input_multiple(), model.smallest_input()
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f'input H and W must be divisible by {factor} ({why}), '
                     f'got H={x.shape[1]}, W={x.shape[2]}')
  if min(x.shape[1:3]) < smallest:
    raise ValueError(f'input H and W must be at least {smallest} for {type(model).__name__}, '
                     f'got H={x.shape[1]}, W={x.shape[2]}')


def torch_kernel_init(in_axis: int = -2, out_axis: int = -1) -> nn.initializers.Initializer:
  """PyTorch's default weight init, kaiming_uniform(a=sqrt(5)): uniform in +-1/sqrt(fan_in)."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform', in_axis=in_axis,
                                          out_axis=out_axis)


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias init: uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv2D(nn.Module):
  """2D convolution, PyTorch `Conv2d(kernel_size, stride, padding, dilation, groups, bias)`:
  params `kernel` (kh, kw, Cin/groups, Cout), `bias` (Cout,).

  padding None: 'SAME' (odd kernels, stride 1), which goes through `ops.conv2d` and its
  `conv_impl` choice; any other form (a stride, explicit padding, groups) is `ops.conv_general`.
  kernel_init / bias_init: None is PyTorch's default (uniform in +-1/sqrt(fan_in)); the baselines
  whose official code initialises otherwise pass their own.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dilation: int = 1
  use_bias: bool = False
  stride: int = 1
  padding: int | None = None
  groups: int = 1
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer | None = None
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(f'{self.name}: {cin} input and {self.features} output channels must both be '
                       f'divisible by groups={self.groups}')
    fan_in = kh * kw * cin // self.groups
    kernel = self.param('kernel', self.kernel_init or torch_kernel_init(),
                        (kh, kw, cin // self.groups, self.features), self.settings.param_dtype)
    dtype = self.settings.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if self.padding is None and self.stride == 1 and self.groups == 1:
      y = ops.conv2d(x, kernel, dilation=self.dilation, impl=self.settings.conv_impl)
    else:
      padding = ((self.dilation * (kh - 1) // 2, self.dilation * (kw - 1) // 2)
                 if self.padding is None else (self.padding, self.padding))
      y = ops.conv_general(x, kernel, stride=self.stride, padding=padding, dilation=self.dilation,
                           groups=self.groups)
    if self.use_bias:
      bias = self.param('bias', self.bias_init or torch_bias_init(fan_in), (self.features,),
                        self.settings.param_dtype)
      y = y + bias.astype(dtype)
    return y


class ConvTranspose2D(nn.Module):
  """PyTorch `ConvTranspose2d(kernel_size, stride, padding, output_padding, bias)`: params `kernel`
  (k, k, Cin, Cout) (the torch weight (Cin, Cout, k, k) permuted), `bias`.

  Output size (H - 1) * stride - 2 * padding + k + output_padding. For kernel == stride without
  padding use `PatchUpsample` (one matmul).
  """
  features: int
  kernel_size: int
  stride: int
  padding: int = 0
  output_padding: int = 0
  use_bias: bool = True
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    # PyTorch stores a transposed-conv weight as (Cin, Cout, k, k) and takes fan_in from dim 1.
    kernel = self.param('kernel', torch_kernel_init(in_axis=-1, out_axis=-2),
                        (k, k, x.shape[-1], self.features), self.settings.param_dtype)
    dtype = self.settings.dtype
    y = ops.conv_transpose(x.astype(dtype), kernel.astype(dtype), stride=self.stride,
                           padding=self.padding, output_padding=self.output_padding)
    if self.use_bias:
      bias = self.param('bias', torch_bias_init(self.features * k * k), (self.features,),
                        self.settings.param_dtype)
      y = y + bias.astype(dtype)
    return y


class Dense(nn.Module):
  """PyTorch `Linear` on the last axis: params `kernel` (Cin, Cout) (the torch weight transposed),
  `bias`. Initialisers as `Conv2D` (None: PyTorch's default)."""
  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer | None = None
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init or torch_kernel_init(in_axis=0, out_axis=1),
                        (cin, self.features), self.settings.param_dtype)
    dtype = self.settings.dtype
    y = x.astype(dtype) @ kernel.astype(dtype)
    if self.use_bias:
      bias = self.param('bias', self.bias_init or torch_bias_init(cin), (self.features,),
                        self.settings.param_dtype)
      y = y + bias.astype(dtype)
    return y


def layer_norm(settings: LayerSettings, epsilon: float, name: str) -> nn.LayerNorm:
  """PyTorch `LayerNorm` over the last axis (params `scale`, `bias`; statistics in float32 or
  wider, two-pass variance as torch computes it), output in the compute dtype."""
  return nn.LayerNorm(epsilon=epsilon, dtype=settings.dtype, param_dtype=settings.param_dtype,
                      use_fast_variance=False, name=name)


class PatchUpsample(nn.Module):
  """Transposed conv with kernel == stride (`ConvTranspose2d(k=s, stride=s)`): `ops.upsample_patches`.

  Each input pixel becomes an s x s patch: (B,H,W,Cin) -> (B,sH,sW,features). Kernel (s,s,Cin,Cout).
  """
  features: int
  scale: int = 2
  use_bias: bool = True
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.scale
    # PyTorch stores a transposed-conv weight as (Cin, Cout, s, s) and takes fan_in from dim 1.
    kernel = self.param('kernel', torch_kernel_init(in_axis=-1, out_axis=-2),
                        (s, s, x.shape[-1], self.features), self.settings.param_dtype)
    dtype = self.settings.dtype
    y = ops.upsample_patches(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param('bias', torch_bias_init(self.features * s * s), (self.features,),
                        self.settings.param_dtype)
      y = y + bias.astype(dtype)
    return y


class Conv1D(nn.Module):
  """1D convolution of a sequence (B, L, Cin), PyTorch `Conv1d(k, stride, padding=(k-1)//2)`.

  Only the channel-correlation attention uses it (on a length-C sequence: tiny), so it calls
  `lax.conv_general_dilated` directly. Kernel (k, Cin, Cout). Params and compute in `dtype`
  (float32, or float64 in a float64 model).
  """
  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', torch_kernel_init(), (k, x.shape[-1], self.features), self.dtype)
    pad = (k - 1) // 2
    y = lax.conv_general_dilated(x.astype(self.dtype), kernel, window_strides=(self.stride,),
                                 padding=[(pad, pad)], dimension_numbers=('NWC', 'WIO', 'NWC'),
                                 precision=lax.Precision.HIGHEST)
    if self.use_bias:
      y = y + self.param('bias', torch_bias_init(k * x.shape[-1]), (self.features,), self.dtype)
    return y


class PatchUpsample1D(nn.Module):
  """1D transposed conv with kernel == stride (`ConvTranspose1d(k=s, stride=s, bias=False)`).

  (B, L, Cin) -> (B, sL, features): out[b, s*l + i] = x[b, l] @ kernel[i]. Kernel (s, Cin, Cout).
  Params and compute in `dtype` (float32, or float64 in a float64 model).
  """
  features: int
  scale: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.scale
    kernel = self.param('kernel', torch_kernel_init(in_axis=-1, out_axis=-2),
                        (s, x.shape[-1], self.features), self.dtype)
    b, length, _ = x.shape
    y = jnp.einsum('blc,sco->blso', x.astype(self.dtype), kernel, precision=lax.Precision.HIGHEST)
    return y.reshape(b, length * s, self.features)


class BatchNorm(nn.Module):
  """Batch normalisation over every axis but the last, with PyTorch's exact semantics.

  Train mode normalises with the batch mean and the biased batch variance mean((x - mean)^2); the
  running statistics are updated as running = momentum * running + (1 - momentum) * batch, with the
  *unbiased* variance (n / (n - 1)) for `var`, as `torch.nn.BatchNorm*d` does (flax momentum 0.9 =
  PyTorch 0.1). Eval mode uses the running statistics. Statistics and the normalisation are
  computed in `at_least_float32(dtype)` (float32, float64 for a float64 `dtype`); the output is
  cast to `dtype`. With `axis_name` the statistics are averaged over that mapped axis
  (cross-replica BatchNorm under `shard_map`).

  A 16-bit input in train mode (without `axis_name`) takes `batch_norm_train_16bit`: the same
  function, whose backward pass keeps the 16-bit input as its residual instead of a float32 copy
  (autodiff of the float32 arithmetic would keep x - mean in float32: twice the bytes).

  Variables: params `scale`, `bias`; batch_stats `mean`, `var` (all (C,), at_least_float32(dtype)).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    wide = at_least_float32(self.dtype)
    scale = self.param('scale', nn.initializers.ones, (c,), wide)
    bias = self.param('bias', nn.initializers.zeros, (c,), wide)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), wide))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), wide))
    if train and self.axis_name is None and jnp.finfo(x.dtype).bits < 32:
      count = math.prod(x.shape[:-1])
      if count < 2:
        raise ValueError(f'BatchNorm in train mode needs more than 1 value per channel (as PyTorch), '
                         f'got input shape {x.shape}: use a batch of at least 2 when training')
      y, mean, var = batch_norm_train_16bit(x, scale, bias, self.epsilon, self.dtype)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * var * (count / (count - 1))
      return y
    x_wide = x.astype(wide)
    if train:
      axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[:-1])
      mean = jnp.mean(x_wide, axis=axes)
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
        count *= lax.axis_size(self.axis_name)
      if count < 2:
        raise ValueError(f'BatchNorm in train mode needs more than 1 value per channel (as PyTorch), '
                         f'got input shape {x.shape}: use a batch of at least 2 when training')
      var = jnp.mean(jnp.square(x_wide - mean), axis=axes)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * var * (count / (count - 1))
    else:
      mean, var = running_mean.value, running_var.value
    y = (x_wide - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train_16bit(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                           dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Train-mode BatchNorm of a 16-bit `x` over every axis but the last: (y in `dtype`, batch mean,
  biased batch variance), statistics and normalisation in float32 (`scale`'s dtype), as
  `BatchNorm`'s float32 path computes them. Its backward pass keeps `x` itself (16-bit), the mean,
  1/sqrt(var + eps) and the scale, and computes in float32."""
  y, mean, var, _ = _bn16_forward(x, scale, bias, epsilon, dtype)
  return y, mean, var


def _bn16_forward(x, scale, bias, epsilon, dtype):
  wide = scale.dtype
  axes = tuple(range(x.ndim - 1))
  x_wide = x.astype(wide)
  mean = jnp.mean(x_wide, axis=axes)
  var = jnp.mean(jnp.square(x_wide - mean), axis=axes)
  rstd = lax.rsqrt(var + epsilon)
  y = (x_wide - mean) * (scale * rstd) + bias
  return y.astype(dtype), mean, var, rstd


def _bn16_fwd(x, scale, bias, epsilon, dtype):
  y, mean, var, rstd = _bn16_forward(x, scale, bias, epsilon, dtype)
  return (y, mean, var), (x, mean, rstd, scale)


def _bn16_bwd(epsilon, dtype, residuals, cotangents):
  del epsilon, dtype
  x, mean, rstd, scale = residuals
  dy, dmean, dvar = cotangents
  wide = scale.dtype
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  centred = x.astype(wide) - mean
  x_hat = centred * rstd
  dy = dy.astype(wide)
  dbias = jnp.sum(dy, axis=axes)
  dscale = jnp.sum(dy * x_hat, axis=axes)
  # y = x_hat * scale + bias with x_hat = (x - mean) / sqrt(var + eps), mean and var of the batch.
  dx = (scale * rstd) * (dy - (dbias + x_hat * dscale) / n)
  # The mean and variance outputs (read by the running statistics only: zero cotangents in a loss)
  dx = dx + dmean / n + dvar * (2.0 / n) * centred
  return dx.astype(x.dtype), dscale, dbias


batch_norm_train_16bit.defvjp(_bn16_fwd, _bn16_bwd)


class ConvBNReLU(nn.Module):
  """The plain conv block of U-Net: Conv (no bias, BN follows) -> BatchNorm -> ReLU (Section III)."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dilation: int = 1
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = Conv2D(self.features, self.kernel_size, self.dilation, settings=self.settings, name='conv')(x)
    return nn.relu(self.settings.batch_norm('bn')(y, train))


# EC branches (ACNet, Ding et al. 2019): name suffix -> kernel size.
EC_BRANCHES = {'3x3': (3, 3), '1x3': (1, 3), '3x1': (3, 1)}


class EnhancedConv(nn.Module):
  """EC, Enhanced Convolution (Sec. III, Fig. 1a): ReLU(BN(Conv3x3 x) + BN(Conv1x3 x) + BN(Conv3x1 x))

  Each branch has its own BatchNorm (variables `conv3x3`, `bn3x3`, `conv1x3`, ...). With `folded`
  (the deploy form made by `ecm_jax.fold.fold_ec`) the block is one 3x3 conv with bias,
  `conv_folded`, followed by ReLU: the same function in eval mode.
  """
  features: int
  folded: bool = False
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.folded:
      y = Conv2D(self.features, (3, 3), use_bias=True, settings=self.settings, name='conv_folded')(x)
    else:
      y = 0
      for branch, size in EC_BRANCHES.items():
        conv = Conv2D(self.features, size, settings=self.settings, name=f'conv{branch}')(x)
        y = y + self.settings.batch_norm(f'bn{branch}')(conv, train)
    return nn.relu(y)


class DoubleConv(nn.Module):
  """One U-Net level: two conv blocks (`block0`, `block1`), EC blocks when `ec` (encoder only),
  after a 2x2 max-pool when `pool` (the encoder's levels below the first). Each block is
  rematerialised under remat 'blocks'."""
  features: int
  ec: bool = False
  ec_folded: bool = False
  settings: LayerSettings = LayerSettings()
  pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.pool:
      x = ops.max_pool_2x2(x)
    for i in range(2):
      if self.ec:
        block = remat(EnhancedConv, self.settings, ('blocks',), (2,))(
            self.features, self.ec_folded, settings=self.settings, name=f'block{i}')
      else:
        block = remat(ConvBNReLU, self.settings, ('blocks',), (2,))(
            self.features, settings=self.settings, name=f'block{i}')
      x = block(x, train)
    return x
