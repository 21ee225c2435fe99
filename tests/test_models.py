"""The networks: every VARIANTS row, the switches, input checks, attention maps, bfloat16, init,
the summary command, and one forward pass at the paper's true shape.

Small widths (4..64) and 32x32 inputs except where stated; jitted programs are compiled with
`models.FAST_COMPILE_OPTIONS` (compile time is most of the cost at these sizes). VARIANTS rows
that resolve to the same model config (e.g. fusion_fuse = ec_cam_unet) are checked once.
"""

import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import VARIANTS, get_config
from ecm_jax.models.attention import SqueezeExcitation
from ecm_jax.models.networks import attention_maps, build_model, init_variables
from ecm_jax.models.side_output import SideOutput
from ecm_jax.models.summary import summary_table
from ecm_jax.train.losses import segmentation_loss
from helpers import (
  GRADIENT_ROWS,
  REPO,
  abstract_variables,
  random_input,
  randomized,
  run_fast,
  small_config,
)


def param_paths(config):
  return set(flax.traverse_util.flatten_dict(abstract_variables(build_model(config))['params']))


def train_and_eval(model, variables, x, with_gradients):
  """Train outputs and batch_stats (and the gradients of a train-mode loss, or None), eval outputs
  and batch_stats."""

  def loss_fn(params):
    outputs, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                   train=True, mutable=['batch_stats'],
                                   rngs={'dropout': jax.random.key(0)})  # SegFormer's drop-path
    loss = sum(jnp.mean(jnp.square(logits)) for logits in outputs.values())
    return loss, (outputs, updates['batch_stats'])

  if with_gradients:
    grads, (train_outputs, train_stats) = jax.grad(loss_fn, has_aux=True)(variables['params'])
  else:
    grads, (_, (train_outputs, train_stats)) = None, loss_fn(variables['params'])
  eval_outputs, eval_updates = model.apply(variables, x, train=False, mutable=['batch_stats'])
  return grads, train_outputs, train_stats, eval_outputs, eval_updates['batch_stats']


def unique_variants():
  """VARIANTS rows grouped by their resolved model config: (id listing the rows, first row)."""
  groups = {}
  for variant in VARIANTS:
    groups.setdefault(repr(sorted(get_config(variant).model.items())), []).append(variant)
  return [pytest.param(rows[0], id='='.join(rows)) for rows in groups.values()]


@pytest.mark.parametrize('variant', unique_variants())
def test_variant_initialises_trains_and_evaluates(variant):
  config = small_config(variant)
  model = build_model(config)
  size = max(32, model.smallest_input())
  x = random_input((2, size, size, 1))
  shapes = abstract_variables(model)
  assert set(shapes) == {'params', 'batch_stats'}
  variables = randomized(shapes, seed=0)
  with_gradients = variant in GRADIENT_ROWS
  grads, train_out, train_stats, eval_out, eval_stats = run_fast(
      lambda v, x: train_and_eval(model, v, x, with_gradients), variables, x)
  expected_outputs = {'logits', 'side_logits'} if config.dws else {'logits'}
  for outputs in (train_out, eval_out):
    assert set(outputs) == expected_outputs
    for logits in outputs.values():
      assert logits.shape == (2, size, size, 1) and logits.dtype == jnp.float32
      assert np.isfinite(logits).all()
  if with_gradients:
    # Every parameter gets a finite, non-zero gradient (all of them are wired into the outputs).
    flat_grads = flax.traverse_util.flatten_dict(grads)
    assert set(flat_grads) == set(flax.traverse_util.flatten_dict(variables['params']))
    for path, grad in flat_grads.items():
      assert np.isfinite(grad).all(), path
      assert np.abs(grad).max() > 0, path
  # Train mode moves every running statistic; eval mode leaves them exactly as they were.
  old = flax.traverse_util.flatten_dict(variables['batch_stats'])
  for path, value in flax.traverse_util.flatten_dict(train_stats).items():
    assert not np.allclose(value, old[path], rtol=0, atol=1e-7), path
  jax.tree.map(np.testing.assert_array_equal, eval_stats, variables['batch_stats'])


