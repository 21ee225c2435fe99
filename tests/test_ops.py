"""ecm_jax.models.ops and ecm_jax.cpu.conv: every conv implementation computes lax.conv's function and gradients; the patch
upsampling and the max-pool equal their library / PyTorch references. No timing here
(speed: benchmarks/ops.py).

Tolerances (float32): forward rtol 1e-5, gradients rtol 1e-4, both with an absolute floor of the
same size times the largest reference entry (sums of up to ~2000 products reordered).
"""

import flax.linen as nn
import jax
from jax import export, lax
import jax.numpy as jnp
import numpy as np
import pytest

from ecm_jax.cpu import conv as cpu_conv
from ecm_jax.models import ops


def _close(actual, desired, rtol):
  desired = np.asarray(desired, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol,
                             atol=rtol * np.abs(desired).max())


def _normal(seed, shape, dtype=jnp.float32, scale=1.0):
  # numpy's generator: jax.random would compile a sampler per shape (seconds on this machine).
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


# (kh, kw, dilation, H, W, Cin, Cout). Map sizes are chosen so that every code path of the 'gemm'
# impl runs (padded/real area ratio in brackets): lax.conv forward + shifted-row weight gradient
# (< 1.2: 24x20), per-tap forward and input gradient + cropped weight gradient (>= 1.2: 14x12, 8x6
# and the dilated ones), some taps only seeing padding (dilation 12 on 24x10) or all but the centre
# one (1x1 and dilation 12/18 on 12x10: one matmul); Cin < Cout and Cin > Cout (the shifted
# operand), one group of shifted taps and several (in a scan: 40+ channels); a single input channel.
CASES = [
    (3, 3, 1, 24, 20, 3, 8),
    (3, 3, 1, 24, 20, 8, 3),
    (3, 3, 1, 24, 20, 40, 56),
    (3, 3, 1, 24, 20, 72, 40),
    (3, 3, 1, 14, 12, 5, 4),
    (3, 3, 1, 8, 6, 4, 7),
    (1, 3, 1, 24, 20, 3, 8),
    (1, 3, 1, 12, 10, 8, 3),
    (3, 1, 1, 24, 20, 8, 3),
    (3, 1, 1, 14, 12, 3, 8),
    (1, 1, 1, 12, 10, 6, 5),
    (3, 3, 6, 12, 10, 5, 6),
    (3, 3, 6, 8, 8, 6, 5),
    (3, 3, 12, 12, 10, 5, 6),
    (3, 3, 18, 12, 10, 6, 5),
    (3, 3, 12, 24, 20, 4, 4),
    (3, 3, 12, 24, 10, 4, 4),
    (3, 3, 1, 24, 20, 1, 8),
]


def _ids(case):
  kh, kw, d, h, w, cin, cout = case
  return f'{kh}x{kw}d{d}-{h}x{w}-{cin}to{cout}'


def _problem(case, dtype=jnp.float32, batch=2):
  kh, kw, d, h, w, cin, cout = case
  x = _normal(0, (batch, h, w, cin), dtype)
  kernel = _normal(1, (kh, kw, cin, cout), dtype, scale=(kh * kw * cin) ** -0.5)
  r = _normal(2, (batch, h, w, cout), dtype)  # a random linear functional <conv(x), r>
  return x, kernel, r, d


def _forward_and_grads(impl, dilation, jit):
  """(x, kernel, r) -> conv(x, kernel) and the gradients of <conv(x, kernel), r> w.r.t. x, kernel."""
  def fn(x, kernel, r):
    y, vjp = jax.vjp(lambda x, k: ops.conv2d(x, k, dilation=dilation, impl=impl), x, kernel)
    return (y, *vjp(r))
  return jax.jit(fn) if jit else fn


def _check_gemm_equals_xla(case, jit):
  x, kernel, r, d = _problem(case)
  want_y, want_dx, want_dk = _forward_and_grads('xla', d, True)(x, kernel, r)
  got_y, got_dx, got_dk = _forward_and_grads('gemm', d, jit)(x, kernel, r)
  assert got_y.shape == want_y.shape and got_y.dtype == want_y.dtype
  _close(got_y, want_y, 1e-5)
  _close(got_dx, want_dx, 1e-4)
  _close(got_dk, want_dk, 1e-4)


@pytest.mark.parametrize('case', CASES, ids=_ids)
def test_gemm_forward_and_gradients_equal_xla(case):
  _check_gemm_equals_xla(case, jit=True)


