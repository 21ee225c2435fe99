"""Building blocks against direct NumPy (and PyTorch) computations of their formulas.

Tiny shapes throughout; every jitted program is compiled with `models.FAST_COMPILE_OPTIONS`
(backend optimisation level 1): at these sizes compile time is most of the cost. Values are
compared in eval mode with randomised parameters and BatchNorm statistics.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ecm_jax.models.aspp import ImagePooling, MultiScale
from ecm_jax.models.attention import (
  CBAM,
  AttentionGate,
  ChannelAttention,
  ChannelCorrelation,
  CollaborativeAttention,
  DualAttention,
  PositionAttention,
  SpatialCorrelation,
  SqueezeExcitation,
)
from ecm_jax.models.bottleneck import CoAGMuSFu
from ecm_jax.models.layers import BatchNorm, Conv2D, PatchUpsample
from ecm_jax.models.side_output import SideOutput
from helpers import randomized, run_fast

EPS = 1e-5


def init_random(module, *arrays, seed=0, **flags):
  """Randomised variables of `module` for inputs `arrays` (structure from an abstract init)."""
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **flags), *arrays)
  return randomized(shapes, seed)


def eval_apply(module, variables, *args, mutable=False):
  return run_fast(lambda v, *a: module.apply(v, *a, train=False, mutable=mutable), variables, *args)


# NumPy references (float64).

def np_bn_eval(y, params, stats):
  return (y - stats['mean']) / np.sqrt(stats['var'] + EPS) * params['scale'] + params['bias']


def np_conv1d(x, kernel, stride=1, bias=None):
  """PyTorch Conv1d(padding=(k-1)//2) on (B, L, Cin) with kernel (k, Cin, Cout)."""
  k = kernel.shape[0]
  pad = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
  length = (x.shape[1] + 2 * pad - k) // stride + 1
  y = np.stack([np.einsum('bjc,jco->bo', xp[:, t * stride:t * stride + k], kernel)
                for t in range(length)], axis=1)
  return y if bias is None else y + bias


def np_conv2d(x, kernel, bias=None):
  """'SAME' stride-1 convolution, NHWC x HWIO (odd kernel sizes)."""
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  y = sum(np.einsum('bhwc,co->bhwo', xp[:, i:i + h, j:j + w], kernel[i, j])
          for i in range(kh) for j in range(kw))
  return y if bias is None else y + bias


def np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def np_sigmoid(z):
  return 1 / (1 + np.exp(-z))


def as64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def random_features(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# BatchNorm

def test_batch_norm_matches_pytorch_outputs_and_running_stats():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  bn = BatchNorm(momentum=0.9, epsilon=EPS)
  variables = init_random(bn, jnp.zeros((2, 3, 3, 4)), train=False)
  variables['batch_stats'] = {'mean': jnp.zeros(4), 'var': jnp.ones(4)}
  reference = torch.nn.BatchNorm2d(4, eps=EPS, momentum=0.1)
  with torch.no_grad():
    reference.weight.copy_(torch.from_numpy(np.array(variables['params']['scale'])))
    reference.bias.copy_(torch.from_numpy(np.array(variables['params']['bias'])))
  to_torch = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)
  train_step = lambda v, x: bn.apply(v, x, train=True, mutable=['batch_stats'])
  for step in range(3):  # running statistics compound over steps
    x = jnp.asarray(3 * rng.normal(size=(2, 5, 3, 4)) + step, jnp.float32)
    y, updates = run_fast(train_step, variables, x)
    variables = {**variables, 'batch_stats': updates['batch_stats']}
    reference.train()
    y_ref = reference(to_torch(x)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variables['batch_stats']['mean'], reference.running_mean.numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variables['batch_stats']['var'], reference.running_var.numpy(),
                               rtol=1e-5, atol=1e-6)
  reference.eval()
  y = eval_apply(bn, variables, x)
  np.testing.assert_allclose(y, reference(to_torch(x)).permute(0, 2, 3, 1).detach().numpy(),
                             rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_are_float32_under_bfloat16():
  bn = BatchNorm(dtype=jnp.bfloat16)
  x = (random_features((4, 3, 3, 2)) * 100 + 1000).astype(jnp.bfloat16)
  variables = bn.init(jax.random.key(0), x, train=False)
  train_step = lambda v, x: bn.apply(v, x, train=True, mutable=['batch_stats'])
  y, updates = run_fast(train_step, variables, x)
  assert y.dtype == jnp.bfloat16
  stats = updates['batch_stats']
  assert stats['mean'].dtype == stats['var'].dtype == jnp.float32
  x64 = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, 2)
  np.testing.assert_allclose(stats['mean'], 0.1 * x64.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * x64.var(0, ddof=1), rtol=1e-5)


def test_batch_norm_train_mode_rejects_a_single_value_per_channel():
  bn = BatchNorm()
  x = jnp.ones((1, 1, 1, 3))
  variables = bn.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match='more than 1 value per channel'):
    bn.apply(variables, x, train=True, mutable=['batch_stats'])


