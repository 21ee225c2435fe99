"""SegFormer (ecm_jax/models/segformer.py): parameter counts of the official code for B0..B5,
shapes, stochastic depth and dropout, the official initialisation, one training step, parity
with the torch mirror (ecm_jax/torch_ref/segformer.py), and an independent reference: transformers'
`SegformerForSemanticSegmentation` with our weights.

B0 at 64x64 throughout: the smallest size at which every attention has more than one key (at 32x32
each stage attends to one key, 8x8/8, 4x4/4, 2x2/2, 1x1, so no query projection gets a gradient:
the softmax over one key is constant). conv_impl 'xla', programs compiled with
`FAST_COMPILE_OPTIONS`. The torch tests skip without torch, the transformers one without
transformers (requirements-torch.txt pins it).
"""

import functools
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.default import get_config
from ecm_jax.data.synthetic import noise_batches
from ecm_jax.models import segformer
from ecm_jax.models.networks import (
  FAST_COMPILE_OPTIONS,
  build_model,
  variable_shapes,
)
from ecm_jax.train import step, train_state
from helpers import SMALL, random_input, randomized, run_fast, small_config

# Parameters of the official code (NVlabs/SegFormer 65fa8cfa: mit_bX + SegFormerHead without the
# unused conv_seg) at 1 input channel and 1 class.
OFFICIAL_PARAMETERS = {'b0': 3_711_265, 'b1': 13_671_233, 'b2': 27_341_121, 'b3': 47_216_961,
                       'b4': 63_987_521, 'b5': 84_587_841}
SIZE = 64


def b0_config(drop_path=0.0, dropout=0.0, **overrides):
  return small_config('segformer', segformer_drop_path=drop_path, segformer_dropout=dropout,
                      **overrides)


def train_config():
  """The run config at B0, 64x64, batch 2, stochastic depth and dropout off."""
  config = get_config('segformer')
  config.model.update(SMALL)
  config.model.segformer_drop_path = config.model.segformer_dropout = 0.0
  config.data.image_size, config.train.batch_size = SIZE, 2
  return config


def train_fn(model, with_rng=True):
  """(variables, x, key) -> train-mode logits, given the 'dropout' key or (with_rng False) none."""

  def forward(variables, x, key):
    rngs = {'dropout': key} if with_rng else {}
    outputs, _ = model.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
    return outputs['logits']

  return forward


@pytest.fixture(scope='module')
def inputs():
  """Random B0 variables (random BN statistics, LayerNorm affine) and a (2, 64, 64, 1) input."""
  variables = randomized(variable_shapes(build_model(b0_config())), seed=0)
  return variables, random_input((2, SIZE, SIZE, 1), seed=1)


@pytest.fixture(scope='module')
def eval_logits(inputs):
  """Eval-mode logits of B0 on `inputs`."""
  model = build_model(b0_config())
  return np.asarray(run_fast(lambda v, x: model.apply(v, x, train=False)['logits'], *inputs))


@pytest.mark.parametrize('size', list(OFFICIAL_PARAMETERS))
def test_parameter_counts_equal_the_official_code(size):
  shapes = variable_shapes(build_model(b0_config(segformer_size=size)))
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params'])) == (
      OFFICIAL_PARAMETERS[size])
  # The decoder's BatchNorm is the only one: its running statistics are the only batch_stats.
  assert set(flax.traverse_util.flatten_dict(shapes['batch_stats'])) == {
      ('decode_head', 'bn', 'mean'), ('decode_head', 'bn', 'var')}


def test_bad_config_values_are_rejected():
  with pytest.raises(ValueError, match=r"model.segformer_size must be one of \('b0', 'b1', 'b2', "
                                       r"'b3', 'b4', 'b5'\), got 'b6'"):
    build_model(b0_config(segformer_size='b6'))
  with pytest.raises(ValueError, match=r'model.segformer_dropout must be in \[0, 1\)'):
    build_model(b0_config(dropout=1.0))
  model = build_model(b0_config())
  with pytest.raises(ValueError, match='divisible by 32'):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 1)), train=False)