# The shifted-row cases, with the weight gradient reduced in chunks of 128 rows (the last one
# partial) instead of over all rows at once: the test maps are below the chunking threshold.
# With 3 shifted channels all taps share one matmul per chunk; with 40, they are stacked by three.
@pytest.mark.parametrize('case', [c for c in CASES[:10] if c[3] == 24], ids=_ids)
def test_gemm_chunked_weight_gradient_equals_xla(case, monkeypatch):
  monkeypatch.setattr(cpu_conv, '_DW_CHUNK_MIN_ROWS', 0)
  monkeypatch.setattr(cpu_conv, '_DW_CHUNK_BYTES', 1)
  _check_gemm_equals_xla(case, jit=True)


@pytest.mark.parametrize('case', [CASES[0], CASES[4], CASES[10], CASES[11]], ids=_ids)
def test_gemm_equals_xla_without_jit(case):
  _check_gemm_equals_xla(case, jit=False)


@pytest.mark.parametrize('case', [CASES[0], CASES[3], CASES[5], CASES[11], CASES[14]], ids=_ids)
def test_gemm_bfloat16_runs_and_stays_close(case):
  x, kernel, r, d = _problem(case, jnp.bfloat16)
  got = _forward_and_grads('gemm', d, True)(x, kernel, r)
  assert all(g.dtype == jnp.bfloat16 for g in got)
  # Reference: the same (bf16-valued) inputs in float32 through lax.conv.
  want = _forward_and_grads('xla', d, True)(*(a.astype(jnp.float32) for a in (x, kernel, r)))
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w)
    assert np.all(np.isfinite(g))
    assert np.abs(g - w).max() <= 2e-2 * np.abs(w).max()


def test_auto_resolves_to_gemm_on_cpu():
  # 'auto' without a platform follows the default backend ('gemm' only on the CPU).
  assert ops.resolve_impl('auto') == ('gemm' if jax.default_backend() == 'cpu' else 'xla')
  assert ops.resolve_impl('auto', 'cpu') == 'gemm'
  for platform in ('cuda', 'rocm', 'tpu'):
    assert ops.resolve_impl('auto', platform) == 'xla'
  assert ops.resolve_impl('xla', 'cpu') == 'xla' and ops.resolve_impl('gemm', 'tpu') == 'gemm'


def test_impl_decides_the_lowered_kernels_and_auto_is_resolved_from_the_backend():
  """'xla' lowers to lax.conv's weight gradient for every platform, 'gemm' to matmuls; 'auto' is
  resolved once from the default backend (here the CPU: 'gemm'), so a model built for a GPU or
  TPU ('auto' resolved there to 'xla') never traces the CPU kernels.

  jax.export lowers for a platform without needing its devices; the kernel gradient of 'xla' is a
  convolution, that of 'gemm' is not.
  """
  x, kernel, r, d = _problem(CASES[0])

  def kernel_grad_convs(impl, platform):
    fn = jax.jit(jax.grad(lambda k, x, r: jnp.vdot(ops.conv2d(x, k, dilation=d, impl=impl), r)))
    return export.export(fn, platforms=[platform])(kernel, x, r).mlir_module().count('convolution')

  assert kernel_grad_convs('xla', 'cpu') > 0
  assert kernel_grad_convs('gemm', 'cpu') == 0
  assert kernel_grad_convs('auto', 'cpu') == 0
  for platform in ('cuda', 'rocm', 'tpu'):
    resolved = ops.resolve_impl('auto', platform)
    assert kernel_grad_convs(resolved, platform) == kernel_grad_convs('xla', platform) > 0
  _close(jax.grad(lambda k: jnp.vdot(ops.conv2d(x, k), r))(kernel),
         jax.grad(lambda k: jnp.vdot(ops.conv2d(x, k, impl='xla'), r))(kernel), 1e-4)


def test_bad_impl_raises_naming_the_choices():
  x, kernel, _, _ = _problem(CASES[0])
  with pytest.raises(ValueError, match="'auto', 'xla', 'gemm'"):
    ops.conv2d(x, kernel, impl='cudnn')
  with pytest.raises(ValueError, match='gemm'):
    ops.resolve_impl('GEMM')