def test_batch_norm_axis_name_gives_global_batch_statistics_under_shard_map():
  devices = jax.devices()[:2]
  if len(devices) < 2:
    pytest.skip('needs 2 devices (tests/conftest.py simulates them)')
  mesh = Mesh(np.array(devices), ('data',))
  x = random_features((4, 3, 3, 5)) * 2 + 1
  local, single = BatchNorm(axis_name='data'), BatchNorm()
  variables = single.init(jax.random.key(0), x, train=False)

  def step(v, x):
    y, updates = local.apply(v, x, train=True, mutable=['batch_stats'])
    return y, updates['batch_stats']

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data')), out_specs=(P('data'), P()))
  y, stats = jax.jit(sharded)(variables, x)
  y_ref, updates = single.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(stats[name], updates['batch_stats'][name], rtol=1e-5, atol=1e-7)


# Convolutions

def test_conv_and_patch_upsample_init_follow_pytorch_defaults():
  conv, up = Conv2D(32, (3, 3), use_bias=True), PatchUpsample(16, 2)

  def init(key):
    return (conv.init(key, jnp.zeros((1, 4, 4, 16)))['params'],
            up.init(key, jnp.zeros((1, 2, 2, 16)))['params'])

  conv_params, up_params = run_fast(init, jax.random.key(0))
  # Conv2d: fan_in = 3*3*16. ConvTranspose2d weight (Cin, Cout, 2, 2): fan_in = Cout*2*2 = 64.
  for params, shape, bound in ((conv_params, (3, 3, 16, 32), 1 / 12),
                               (up_params, (2, 2, 16, 16), 1 / 8)):
    kernel = np.asarray(params['kernel'])
    assert kernel.shape == shape
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)
    assert np.abs(np.asarray(params['bias'])).max() <= bound


def test_patch_upsample_places_each_pixel_as_a_patch():
  up = PatchUpsample(3, 4, use_bias=False)
  x = random_features((2, 2, 3, 5))
  variables = init_random(up, x)
  y = run_fast(lambda v, x: up.apply(v, x), variables, x)
  kernel = np.asarray(variables['params']['kernel'], np.float64)
  expected = np.einsum('bhwc,ijco->bhiwjo', np.asarray(x, np.float64), kernel).reshape(2, 8, 12, 3)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


# CC, SC, CoA (eqs. 4-9)

@pytest.mark.parametrize('scale', ['none', 'rsqrt_c'])
def test_spatial_correlation_equals_softmax_of_e_e_transpose(scale):
  f = random_features((2, 3, 4, 5))
  sc = SpatialCorrelation(scale)
  s = run_fast(lambda f: sc.apply({}, f), f)
  e = np.asarray(f, np.float64).reshape(2, 12, 5)  # eq. (8)
  logits = np.einsum('bic,bjc->bij', e, e) * (5**-0.5 if scale == 'rsqrt_c' else 1.0)
  np.testing.assert_allclose(s, np_softmax(logits), rtol=1e-5, atol=1e-7)  # eq. (9)


def np_channel_correlation(f, params, stats):
  """Eqs. (5)-(6) in NumPy, eval mode: theta -> Conv1D/BN/ReLU chain -> sigmoid -> Theta (B, C)."""
  h = f.mean(axis=(1, 2))[:, :, None]  # eq. (5)
  h = np.maximum(np_bn_eval(np_conv1d(h, params['conv_in']['kernel']), params['bn_in'],
                            stats['bn_in']), 0)
  h = np.maximum(np_bn_eval(np_conv1d(h, params['conv_down']['kernel'], stride=2),
                            params['bn_down'], stats['bn_down']), 0)
  b, length, _ = h.shape
  up = np.einsum('blc,sco->blso', h, params['deconv_up']['kernel']).reshape(b, 2 * length, -1)
  h = np.maximum(np_bn_eval(up, params['bn_up'], stats['bn_up']), 0)
  logits = np_conv1d(h, params['conv_out']['kernel'], bias=params['conv_out']['bias'])
  return np_sigmoid(logits)[..., 0]