def test_output_shapes_at_64_executed_and_at_512_abstract(eval_logits):
  assert eval_logits.shape == (2, SIZE, SIZE, 1) and eval_logits.dtype == np.float32
  assert np.isfinite(eval_logits).all()
  for dtype in ('float32', 'bfloat16'):
    model = build_model(b0_config(dtype=dtype))
    variables = variable_shapes(model)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                         jax.ShapeDtypeStruct((1, 512, 512, 1), jnp.float32))
    assert out['logits'].shape == (1, 512, 512, 1) and out['logits'].dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_drop_path_and_dropout_are_stochastic_in_train_mode_only(inputs):
  variables, x = inputs
  key = jax.random.key(0)
  model = build_model(b0_config(drop_path=0.5, dropout=0.5))
  compiled = jax.jit(train_fn(model)).lower(variables, x, key).compile(FAST_COMPILE_OPTIONS)
  first, other, again = (np.asarray(compiled(variables, x, jax.random.key(k))) for k in (0, 1, 0))
  np.testing.assert_array_equal(again, first)  # a fixed key: deterministic
  assert np.abs(other - first).max() > 1e-2 * np.abs(first).max()  # another key: another draw
  # A rate > 0 draws from the 'dropout' rng, which the train step passes.
  with pytest.raises(flax.errors.InvalidRngError, match='dropout'):
    jax.eval_shape(train_fn(model, with_rng=False), variables, x, key)
  # Eval mode, and train mode at rates 0, draw nothing: the same program with or without a key
  # (and in eval mode the program of the model without the rates).
  program = lambda fn: str(jax.make_jaxpr(fn)(variables, x, key))
  plain = build_model(b0_config())
  evaluate = lambda m, rngs: lambda v, x, key: m.apply(v, x, train=False, rngs=rngs(key))
  assert program(evaluate(model, lambda key: {'dropout': key})) == program(
      evaluate(plain, lambda key: {}))
  assert program(train_fn(plain)) == program(train_fn(plain, with_rng=False))
  assert program(train_fn(model)) != program(train_fn(plain))


def test_drop_path_rates_rise_linearly_over_the_blocks():
  np.testing.assert_allclose(segformer.drop_path_rates((2, 2, 2, 2), 0.1), np.linspace(0, 0.1, 8),
                             rtol=0, atol=1e-15)
  assert segformer.drop_path_rates((3, 6, 40, 3), 0.1)[-1] == pytest.approx(0.1)


def _std_checks():
  """Flax path -> the std of the official initialisation (B0; stage 3: C = 160, R = 2)."""
  return {
      ('stage3', 'block0', 'mlp', 'fc1', 'kernel'): 0.02,  # Linear: trunc_normal(std 0.02)
      ('stage3', 'block0', 'attn', 'kv', 'kernel'): 0.02,
      ('stage3', 'block0', 'attn', 'sr', 'kernel'): math.sqrt(2 / (2 * 2 * 160)),  # 2 / fan_out
      ('stage3', 'block0', 'mlp', 'dwconv', 'kernel'): math.sqrt(2 / 9),  # depthwise: fan_out 9
      ('decode_head', 'linear_fuse', 'kernel'): math.sqrt(2 / 256),  # mmcv kaiming fan_out relu
      ('decode_head', 'linear_c4', 'kernel'): 1 / math.sqrt(3 * 256),  # PyTorch default Linear
  }


def _assert_official_init(params):
  for path, std in _std_checks().items():
    values = np.asarray(params[path], np.float64).ravel()
    # 5 standard errors of a sample std (std / sqrt(2n)), and of a sample mean (std / sqrt(n)).
    assert abs(values.std() / std - 1) < 5 / math.sqrt(2 * values.size), path
    assert abs(values.mean()) < 5 * std / math.sqrt(values.size), path
  bound = 1 / math.sqrt(256)  # the PyTorch-default Linear: uniform in +-1/sqrt(fan_in)
  assert np.abs(params['decode_head', 'linear_c4', 'kernel']).max() <= bound
  for path, value in params.items():
    encoder = path[0].startswith('stage')
    if path[-1] == 'bias' and (encoder or path[1] == 'bn'):
      assert not np.any(value), path  # encoder biases, LayerNorm and BatchNorm shifts 0
    if path[-1] == 'scale':
      np.testing.assert_array_equal(value, 1, err_msg=str(path))


