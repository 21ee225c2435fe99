"""The 'gemm' convolution: a `jax.custom_vjp` `conv2d` for XLA:CPU (CPU only).

XLA:CPU runs a convolution's forward and input gradient near matmul speed but its weight gradient
several times slower, and convolutions on small maps (16x16 and less) slowly in every pass. Here:
  - the weight gradient is matmuls over shifted rows of the flattened, padded maps
    (`_dw_shifted`), on large maps in cache-sized chunks of rows; on small maps, one matmul per
    tap over exactly the pixels that meet (`_dw_cropped`);
  - forward and input gradient stay `lax.conv`, except on small maps and for large dilations
    (ASPP), where they are sums of per-tap matmuls over the overlapping regions (`_tap_sum`),
    spending nothing on zero padding;
  - taps that only ever reach zero padding (dilation 12/18 on an 8x8 map) are dropped; a single
    remaining tap, or a 1x1 kernel, is one matmul.
Costs: more temporary memory (a transposed, padded copy of x or g: 50 MB instead of 32 MB for the
forward and gradients of a 4x128x128x64 -> 64 conv), and more XLA kernels to compile (about +0.3
to +0.9 s of compile CPU time per conv layer). Same function as `lax.conv` in value and gradient
(tests/test_ops.py); measurements in docs/performance.md.

`ecm_jax.models.ops.conv2d` imports this module only when a model is built for the CPU.
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from ecm_jax.models.ops import conv_xla

# Padded-to-real area ratio of a feature map from which the 'gemm' path computes the forward and
# input gradient as per-tap matmuls over the overlapping regions instead of `lax.conv`, and the
# weight gradient with per-tap crops instead of shifts of the zero-padded map. A 3x3 conv has
# ratio 1.13 on 32x32, 1.27 on 16x16, 1.56 on 8x8; dilation 6/12/18 on the ASPP maps 1.9 and more.
# Interleaved timings with freed memory retained (`host_memory`), batch 4, lax.conv / per-tap
# forward: 1024 -> 1024 channels at 16x16: 59 / 43 ms; 1024 -> 512: 31 / 22 ms; 512 -> 512 at 32x32:
# 55 / 49 ms, yet the whole U-Net step is 1-3 % slower with the per-tap forward on 32x32 too;
# shifted / cropped weight gradient at 16x16: 60 / 51 ms and 43 / 32 ms, at 32x32 56 / 56 ms and
# 116 / 125 ms (1024 -> 512).
_CROP_RATIO = 1.2
# For maps with fewer rows than `_DW_CHUNK_MIN_ROWS`, the shifted-row weight gradient stacks the
# taps of a group into one matmul with at least this many rows: XLA:CPU runs a (64, n) @ (n, 64)
# matmul with n in the 100,000s far below peak (nearly single-threaded), a taller one faster; the
# groups are at most a third of the taps (measured before chunking, on 128x128 and 256x256 maps).
# Chunked (larger maps), the taps are stacked by three, or all of them if they make at most this
# many rows.
_DW_MIN_WIDTH = 192
# From this many rows (batch x padded height x padded width; a batch of 4 64x64 maps has 17,424)
# the shifted-row weight gradient is reduced in chunks of rows whose stacked slices (and fixed
# rows) take about `_DW_CHUNK_BYTES`, all taps per chunk, instead of one matmul per group over all
# rows: the chunks stay in cache. Interleaved timings with freed memory retained (`host_memory`),
# batch 4, whole vs chunked: 3x3, 64 -> 64 at 256x256: 117 / 77 ms; 128 -> 128 at 128x128: 84 /
# 56 ms; 256 -> 256 at 64x64: 58 / 49 ms; 1x3, 64 -> 64 at 256x256: 66 / 43 ms; but 512 -> 512
# at 32x32 (4,624 rows): 51-54 / 55-59 ms.
_DW_CHUNK_MIN_ROWS = 2 ** 14
_DW_CHUNK_BYTES = 2 ** 21

_TN = (((0,), (0,)), ((), ()))  # dot_general: contract the leading (pixel) axis of both operands


def conv_gemm(x, kernel, dilation):
  """Stride-1 'SAME' convolution (as `ecm_jax.models.ops.conv2d`) on the CPU's matmuls."""
  taps = _taps(kernel.shape, x.shape[1:3], dilation)
  if len(taps) == 1:
    # A 1x1 kernel, or only the centre tap reaches the map: one matmul, on 2-D operands so that
    # its weight gradient is a plain (pixels, Cin)^T @ (pixels, Cout) matmul without transposes.
    i, j = taps[0][:2]
    b, h, w, c = x.shape
    y = jnp.matmul(x.reshape(-1, c), kernel[i, j], preferred_element_type=_acc_type(x.dtype))
    return y.reshape(b, h, w, -1).astype(x.dtype)
  return _gemm_conv(x, kernel, dilation)


