"""Array-level kernels the layers are built from: convolution, patch upsampling, 2x2 max-pool.

Each takes NHWC inputs and HWIO kernels. Every implementation computes the same function
(gradient-equivalence tests in tests/test_ops.py); they differ only in speed, memory and compile
time (per-op numbers: benchmarks/ops.py).

Convolution implementations (`impl` of `conv2d`, `config.model.conv_impl`):
  'xla'   plain `lax.conv_general_dilated`, differentiated by JAX. The right choice on GPU/TPU,
          where the library convolutions are fast in all three passes.
  'gemm'  `ecm_jax.cpu.conv`: the weight gradient as matmuls, for XLA:CPU. That module is imported
          only when 'gemm' is chosen, so a GPU/TPU process never loads or traces it.
  'auto'  'gemm' on the CPU, 'xla' on any other platform: resolved once, from the platform the
          model is built for (`build_model`, default `jax.default_backend()`).
"""

import jax
from jax import lax
import jax.numpy as jnp

IMPLS = ('auto', 'xla', 'gemm')

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """The implementation ('xla' or 'gemm') that `impl` runs on `platform`.

  `platform` is a JAX platform name ('cpu', 'cuda', 'rocm', 'tpu'); default `jax.default_backend()`.
  Raises ValueError naming the choices for an unknown `impl`.
  """
  if impl not in IMPLS:
    raise ValueError(f'conv_impl must be one of {IMPLS}, got {impl!r}')
  if impl != 'auto':
    return impl
  return 'gemm' if (platform or jax.default_backend()) == 'cpu' else 'xla'


def conv2d(x: jax.Array, kernel: jax.Array, *, dilation: int = 1, impl: str = 'auto') -> jax.Array:
  """Stride-1 'SAME' convolution of `x` (B,H,W,Cin) with `kernel` (kh,kw,Cin,Cout), odd kh, kw.

  out[b, h, w] = sum_{i,j} x[b, h + d*(i - (kh-1)/2), w + d*(j - (kw-1)/2)] @ kernel[i, j] with
  d = `dilation` and zeros outside the map (cross-correlation, like `lax.conv` and PyTorch).
  """
  impl = resolve_impl(impl)
  kh, kw = kernel.shape[:2]
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f'conv2d needs odd kernel sizes, got {kh}x{kw}')
  if x.dtype != kernel.dtype:
    raise TypeError(f'conv2d needs x and kernel of one dtype, got {x.dtype} and {kernel.dtype}')
  if impl == 'gemm':
    from ecm_jax.cpu import conv as cpu_conv  # pylint: disable=g-import-not-at-top  (CPU only)
    return cpu_conv.conv_gemm(x, kernel, dilation)
  return conv_xla(x, kernel, dilation)


def conv_xla(x, kernel, dilation):
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME', rhs_dilation=(dilation, dilation),
      dimension_numbers=_DIMS)


def conv_general(x: jax.Array, kernel: jax.Array, *, stride: int = 1,
                 padding: tuple[int, int] = (0, 0), dilation: int = 1,
                 groups: int = 1) -> jax.Array:
  """PyTorch `conv2d(x, w, stride, padding=(ph, pw), dilation, groups)` in NHWC / HWIO, kernel
  (kh, kw, Cin/groups, Cout): strided, padded and grouped (depthwise) convolutions."""
  ph, pw = padding
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((ph, ph), (pw, pw)),
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMS, feature_group_count=groups)


def conv_transpose(x: jax.Array, kernel: jax.Array, *, stride: int, padding: int = 0,
                   output_padding: int = 0) -> jax.Array:
  """PyTorch `conv_transpose2d(x, w, stride, padding, output_padding)` with kernel = w permuted to
  (k, k, Cin, Cout): the input dilated by the stride, convolved with the spatially flipped kernel
  on padding (k-1-padding, k-1-padding+output_padding)."""
  k = kernel.shape[0]
  lo = k - 1 - padding
  return lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1),
      padding=((lo, lo + output_padding), (lo, lo + output_padding)),
      lhs_dilation=(stride, stride), dimension_numbers=_DIMS)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, *size, C) bilinearly: PyTorch `interpolate(mode='bilinear',
  align_corners=False)` (no antialiasing, also when shrinking)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), 'bilinear', antialias=False)


def upsample_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Transposed convolution with kernel size == stride (no overlap), as one matmul + depth-to-space.

  `kernel` is (s, s2, Cin, Cout): out[b, s*h + i, s2*w + j] = x[b, h, w] @ kernel[i, j].
  PyTorch `ConvTranspose2d(Cin, Cout, kernel_size=s, stride=s)` with weight W (Cin, Cout, s, s)
  is this with kernel = W.permute(2, 3, 0, 1); `lax.conv_transpose(x, kernel[::-1, ::-1], (s, s2),
  'VALID')` (NHWC/HWIO) is too, with the taps flipped. XLA:CPU runs that transposed convolution
  and its gradients far slower (seconds) than this (B*H*W, Cin) @ (Cin, s*s2*Cout) matmul, whose
  gradients are two matmuls after one transpose of the output gradient; it also beats the
  equivalent single einsum, whose gradients transpose more (benchmarks/ops.py).
  """
  b, h, w, cin = x.shape
  s, s2, _, cout = kernel.shape
  y = x.reshape(b * h * w, cin) @ kernel.transpose(2, 0, 1, 3).reshape(cin, s * s2 * cout)
  return y.reshape(b, h, w, s, s2, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s2, cout)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max-pool (B,H,W,C) -> (B,H//2,W//2,C); an odd last row/column is dropped.

  Equals `flax.linen.max_pool(x, (2, 2), (2, 2))` (padding 'VALID') and PyTorch's
  `max_pool2d(x, 2)` in value and gradient, including ties: each window's output gradient goes
  entirely to its first maximal element in row-major window order, (0,0), (0,1), (1,0), (1,1)
  (a NaN counts as maximal, as the output is then NaN). A reshape-max is much faster than
  `reduce_window` on XLA:CPU; its own autodiff gradient would split ties evenly, so the gradient
  is written out here (also 2-3x faster than that autodiff).
  """
  return _windows(x).max(axis=(2, 4))


def _windows(x):
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_bwd(x, g):
  win = _windows(x)
  hit = (win == win.max(axis=(2, 4), keepdims=True)) | jnp.isnan(win)
  h00, h01, h10, h11 = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0], hit[:, :, 1, :, 1]
  first = (h00, h01 & ~h00, h10 & ~(h00 | h01), h11 & ~(h00 | h01 | h10))
  g00, g01, g10, g11 = (jnp.where(m, g, jnp.zeros((), g.dtype)) for m in first)
  dx = jnp.stack([jnp.stack([g00, g01], axis=3), jnp.stack([g10, g11], axis=3)], axis=2)
  b, h, w, c = x.shape
  dx = dx.reshape(b, h // 2 * 2, w // 2 * 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