def test_channel_correlation_equals_numpy_1d_encoder_decoder():
  f = random_features((2, 3, 3, 16))
  cc = ChannelCorrelation(hidden=4)
  variables = init_random(cc, f, train=False)
  f_c, state = eval_apply(cc, variables, f, mutable=['intermediates'])
  (theta,) = state['intermediates']['cc_weights']
  assert theta.shape == (2, 16)
  expected = np_channel_correlation(np.asarray(f, np.float64), as64(variables['params']),
                                    as64(variables['batch_stats']))
  np.testing.assert_allclose(theta, expected, rtol=1e-5)
  np.testing.assert_allclose(f_c, np.asarray(f) * expected[:, None, None, :], rtol=1e-5)  # eq. (7)


def test_channel_correlation_rejects_odd_channel_count():
  with pytest.raises(ValueError, match='even channel count'):
    jax.eval_shape(lambda f: ChannelCorrelation().init(jax.random.key(0), f, False),
                   jax.ShapeDtypeStruct((1, 2, 2, 7), jnp.float32))


@pytest.mark.parametrize('cc,sc', [(True, True), (True, False), (False, True)])
def test_collaborative_attention_is_eq_4(cc, sc):
  f = random_features((2, 2, 3, 8))
  coa = CollaborativeAttention(cc, sc, cc_hidden=4)
  variables = init_random(coa, f, train=False)
  f_a, state = eval_apply(coa, variables, f, mutable=['intermediates'])
  maps = state['intermediates']
  f64 = np.asarray(f, np.float64)
  if cc:
    theta = np_channel_correlation(f64, as64(variables['params']['cc']),
                                   as64(variables['batch_stats']['cc']))
    f_c = f64 * theta[:, None, None, :]
  else:
    f_c = f64
  if sc:
    e = f64.reshape(2, 6, 8)
    attended = np.einsum('bij,bjc->bic', np_softmax(np.einsum('bic,bjc->bij', e, e)),
                         f_c.reshape(2, 6, 8)).reshape(f.shape)
  else:
    attended = f_c
  np.testing.assert_allclose(f_a, attended + f64, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(maps['coa_output'][0], f_a)
  assert ('cc' in maps) == cc and ('sc' in maps) == sc


# MuS (ASPP)

def test_multi_scale_output_shape_and_branches():
  f = random_features((2, 4, 4, 6))
  mus = MultiScale(channels=3, rates=(1, 2, 3))
  variables = init_random(mus, f, train=False)
  assert set(variables['params']) == {'conv1x1', 'atrous0', 'atrous1', 'atrous2', 'image_pool',
                                      'project'}
  # The projection reads the five branches and F itself.
  assert variables['params']['project']['conv']['kernel'].shape == (1, 1, 5 * 3 + 6, 6)
  assert eval_apply(mus, variables, f).shape == (2, 4, 4, 6)


def test_multi_scale_uses_every_dilation_rate():
  """Receptive-field probe: an impulse at the centre changes exactly the outputs at the centre and
  at offsets (a*r, b*r), a, b in {-1, 0, 1}, for every rate r (image pooling held constant)."""
  rates, size, centre = (6, 12, 18), 40, 20
  mus = MultiScale(channels=4, rates=rates)
  base = jnp.zeros((1, size, size, 3))
  # Random kernels; BatchNorm as the identity, so a zero input gives zero branch outputs and a
  # change passes a ReLU whenever it is positive.
  identity_bn = {'scale': 1.0, 'bias': 0.0, 'mean': 0.0, 'var': 1.0}
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: a if p[-1].key == 'kernel' else jnp.full_like(a, identity_bn[p[-1].key]),
      init_random(mus, base, train=False))
  params = dict(variables['params'])
  # A zero image-pool kernel makes that branch constant (it would change everywhere); a positive
  # projection passes every non-negative branch change through the last ReLU.
  params['image_pool'] = jax.tree.map(jnp.zeros_like, params['image_pool'])
  params['project'] = jax.tree.map(jnp.abs, params['project'])
  variables = {'params': params, 'batch_stats': variables['batch_stats']}

  def changed(sign):
    impulse = base.at[0, centre, centre, :].set(10 * sign)
    outputs = mus.apply(variables, jnp.stack([base[0], impulse[0]]), train=False)
    return jnp.any(jnp.abs(outputs[1] - outputs[0]) > 1e-6, axis=-1)

  # +-impulse: every non-zero branch change is positive for one sign and passes the branch ReLU.
  moved = np.asarray(run_fast(lambda: changed(1.0) | changed(-1.0)))
  expected = np.zeros((size, size), bool)
  for r in rates:
    for a in (-1, 0, 1):
      for b in (-1, 0, 1):
        expected[centre + a * r, centre + b * r] = True
  np.testing.assert_array_equal(moved, expected)