def _taps(kernel_shape, map_shape, dilation):
  """(i, j, oy, ox) for the taps whose offset (oy, ox) reaches inside the map.

  Tap (i, j) reads x at offset oy = d*(i - (kh-1)/2), ox = d*(j - (kw-1)/2); a tap with
  |oy| >= H or |ox| >= W only ever reads zero padding and contributes nothing.
  """
  (kh, kw), (h, w) = kernel_shape[:2], map_shape
  ci, cj = (kh - 1) // 2, (kw - 1) // 2
  taps = []
  for i in range(kh):
    for j in range(kw):
      oy, ox = dilation * (i - ci), dilation * (j - cj)
      if abs(oy) < h and abs(ox) < w:
        taps.append((i, j, oy, ox))
  return taps


def _pads(taps):
  return max(abs(t[2]) for t in taps), max(abs(t[3]) for t in taps)


def _pad_ratio(taps, h, w):
  ph, pw = _pads(taps)
  return (h + 2 * ph) * (w + 2 * pw) / (h * w)


def _acc_type(dtype):
  """Accumulation dtype of the 'gemm' matmuls: float32 for 16-bit inputs, else the input dtype."""
  return jnp.promote_types(dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gemm_conv(x, kernel, dilation):
  """`conv2d` with the weight gradient as matmuls; forward/input gradient by map size (module doc)."""
  taps = _taps(kernel.shape, x.shape[1:3], dilation)
  if _pad_ratio(taps, *x.shape[1:3]) < _CROP_RATIO:
    return conv_xla(x, kernel, dilation)
  return _tap_sum(x, [(kernel[i, j], oy, ox) for i, j, oy, ox in taps])


def _gemm_conv_fwd(x, kernel, dilation):
  return _gemm_conv(x, kernel, dilation), (x, kernel)


def _gemm_conv_bwd(dilation, res, g):
  x, kernel = res
  h, w = x.shape[1:3]
  taps = _taps(kernel.shape, (h, w), dilation)
  ratio = _pad_ratio(taps, h, w)
  if ratio < _CROP_RATIO:
    # The transpose of a stride-1 SAME conv: the same conv of g with the kernel flipped and
    # its in/out channels swapped.
    dx = conv_xla(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), dilation)
  else:
    dx = _tap_sum(g, [(kernel[i, j].T, -oy, -ox) for i, j, oy, ox in taps])
  dw_fn = _dw_shifted if ratio < _CROP_RATIO else _dw_cropped
  per_tap = dict(zip([t[:2] for t in taps], dw_fn(x, g, taps)))
  zero = jnp.zeros(kernel.shape[2:], per_tap[taps[0][:2]].dtype)  # for taps that only see padding
  kh, kw = kernel.shape[:2]
  dw = jnp.stack([per_tap.get((i, j), zero) for i in range(kh) for j in range(kw)])
  return dx, dw.reshape(kernel.shape).astype(kernel.dtype)


_gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