def test_switches_change_the_graph_as_expected():
  unet = param_paths(small_config('unet'))
  under = lambda paths, *prefixes: all(any(p[:len(q)] == q for q in prefixes) for p in paths)

  def diff(variant):
    paths = param_paths(small_config(variant))
    return paths - unet, unet - paths

  added, removed = diff('unet+cc')
  assert added and under(added, ('bottleneck', 'coa', 'cc')) and not removed
  assert diff('unet+sc') == (set(), set())  # SC has no parameters: see the intermediates below
  added, removed = diff('unet+mus')
  assert added and under(added, ('bottleneck', 'mus')) and not removed
  added, removed = diff('unet+dws')
  assert added and under(added, ('side_output',)) and not removed
  added, removed = diff('unet+coag_musfu')
  assert under(added, ('bottleneck', 'coa', 'cc'), ('bottleneck', 'mus'), ('bottleneck', 'fuse'))
  assert {p[:2] for p in added} == {('bottleneck', 'coa'), ('bottleneck', 'mus'),
                                    ('bottleneck', 'fuse')} and not removed
  # EC replaces each encoder block's conv/bn by the three branches; the decoder is untouched.
  added, removed = diff('unet+ec')
  assert {p[-2] for p in added} == {'conv3x3', 'bn3x3', 'conv1x3', 'bn1x3', 'conv3x1', 'bn3x1'}
  assert {p[-2] for p in removed} == {'conv', 'bn'}
  assert all(p[0] == 'encoder' for p in added | removed)
  # Fusion: only 'fuse' has the eq. (10) projection.
  full = param_paths(small_config('ec_cam_unet'))
  fuse = {p for p in full if p[:2] == ('bottleneck', 'fuse')}
  for variant in ('fusion_add', 'fusion_series'):
    assert full - param_paths(small_config(variant)) == fuse
  # SC is in the graph only when on: its map appears among the intermediates.
  for variant, has_s in (('unet', False), ('unet+sc', True)):
    model = build_model(small_config(variant))
    variables = abstract_variables(model)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']),
                              variables, jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32))
    assert ('sc_attention' in attention_maps(state.get('intermediates', {}))) == has_s


def test_baselines_have_their_own_blocks():
  unet = param_paths(small_config('unet'))
  tops = lambda variant: {p[:2] for p in param_paths(small_config(variant)) - unet}
  assert tops('unet_se') == {('bottleneck', 'squeeze'), ('bottleneck', 'excite')}
  assert tops('unet_cbam') == {('bottleneck', n) for n in ('mlp_in', 'mlp_out', 'spatial_conv',
                                                            'spatial_bn')}
  assert {p[0] for p in param_paths(small_config('danet')) - unet} == {'bottleneck'}
  assert tops('attention_unet') == {(f'decoder{i}', 'gate') for i in range(4)}
  nested = {p[0] for p in param_paths(small_config('unet_pp'))}
  assert nested == ({f'x{i}_{j}' for i in range(5) for j in range(5 - i)} |
                    {f'up{i + 1}_{j}' for j in range(4) for i in range(4 - j)} | {'head'})


def test_unet_name_builds_the_ec_cam_unet_graph_with_ec_cc_sc_mus_off():
  config = get_config('ec_cam_unet').model  # every switch on
  config.name, config.dws = 'unet', False
  assert build_model(config) == build_model(get_config('unet').model)
  config.dws = True
  assert build_model(config) == build_model(get_config('unet+dws').model)
  assert build_model(config) != build_model(get_config('unet').model)


def test_baselines_read_dws_and_ignore_the_ec_cam_switches():
  model = build_model(small_config('unet_se', dws=True, ec=True, cc=True, sc=True, mus=True))
  assert isinstance(model.bottleneck, SqueezeExcitation)
  assert isinstance(model.side_output, SideOutput) and not model.ec