def test_conv_rejects_even_kernels_and_mixed_dtypes():
  x = _normal(0, (1, 6, 6, 2))
  with pytest.raises(ValueError, match='odd'):
    ops.conv2d(x, _normal(1, (2, 2, 2, 3)), impl='gemm')
  with pytest.raises(TypeError):
    ops.conv2d(x, _normal(1, (3, 3, 2, 3), jnp.bfloat16), impl='gemm')


# upsample_patches -----------------------------------------------------------------------------

@pytest.mark.parametrize('s', [2, 4])
def test_upsample_patches_equals_conv_transpose(s):
  x = _normal(0, (2, 3, 5, 6))
  kernel = _normal(1, (s, s, 6, 4))
  r = _normal(2, (2, 3 * s, 5 * s, 4))

  def ref(x, k):  # lax.conv_transpose correlates the dilated input: the taps come out flipped
    return lax.conv_transpose(x, k[::-1, ::-1], (s, s), 'VALID',
                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  _close(ops.upsample_patches(x, kernel), ref(x, kernel), 1e-5)
  got = jax.grad(lambda x, k: jnp.vdot(ops.upsample_patches(x, k), r), (0, 1))(x, kernel)
  want = jax.grad(lambda x, k: jnp.vdot(ref(x, k), r), (0, 1))(x, kernel)
  for g, w in zip(got, want):
    _close(g, w, 1e-5)


@pytest.mark.parametrize('s', [2, 4])
def test_upsample_patches_equals_torch_conv_transpose(s):
  torch = pytest.importorskip('torch')
  layer = torch.nn.ConvTranspose2d(6, 4, kernel_size=s, stride=s, bias=False)
  x = np.array(_normal(0, (2, 3, 5, 6)))  # a writable copy, as torch.from_numpy wants
  with torch.no_grad():
    want = layer(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  kernel = jnp.asarray(layer.weight.detach().numpy()).transpose(2, 3, 0, 1)  # (Cin,Cout,s,s) -> (s,s,Cin,Cout)
  _close(ops.upsample_patches(jnp.asarray(x), kernel), want, 1e-5)


# max_pool_2x2 ---------------------------------------------------------------------------------

def _pool_value_and_grad(pool, x, r):
  return jax.jit(jax.value_and_grad(lambda x: jnp.vdot(pool(x), r)))(x)


def _flax_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


@pytest.mark.parametrize('shape', [(2, 8, 6, 3), (2, 7, 9, 3)], ids=['even', 'odd'])
def test_max_pool_equals_flax(shape):
  x = _normal(0, shape)  # continuous values: no ties
  r = _normal(1, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  (got_v, got_g), (want_v, want_g) = (_pool_value_and_grad(p, x, r) for p in (ops.max_pool_2x2, _flax_pool))
  np.testing.assert_array_equal(ops.max_pool_2x2(x), _flax_pool(x))
  _close(got_v, want_v, 1e-6)
  np.testing.assert_array_equal(got_g, want_g)


def test_max_pool_ties_send_the_gradient_to_the_first_maximum():
  x = np.maximum(np.round(_normal(0, (2, 8, 6, 3))), 0.)  # many ties, e.g. all-zero windows after ReLU
  r = _normal(1, (2, 4, 3, 3))
  _, got = _pool_value_and_grad(ops.max_pool_2x2, x, r)
  assert np.all(np.isfinite(got))
  _close(got.sum(), r.sum(), 1e-5)  # each window's gradient is routed once, not split or duplicated
  assert np.count_nonzero(got) == np.count_nonzero(r)
  np.testing.assert_array_equal(got, _pool_value_and_grad(_flax_pool, x, r)[1])
  # An all-equal window: everything to its top-left element.
  _, g = _pool_value_and_grad(ops.max_pool_2x2, jnp.ones((1, 2, 2, 1)), jnp.full((1, 1, 1, 1), 3.))
  np.testing.assert_array_equal(g[0, :, :, 0], [[3., 0.], [0., 0.]])


def test_max_pool_ties_match_torch():
  torch = pytest.importorskip('torch')
  x = np.maximum(np.round(_normal(0, (2, 8, 6, 3))), 0.)
  r = np.array(_normal(1, (2, 4, 3, 3)))  # writable, for torch.from_numpy
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  (torch.nn.functional.max_pool2d(xt, 2) * torch.from_numpy(r).permute(0, 3, 1, 2)).sum().backward()
  _, got = _pool_value_and_grad(ops.max_pool_2x2, jnp.asarray(x), jnp.asarray(r))
  np.testing.assert_array_equal(got, xt.grad.permute(0, 2, 3, 1).numpy())