def test_initialisation_follows_the_official_code():
  # A stage-3 block of B0 and the B0 head, initialised as the model initialises them (initialising
  # all of B0 compiles several times longer; the mirror's test below covers the whole tree).
  settings = build_model(b0_config()).settings
  block = segformer.MixBlock(heads=5, reduction=2, settings=settings)
  head = segformer.AllMLPDecoder(256, 1, settings=settings)
  stages = [jnp.zeros((1, 8 // 2**i, 8 // 2**i, width)) for i, width in
            enumerate(segformer.SIZES['b0'].widths)]

  def init(key):
    block_key, head_key = jax.random.split(key)
    return {'stage3': {'block0': block.init(block_key, stages[2], train=False)['params']},
            'decode_head': head.init(head_key, stages, train=False)['params']}

  params = flax.traverse_util.flatten_dict(jax.device_get(
      run_fast(init, jax.random.key(0, impl='rbg'))))
  _assert_official_init(params)
  assert np.any(params['decode_head', 'linear_pred', 'bias'])  # PyTorch default, not zeros


def test_one_training_step_lowers_the_loss(inputs):
  """The product's train-mode loss and gradients (`step.loss_and_gradients`) and optimizer
  (`train_state.make_optimizer`, lr 1e-3) on one fixed batch: the loss falls."""
  config = train_config()
  config.train.learning_rate = 1e-3
  model = build_model(config.model)
  tx = train_state.make_optimizer(config, total_steps=2)
  state = train_state.state_from_variables(inputs[0], tx)
  batch = jax.tree.map(jnp.asarray, noise_batches(config, 1)[0])
  loss_and_gradients = jax.jit(functools.partial(step.loss_and_gradients, model=model,
                                                 loss_config=config.loss, seed=config.seed))
  program = loss_and_gradients.lower(state, batch).compile(FAST_COMPILE_OPTIONS)
  before, _, grads, batch_stats = program(state, batch)

  def update(state, grads, batch_stats):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)

  # Jitted: op by op, the Adam update of ~190 tensors of distinct shapes compiles for longer.
  after = program(run_fast(update, state, grads, batch_stats), batch)[0]
  assert float(after) < float(before) - 1e-3, (before, after)


# --- PyTorch: the mirror and transformers ---------------------------------------------------------

@pytest.fixture(name='torch')
def torch_single_threaded():
  """torch, or a skip without it; single-threaded (its pool only adds overhead at these shapes)."""
  torch = pytest.importorskip(
      'torch', reason='PyTorch is optional (pip install -r requirements-torch.txt); the '
      'JAX-vs-PyTorch tests need it')
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(threads)


def test_torch_mirror_initialisation_follows_the_official_code(torch):
  from ecm_jax.torch_ref import convert  # pylint: disable=g-import-not-at-top
  from ecm_jax.torch_ref.models import build_torch_model  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  mirror = build_torch_model(b0_config(drop_path=0.1))
  rates = [m.drop_path.rate for m in mirror.modules() if hasattr(m, 'drop_path')]
  np.testing.assert_allclose(rates, np.linspace(0, 0.1, 8), rtol=0, atol=1e-15)
  variables = convert.state_dict_to_variables(mirror, mirror.state_dict())
  _assert_official_init(flax.traverse_util.flatten_dict(variables['params']))


STEPS = 3


def test_matches_the_torch_mirror(torch):
  """`parity.run` at B0, 64x64, batch 2, trained-like weights: forward per block (eval and
  train), loss, every gradient, and STEPS optimizer steps, within tests/torch_helpers.py's
  bounds."""
  del torch  # the fixture: skipped without torch, single-threaded
  from torch_helpers import (  # pylint: disable=g-import-not-at-top
    BATCH_STATS_TOL,
    FORWARD_TOL,
    GRADIENT_TOL,
    LOSS_TOL,
    PARAMS_TOL,
    assert_within,
    trained_like,
  )

  from ecm_jax.torch_ref import parity  # pylint: disable=g-import-not-at-top
  config = train_config()
  report = parity.run(config, steps=STEPS, variables=trained_like(config.model),
                      compiler_options=FAST_COMPILE_OPTIONS)
  blocks = []
  for i in range(1, 5):
    blocks += [f'stage{i}/block0', f'stage{i}/block1', f'stage{i}']
  names = blocks + ['decode_head', 'logits']
  assert [d.name for d in report.forward_eval] == names
  assert [d.name for d in report.forward_train] == names
  assert_within(report.forward_eval, FORWARD_TOL, 'eval forward')
  assert_within(report.forward_train, FORWARD_TOL, 'train forward')
  assert [d.name for d in report.loss] == ['loss', 'loss_main']
  assert all(d.max_rel <= LOSS_TOL for d in report.loss), report.loss
  assert len(report.gradients) == len(jax.tree.leaves(variable_shapes(
      build_model(config.model))['params']))
  assert_within(report.gradients, GRADIENT_TOL, 'gradient')
  assert_within(report.batch_stats, BATCH_STATS_TOL, f'BatchNorm stats after {STEPS} steps')
  assert len(report.batch_stats) == 2 and set(report.num_batches_tracked) == {STEPS}
  # Per tensor the parameters after Adam steps are not bounded by rounding (tests/test_parity.py).
  assert report.params_overall.max_rel <= PARAMS_TOL, report.params_overall


# Our torch state_dict key prefix -> transformers 4.x's (SegformerForSemanticSegmentation);
# {s}: the stage index from 0, {b}: the block index. The attention's `kv` is split below.
_BLOCK = 'segformer.encoder.block.{s}.{b}.'
TRANSFORMERS_KEYS = (
    (r'stage(\d)\.patch_embed\.proj\.', 'segformer.encoder.patch_embeddings.{s}.proj.'),
    (r'stage(\d)\.patch_embed\.norm\.', 'segformer.encoder.patch_embeddings.{s}.layer_norm.'),
    (r'stage(\d)\.block(\d+)\.norm1\.', _BLOCK + 'layer_norm_1.'),
    (r'stage(\d)\.block(\d+)\.attn\.q\.', _BLOCK + 'attention.self.query.'),
    (r'stage(\d)\.block(\d+)\.attn\.sr\.', _BLOCK + 'attention.self.sr.'),
    (r'stage(\d)\.block(\d+)\.attn\.norm\.', _BLOCK + 'attention.self.layer_norm.'),
    (r'stage(\d)\.block(\d+)\.attn\.proj\.', _BLOCK + 'attention.output.dense.'),
    (r'stage(\d)\.block(\d+)\.norm2\.', _BLOCK + 'layer_norm_2.'),
    (r'stage(\d)\.block(\d+)\.mlp\.fc1\.', _BLOCK + 'mlp.dense1.'),
    (r'stage(\d)\.block(\d+)\.mlp\.dwconv\.', _BLOCK + 'mlp.dwconv.dwconv.'),
    (r'stage(\d)\.block(\d+)\.mlp\.fc2\.', _BLOCK + 'mlp.dense2.'),
    (r'stage(\d)\.norm\.', 'segformer.encoder.layer_norm.{s}.'),
    (r'decode_head\.linear_c(\d)\.', 'decode_head.linear_c.{s}.proj.'),
    (r'decode_head\.linear_fuse\.', 'decode_head.linear_fuse.'),
    (r'decode_head\.bn\.', 'decode_head.batch_norm.'),
    (r'decode_head\.linear_pred\.', 'decode_head.classifier.'),
)
_KV = r'stage(\d)\.block(\d+)\.attn\.kv\.'


def to_transformers(state: dict) -> dict:
  """Our mirror's state_dict under transformers' names: every key matches exactly one rule; `kv`
  (2C outputs, K first as the official reshape reads it) becomes `key` and `value`."""
  out = {}
  for key, value in state.items():
    if match := re.match(_KV, key):
      prefix = _BLOCK.format(s=int(match[1]) - 1, b=match[2]) + 'attention.self.'
      half = value.shape[0] // 2
      out[prefix + 'key.' + key[match.end():]] = value[:half]
      out[prefix + 'value.' + key[match.end():]] = value[half:]
      continue
    matches = [(m, template) for pattern, template in TRANSFORMERS_KEYS
               if (m := re.match(pattern, key))]
    assert len(matches) == 1, (key, [t for _, t in matches])
    match, template = matches[0]
    groups = match.groups() + (None, None)  # (stage, block), either absent
    out[template.format(s=int(groups[0]) - 1 if groups[0] else None, b=groups[1]) +
        key[match.end():]] = value
  return out


def test_matches_transformers_segformer(torch, inputs, eval_logits):
  """transformers' SegFormer-B0 (random init, nothing downloaded) with our weights, its LayerNorm
  epsilons set to the official ones (it builds every LayerNorm with 1e-5), gives our eval logits
  (its 1/4-resolution logits upsampled x4 bilinearly, as our head does) within FORWARD_TOL."""
  transformers = pytest.importorskip('transformers', reason='the reference test needs '
                                     'transformers (pinned in requirements-torch.txt)')
  from torch_helpers import FORWARD_TOL  # pylint: disable=g-import-not-at-top

  from ecm_jax.torch_ref import convert  # pylint: disable=g-import-not-at-top
  from ecm_jax.torch_ref.models import build_torch_model  # pylint: disable=g-import-not-at-top
  variables, x = inputs
  spec = segformer.SIZES['b0']
  hf_config = transformers.SegformerConfig(
      num_channels=1, num_labels=1, hidden_sizes=list(spec.widths), depths=list(spec.depths),
      decoder_hidden_size=spec.decoder_width, num_attention_heads=list(segformer.HEADS),
      sr_ratios=list(segformer.REDUCTIONS), patch_sizes=[k for k, _ in segformer.PATCHES],
      strides=[s for _, s in segformer.PATCHES], mlp_ratios=[segformer.MLP_RATIO] * 4,
      hidden_act='gelu', drop_path_rate=0.0, classifier_dropout_prob=0.0)
  torch.manual_seed(0)
  reference = transformers.SegformerForSemanticSegmentation(hf_config).eval()
  ours = convert.variables_to_state_dict(build_torch_model(b0_config()), jax.device_get(variables))
  state = to_transformers(ours)
  assert set(state) == set(reference.state_dict())  # every parameter and buffer, both ways
  assert len(state) == len(ours) + 2 * sum(spec.depths)  # each block's kv weight, bias: two each
  reference.load_state_dict(state, strict=True)
  epsilons = {}
  for name, module in reference.named_modules():
    if isinstance(module, torch.nn.LayerNorm):
      embedding = re.search(r'patch_embeddings\.\d\.layer_norm$|attention\.self\.layer_norm$', name)
      module.eps = segformer.EMBED_EPSILON if embedding else segformer.BLOCK_EPSILON
      epsilons[module.eps] = epsilons.get(module.eps, 0) + 1
  # 4 patch embeddings + 6 spatial reductions (stages 1-3); 2 per block x 8 + 4 stage ends.
  assert epsilons == {segformer.EMBED_EPSILON: 10, segformer.BLOCK_EPSILON: 20}
  with torch.no_grad():
    quarter = reference(pixel_values=torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))).logits
    logits = torch.nn.functional.interpolate(quarter, size=(SIZE, SIZE), mode='bilinear',
                                             align_corners=False).numpy().transpose(0, 2, 3, 1)
  assert quarter.shape == (2, 1, SIZE // 4, SIZE // 4)
  relative = np.abs(eval_logits - logits).max() / np.abs(logits).max()
  assert relative <= FORWARD_TOL, relative