@pytest.mark.parametrize('shape,message', [
    ((32, 32, 1), 'rank 4'),
    ((2, 32, 32, 3), '3 channels'),
    ((2, 40, 32, 1), 'divisible by 16'),
    ((2, 32, 24, 1), 'divisible by 16'),
])
@pytest.mark.parametrize('variant', ['ec_cam_unet', 'unet_pp'])
def test_bad_input_raises_a_clear_error(variant, shape, message):
  model = build_model(small_config(variant))
  variables = abstract_variables(model)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                   jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize('overrides,message', [
    (dict(name='resnet'), 'model.name'),
    (dict(dtype='float16'), 'model.dtype'),
    (dict(dtype='float64'), 'jax_enable_x64'),  # the session is 32-bit
    (dict(fusion='concat'), 'model.fusion'),
    (dict(sc_scale='sqrt'), 'model.sc_scale'),
    (dict(features=(4, 8, 16, 32)), 'model.features'),
    (dict(name='unet', ec_folded=True), 'ec_folded'),
])
def test_bad_model_config_raises_a_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    build_model(small_config(**overrides))


def test_attention_maps_have_the_documented_shapes():
  model = build_model(small_config())
  x = random_input((2, 64, 64, 1))
  variables = randomized(abstract_variables(model), seed=0)
  outputs, state = run_fast(
      lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']), variables, x)
  maps = attention_maps(state['intermediates'])
  assert set(maps) == {'sc_attention', 'cc_weights', 'coa_output'}
  assert maps['sc_attention'].shape == (2, 16, 16)  # bottleneck 4x4: HW = 16
  assert maps['cc_weights'].shape == (2, 64)
  assert maps['coa_output'].shape == (2, 4, 4, 64)
  np.testing.assert_allclose(maps['sc_attention'].sum(-1), 1.0, atol=1e-6)
  assert ((maps['cc_weights'] > 0) & (maps['cc_weights'] < 1)).all()
  # Off by default: a plain apply returns the outputs only.
  plain = run_fast(lambda v, x: model.apply(v, x, train=False), variables, x)
  np.testing.assert_array_equal(plain['logits'], outputs['logits'])


def test_bfloat16_compute_returns_float32_close_to_float32():
  x = random_input()
  float32_model = build_model(small_config())
  bfloat16_model = build_model(small_config(dtype='bfloat16'))
  variables = randomized(abstract_variables(float32_model), seed=0)
  assert jax.tree.map(lambda a: a.dtype, abstract_variables(bfloat16_model)) == jax.tree.map(
      lambda a: a.dtype, variables)  # params and BatchNorm statistics stay float32
  ref, out = run_fast(lambda v, x: (float32_model.apply(v, x, train=False),
                                    bfloat16_model.apply(v, x, train=False)), variables, x)
  for name in ('logits', 'side_logits'):
    assert out[name].dtype == jnp.float32
    scale = np.abs(ref[name]).max()
    # bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 per op), over ~30 layers.
    assert np.abs(out[name] - ref[name]).max() <= 0.05 * scale, name


@pytest.mark.parametrize('variant', GRADIENT_ROWS)
def test_float64_model_is_float64_throughout(variant):
  # Abstractly (no compilation): params, statistics, outputs, the loss and the gradients. The
  # values are checked against PyTorch float64 in tests/test_parity.py.
  with jax.enable_x64(True):
    model = build_model(small_config(variant, dtype='float64'))
    variables = abstract_variables(model)

    def loss_and_grads(v, x):
      def loss_fn(params):
        outputs, updates = model.apply({**v, 'params': params}, x, train=True,
                                       mutable=['batch_stats', 'intermediates'])
        labels = (x[..., 0] > 0).astype(jnp.int32)
        loss, terms = segmentation_loss(outputs, labels, get_config().loss)
        return loss, (outputs, {**updates, 'terms': terms})
      return jax.value_and_grad(loss_fn, has_aux=True)(v['params'])

    size = max(32, model.smallest_input())
    (loss, (outputs, updates)), grads = jax.eval_shape(
        loss_and_grads, variables, jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32))
  leaves = jax.tree.leaves((variables, loss, grads, outputs, updates))
  assert len(outputs) == (2 if variant == 'ec_cam_unet' else 1)
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype('float64')}