def _crop(a, oy, ox):
  """The part of map `a` (B,H,W,C) a tap with offset (oy, ox) reads: a[:, oy:H+oy, ox:W+ox] clipped."""
  h, w = a.shape[1:3]
  return a[:, max(0, oy):h + min(0, oy), max(0, ox):w + min(0, ox)]


def _tap_sum(a, terms):
  """sum over (m, oy, ox) in `terms` of a[b, h+oy, w+ox] @ m, zero outside the map.

  Each tap is one matmul over the region where the shifted map overlaps the output, placed back
  by zero padding: no work is spent on padding. Used for the forward (terms: kernel taps) and the
  input gradient (terms: transposed taps at negated offsets) on small maps.
  """
  acc = _acc_type(a.dtype)
  out = None
  for m, oy, ox in terms:
    part = jnp.matmul(_crop(a, oy, ox), m, preferred_element_type=acc)
    part = jnp.pad(part, ((0, 0), (max(0, -oy), max(0, oy)), (max(0, -ox), max(0, ox)), (0, 0)))
    out = part if out is None else out + part
  return out.astype(a.dtype)


def _dw_cropped(x, g, taps):
  """Weight gradient per tap: dW[i, j] = sum over the overlap of x[p + (oy, ox)]^T g[p].

  One matmul per tap over exactly the pixel pairs that meet (for small maps and large dilations,
  where most of a padded map is zeros).
  """
  c, o = x.shape[-1], g.shape[-1]
  acc = _acc_type(x.dtype)
  out = []
  for _, _, oy, ox in taps:
    xs = _crop(x, oy, ox).reshape(-1, c)
    gs = _crop(g, -oy, -ox).reshape(-1, o)
    out.append(lax.dot_general(xs, gs, _TN, preferred_element_type=acc))
  return out


def _dw_shifted(x, g, taps):
  """Weight gradient as matmuls over shifted rows of the flattened, zero-padded maps.

  With x zero-padded to (B, H+2ph, W+2pw) and flattened to rows, and g placed at the top-left of
  the same padded grid (zeros elsewhere), tap (oy, ox) pairs row r of g with row r + off of x,
  off = (ph+oy)*(W+2pw) + (pw+ox); rows of g outside the real map are zero, so pairs that wrap
  across padded rows or images contribute nothing. So dW[tap] = x_rows[off:off+n]^T @ g_rows[:n]:
  one contiguous slice per tap, no im2col of the whole map.

  The operand with fewer channels is the shifted one. It is transposed once to (channels, rows),
  so that a tap's slice is a block of whole rows and the matmul has the plain (M,K) @ (K,N) form,
  which XLA:CPU runs ~1.3x faster than one contracting the leading axis of both operands; the
  slices of a group of taps are stacked into one taller matmul. Large maps are then reduced in
  chunks of rows (`_dw_chunked`), small ones in one matmul per group (`_dw_whole`).
  """
  b, h, w, c = x.shape
  o = g.shape[-1]
  ph, pw = _pads(taps)
  wp = w + 2 * pw
  rows = b * (h + 2 * ph) * wp
  offs = [(ph + oy) * wp + (pw + ox) for _, _, oy, ox in taps]
  span = max(offs)
  x_rows = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))).reshape(rows, c)
  g_rows = jnp.pad(g, ((0, 0), (0, 2 * ph), (0, 2 * pw), (0, 0))).reshape(rows, o)
  shift_x = c <= o
  if shift_x:
    # dW[tap] = sum over r < n of x row r + off (outer) g row r.
    fixed, shifted, top, starts = g_rows[:rows - span], x_rows, 0, offs
  else:
    # The same sum, over x rows r with g shifted down by off (`span` zero rows in front).
    fixed, shifted, top, starts = x_rows, g_rows, span, [span - off for off in offs]
  reduce = _dw_chunked if fixed.shape[0] >= _DW_CHUNK_MIN_ROWS else _dw_whole
  # (taps * shifted channels, fixed channels), in tap order.
  dw = reduce(shifted, top, starts, fixed, _acc_type(x.dtype))
  dw = dw.reshape(len(taps), c, o) if shift_x else dw.reshape(len(taps), o, c).swapaxes(1, 2)
  return list(dw)