def test_image_pooling_branch_is_spatially_constant():
  f = random_features((2, 4, 6, 5))
  pool = ImagePooling(3)
  variables = init_random(pool, f, train=False)
  y = np.asarray(eval_apply(pool, variables, f))
  assert y.shape == (2, 4, 6, 3)
  np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1, :1], y.shape))
  p, s = as64(variables['params']['conv_bn_relu']), as64(variables['batch_stats']['conv_bn_relu'])
  pooled = np.asarray(f, np.float64).mean(axis=(1, 2))
  expected = np.maximum(np_bn_eval(pooled @ p['conv']['kernel'][0, 0], p['bn'], s['bn']), 0)
  np.testing.assert_allclose(y[:, 0, 0], expected, rtol=1e-5, atol=1e-6)


# CoAG-MuSFu fusion (eq. 10, Table III)

@pytest.mark.parametrize('fusion', ['fuse', 'add', 'series'])
def test_coag_musfu_fusion_modes(fusion):
  f = random_features((2, 2, 2, 8))
  block = CoAGMuSFu(fusion=fusion, cc_hidden=4, mus_channels=4, mus_rates=(1, 2))
  variables = init_random(block, f, train=False)
  assert ('fuse' in variables['params']) == (fusion == 'fuse')
  sub = lambda name: {k: v[name] for k, v in variables.items()}
  coa = CollaborativeAttention(cc_hidden=4)
  mus = MultiScale(4, (1, 2))

  def run(v, f):
    out = block.apply(v, f, train=False)
    f_a = coa.apply(sub('coa'), f, train=False)
    mus_in = f_a if fusion == 'series' else f
    return out, f_a, mus.apply(sub('mus'), mus_in, train=False)

  out, f_a, f_s = run_fast(run, variables, f)
  if fusion == 'series':
    expected = f_s
  elif fusion == 'add':
    expected = f_a + f_s
  else:
    p, s = as64(variables['params']['fuse']), as64(variables['batch_stats']['fuse'])
    stacked = np.concatenate([f_a, f_s], axis=-1).astype(np.float64)
    expected = np.maximum(np_bn_eval(stacked @ p['conv']['kernel'][0, 0], p['bn'], s['bn']), 0)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_coag_musfu_with_one_or_no_sub_block():
  f = random_features((2, 2, 2, 8))
  only_mus = CoAGMuSFu(cc=False, sc=False, mus_channels=4, mus_rates=(1,))
  assert set(init_random(only_mus, f, train=False)['params']) == {'mus'}
  only_coa = CoAGMuSFu(mus=False, cc_hidden=4)
  assert set(init_random(only_coa, f, train=False)['params']) == {'coa'}
  neither = CoAGMuSFu(cc=False, sc=False, mus=False)
  variables = neither.init(jax.random.key(0), f, False)
  assert not variables
  np.testing.assert_array_equal(neither.apply(variables, f, False), f)


# Baseline attention blocks