def test_init_variables_equals_model_init_and_follows_pytorch_init():
  model = build_model(small_config('unet'))
  key = jax.random.key(3, impl='rbg')  # what init_variables(model, seed=3) draws from
  x = jnp.zeros((2, 32, 48, 1))  # any valid input gives the same variables
  variables = init_variables(model, 3)
  reference = run_fast(lambda key, x: model.init(key, x, train=False), key, x)
  jax.tree.map(np.testing.assert_array_equal, variables, reference)
  flat = flax.traverse_util.flatten_dict(variables)
  for path, value in flat.items():
    collection, name = path[0], path[-1]
    if name == 'kernel':
      # Conv: fan_in = kh*kw*Cin; transposed (decoder `upsample`): PyTorch's fan_in = Cout*s*s.
      fan_in = np.prod(value.shape[:-1]) if path[-2] != 'upsample' else np.prod(
          value.shape[:2]) * value.shape[-1]
      assert np.abs(value).max() <= 1 / np.sqrt(fan_in), path
    elif collection == 'params' and name in ('scale', 'bias') and path[-2] == 'bn':
      np.testing.assert_array_equal(value, 1.0 if name == 'scale' else 0.0)
    elif collection == 'batch_stats':
      np.testing.assert_array_equal(value, 1.0 if name == 'var' else 0.0)


def unet_conv_gflops(features, size):
  """Forward GFLOPs (multiply-add = 2) of the U-Net's convolutions, counted by hand: a 3x3 'same'
  conv on n x n reaches (3n - 2)^2 (tap, pixel) pairs inside the map; 2x2 stride-2 up-convs; 1x1 head."""
  inside = lambda n: (3 * n - 2)**2
  macs, cin = 0, 1
  for level, f in enumerate(features):
    macs += inside(size >> level) * (cin * f + f * f)
    cin = f
  for level in reversed(range(len(features) - 1)):
    n, f = size >> level, features[level]
    macs += n * n * features[level + 1] * f + inside(n) * (2 * f * f + f * f)
  return 2 * (macs + size * size * features[0]) / 1e9


def test_summary_table_counts_parameters_and_flops():
  config = get_config('unet').model  # full widths, the paper's 512x512: only lowered, not compiled
  table = summary_table({'unet': config}, image_size=512)
  header, rule, row = table.splitlines()
  assert header.startswith('| variant | model | parameters | GFLOPs / image |')
  cells = [cell.strip() for cell in row.strip('|').split('|')]
  assert cells[:3] == ['unet', 'ec_cam_unet', '31,036,481']  # the README's figure
  # XLA counts the convolutions' arithmetic plus a little elementwise work (BN, ReLU, pooling).
  convs = unet_conv_gflops(config.features, 512)
  assert convs <= float(cells[3]) <= 1.005 * convs
  assert cells[4:] == ['(1, 512, 512, 1)', '-']


def test_summary_command_line_takes_config_overrides_and_variants():
  command = [sys.executable, '-m', 'ecm_jax.models.summary', '--config', 'configs/kits.py',
             '--config.model.features=(4, 8, 16, 32, 64)', '--config.model.mus_channels=8',
             '--config.model.side_features=(8, 8, 4)', '--config.model.conv_impl=xla',
             '--config.data.image_size=32',
             '--variants=unet,unet+dws']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          )
  assert result.returncode == 0, result.stderr
  rows = [line for line in result.stdout.splitlines() if line.startswith('| unet')]
  assert len(rows) == 2
  assert rows[0].endswith('| (1, 32, 32, 1) | - |')
  assert rows[1].endswith('| (1, 32, 32, 1) | (1, 32, 32, 1) |')


def test_paper_shape_forward_of_the_full_model():
  """Full widths 64..1024, input (1, 512, 512, 1), every switch on: eval forward is finite."""
  config = get_config('ec_cam_unet').model
  assert (config.ec, config.cc, config.sc, config.mus, config.dws) == (True,) * 5
  assert config.features == (64, 128, 256, 512, 1024)
  model = build_model(config)
  x = random_input((1, 512, 512, 1))
  variables = randomized(abstract_variables(model), seed=0)
  outputs = run_fast(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert outputs['logits'].shape == outputs['side_logits'].shape == (1, 512, 512, 1)
  assert np.isfinite(outputs['logits']).all() and np.isfinite(outputs['side_logits']).all()