def _transposed(rows, top, length):
  """(C, L): `rows` (n, C) after `top` zero rows, zero-filled to `length` rows, transposed.

  Padded before the transposition: XLA:CPU runs a transposition fused with a pad of its minor
  axis 5-10x slower than the two apart.
  """
  return jnp.pad(rows, ((top, max(0, length - top - rows.shape[0])), (0, 0))).T


def _stacked(shifted_t, starts, length):
  """The column blocks shifted_t[:, start:start + length], stacked: (len(starts) * C, length).

  Concatenated rather than written into a zero buffer: 7-10 % faster at 128-512 x 64 channels.
  """
  return jnp.concatenate([lax.dynamic_slice_in_dim(shifted_t, start, length, axis=1)
                          for start in starts], axis=0)


def _dw_whole(shifted, top, starts, fixed, acc):
  """`_dw_shifted`'s reduction over all rows at once: one matmul per group of taps.

  Groups of taps are stacked into one matmul at least `_DW_MIN_WIDTH` rows tall, at most a third
  of the taps; the groups run in a `lax.scan`, so that only one group's slices are alive at a time
  (unrolled, XLA builds all of them first).
  """
  length, width = fixed.shape[0], shifted.shape[1]
  shifted_t = _transposed(shifted, top, length + max(starts))
  group = max(1, min(len(starts) // 3, math.ceil(_DW_MIN_WIDTH / width)))
  while len(starts) % group:
    group -= 1

  def one_group(_, group_starts):
    return None, jnp.matmul(_stacked(shifted_t, group_starts, length), fixed,
                            preferred_element_type=acc)

  group_starts = jnp.array(starts, jnp.int32).reshape(-1, group)
  if len(group_starts) == 1:
    return one_group(None, group_starts[0])[1]
  return lax.scan(one_group, None, group_starts)[1].reshape(len(starts) * width, -1)


def _dw_chunked(shifted, top, starts, fixed, acc):
  """`_dw_shifted`'s reduction in chunks of rows, so that a chunk's slices stay in cache.

  A `lax.scan` over chunks of the fixed operand's rows; in each, the taps' slices are stacked by
  three (a 3x3 kernel's row, or all of a 1x3/3x1 kernel) into (3 x channels, chunk) @ (chunk, C)
  matmuls, accumulated across chunks; all taps in one matmul when they stack to at most
  `_DW_MIN_WIDTH` rows (a first layer's few input channels), so that the fixed rows are read once
  (1 -> 64 channels at 256x256: 16 -> 8 ms). Neither the stacked slices nor the fixed rows of a
  chunk exceed about `_DW_CHUNK_BYTES`. Rows are padded with zeros to whole chunks.
  """
  length, width, fixed_width = fixed.shape[0], shifted.shape[1], fixed.shape[1]
  group = len(starts) if len(starts) * width <= _DW_MIN_WIDTH else 3 if len(starts) % 3 == 0 else 1
  chunk = max(128, _DW_CHUNK_BYTES // (max(group * width, fixed_width) * shifted.dtype.itemsize))
  chunks = -(-length // chunk)
  fixed = jnp.pad(fixed, ((0, chunks * chunk - length), (0, 0)))
  shifted_t = _transposed(shifted, top, chunks * chunk + max(starts))

  def one_chunk(total, first_row):
    rows = lax.dynamic_slice_in_dim(fixed, first_row, chunk, axis=0)
    parts = []
    for k in range(0, len(starts), group):
      cols_t = _stacked(shifted_t, [first_row + start for start in starts[k:k + group]], chunk)
      parts.append(jnp.matmul(cols_t, rows, preferred_element_type=acc))
    return total + jnp.concatenate(parts, axis=0), None

  total = jnp.zeros((len(starts) * width, fixed_width), acc)
  return lax.scan(one_chunk, total, jnp.arange(chunks) * chunk)[0]