def test_squeeze_excitation_equals_numpy():
  f = random_features((2, 3, 3, 8))
  se = SqueezeExcitation(reduction=4)
  variables = init_random(se, f, train=False)
  y = eval_apply(se, variables, f)
  p = as64(variables['params'])
  f64 = np.asarray(f, np.float64)
  hidden = np.maximum(f64.mean(axis=(1, 2)) @ p['squeeze']['kernel'][0, 0] + p['squeeze']['bias'], 0)
  gate = np_sigmoid(hidden @ p['excite']['kernel'][0, 0] + p['excite']['bias'])
  assert p['squeeze']['kernel'].shape == (1, 1, 8, 2)
  np.testing.assert_allclose(y, f64 * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_cbam_equals_numpy():
  f = random_features((2, 4, 5, 8))
  cbam = CBAM(reduction=4)
  variables = init_random(cbam, f, train=False)
  y = eval_apply(cbam, variables, f)
  p, s = as64(variables['params']), as64(variables['batch_stats'])
  f64 = np.asarray(f, np.float64)
  mlp = lambda v: (np.maximum(v @ p['mlp_in']['kernel'][0, 0] + p['mlp_in']['bias'], 0)
                   @ p['mlp_out']['kernel'][0, 0] + p['mlp_out']['bias'])
  f1 = f64 * np_sigmoid(mlp(f64.mean(axis=(1, 2))) + mlp(f64.max(axis=(1, 2))))[:, None, None]
  pooled = np.stack([f1.mean(-1), f1.max(-1)], axis=-1)
  spatial = np_bn_eval(np_conv2d(pooled, p['spatial_conv']['kernel']), p['spatial_bn'],
                       s['spatial_bn'])
  np.testing.assert_allclose(y, f1 * np_sigmoid(spatial), rtol=1e-5, atol=1e-5)


def test_attention_gate_equals_numpy():
  skip, gate = random_features((2, 4, 4, 6)), random_features((2, 4, 4, 6), seed=2)
  module = AttentionGate(3)
  variables = init_random(module, skip, gate, train=False)
  y = eval_apply(module, variables, skip, gate)
  p, s = as64(variables['params']), as64(variables['batch_stats'])
  one_by_one = lambda v, name: v @ p[name]['kernel'][0, 0]
  x1 = np_bn_eval(one_by_one(np.asarray(skip, np.float64), 'w_x'), p['bn_x'], s['bn_x'])
  g1 = np_bn_eval(one_by_one(np.asarray(gate, np.float64), 'w_g'), p['bn_g'], s['bn_g'])
  alpha = np_sigmoid(np_bn_eval(one_by_one(np.maximum(x1 + g1, 0), 'psi'), p['bn_psi'], s['bn_psi']))
  np.testing.assert_allclose(y, np.asarray(skip) * alpha, rtol=1e-5, atol=1e-6)


def test_danet_position_and_channel_attention_equal_numpy():
  f = random_features((2, 3, 3, 16))
  f64 = np.asarray(f, np.float64)
  pam, cam = PositionAttention(), ChannelAttention()
  pam_vars, cam_vars = init_random(pam, f), init_random(cam, f)
  y_pam, y_cam = run_fast(lambda a, b, f: (pam.apply(a, f), cam.apply(b, f)), pam_vars, cam_vars, f)
  p = as64(pam_vars['params'])
  proj = lambda name: (f64 @ p[name]['kernel'][0, 0] + p[name]['bias']).reshape(2, 9, -1)
  attention = np_softmax(np.einsum('bic,bjc->bij', proj('query'), proj('key')))
  out = np.einsum('bij,bjc->bic', attention, proj('value')).reshape(f.shape)
  np.testing.assert_allclose(y_pam, 0.5 * out + f64, rtol=1e-5, atol=1e-5)
  x = f64.reshape(2, 9, 16)
  energy = np.einsum('bic,bid->bcd', x, x)
  attention = np_softmax(energy.max(-1, keepdims=True) - energy)
  out = np.einsum('bcd,bid->bic', attention, x).reshape(f.shape)
  np.testing.assert_allclose(y_cam, 0.5 * out + f64, rtol=1e-5, atol=1e-5)


def test_dual_attention_keeps_shape_and_has_both_branches():
  f = random_features((2, 2, 2, 16))
  block = DualAttention()
  variables = init_random(block, f, train=False)
  assert set(variables['params']) == {'pam_in', 'pam', 'pam_out', 'cam_in', 'cam', 'cam_out',
                                      'project'}
  assert variables['params']['pam']['query']['kernel'].shape == (1, 1, 4, 1)  # C/4, then /8
  assert eval_apply(block, variables, f).shape == f.shape


def test_side_output_upsamples_16x_to_float32_logits():
  f = random_features((2, 2, 3, 8)).astype(jnp.bfloat16)
  side = SideOutput((6, 5, 4), num_classes=2)
  variables = init_random(side, f, train=False)
  kernels = [variables['params'][f'deconv{i}']['kernel'].shape for i in range(3)]
  assert kernels == [(2, 2, 8, 6), (2, 2, 6, 5), (4, 4, 5, 4)]
  y = eval_apply(side, variables, f)
  assert y.shape == (2, 32, 48, 2) and y.dtype == jnp.float32
