"""Array-level kernels the layers are built from: convolution, patch upsampling, 2x2 max-pool.

Each takes NHWC inputs and HWIO kernels. `impl` selects the kernel: 'xla' is plain `lax.conv`;
'auto' picks by backend. Every implementation computes the same function (gradient-equivalence
tests in tests/test_ops.py).
"""

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('auto', 'xla')


def _resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f'conv_impl must be one of {IMPLS}, got {impl!r}')
  return 'xla' if impl == 'auto' else impl


def conv2d(x: jax.Array, kernel: jax.Array, *, dilation: int = 1, impl: str = 'auto') -> jax.Array:
  """Stride-1 'SAME' convolution of `x` (B,H,W,Cin) with `kernel` (kh,kw,Cin,Cout), odd kh, kw."""
  _resolve(impl)
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME', rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def upsample_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Transposed convolution with kernel size == stride (no overlap), as one matmul + depth-to-space.

  `kernel` is (s, s, Cin, Cout): out[b, s*h + i, s*w + j] = x[b, h, w] @ kernel[i, j]
  (PyTorch `ConvTranspose2d(k=s, stride=s)` with weight (Cin, Cout, s, s) permuted to (s, s, Cin, Cout)).
  """
  b, h, w, _ = x.shape
  s, s2, _, cout = kernel.shape
  y = jnp.einsum('bhwc,ijco->bhiwjo', x, kernel)
  return y.reshape(b, h * s, w * s2, cout)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max-pool as a reshape-max (much faster than reduce_window on XLA:CPU)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
