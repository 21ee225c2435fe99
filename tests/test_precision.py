"""model.dtype='bfloat16' and model.matmul_precision: what stays float32, a bf16 step against the
float32 one, the residuals' size at the paper's 512x512, the 16-bit BatchNorm's gradient, and the
precision reaching the lowered program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.memory import residual_bytes
from configs import default
from ecm_jax.models.layers import BatchNorm, batch_norm_train_16bit
from ecm_jax.models.networks import build_model, variable_shapes
from ecm_jax.train import step
from ecm_jax.train.train_state import TrainState
from helpers import random_input, randomized, run_fast, small_config


def _loss_and_gradients(variant: str, dtype: str):
  """Loss and gradients of one train step, the same random weights and batch (64x64, batch 4)."""
  model = build_model(small_config(variant, dtype=dtype))
  variables = randomized(variable_shapes(build_model(small_config(variant))), 0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                     batch_stats=variables['batch_stats'], opt_state=None)
  image = random_input((4, 64, 64, 1))
  batch = {'image': image, 'label': (image[..., 0] > 0.5).astype(jnp.int32)}
  loss_config = default.get_config(variant).loss
  loss, _, grads, stats = run_fast(
      lambda s, b: step.loss_and_gradients(s, b, model=model, loss_config=loss_config), state, batch)
  return jax.device_get((loss, grads, stats))


# (variant, largest |loss_bf16 / loss_f32 - 1|, smallest cosine of the flattened gradients).
# Measured on the CPU (random weights, small widths): U-Net 3e-5 / 0.983, full model 4e-4 / 0.900.
# The full model's gradient is noisier: BatchNorm layers followed by more BatchNorm (EC's three
# branches, MuS) have near-cancelling bias/scale gradients, which bf16 rounding dominates.
STEP_TOLERANCES = [('unet', 1e-3, 0.95), ('ec_cam_unet', 3e-3, 0.85)]


@pytest.mark.parametrize('variant,loss_rtol,min_cosine', STEP_TOLERANCES)
def test_bfloat16_step_is_close_to_float32(variant, loss_rtol, min_cosine):
  loss32, grads32, stats32 = _loss_and_gradients(variant, 'float32')
  loss16, grads16, stats16 = _loss_and_gradients(variant, 'bfloat16')
  # Parameters, gradients and BatchNorm statistics stay float32 under a bf16 compute dtype.
  assert all(g.dtype == np.float32 for g in jax.tree.leaves(grads16))
  assert all(s.dtype == np.float32 for s in jax.tree.leaves(stats16))
  assert abs(float(loss16) / float(loss32) - 1) <= loss_rtol
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  g32, g16 = flat(grads32), flat(grads16)
  cosine = g32 @ g16 / np.linalg.norm(g32) / np.linalg.norm(g16)
  assert cosine >= min_cosine, cosine
  assert 0.8 <= np.linalg.norm(g16) / np.linalg.norm(g32) <= 1.25
  for a, b in zip(jax.tree.leaves(stats32), jax.tree.leaves(stats16)):
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * np.abs(a).max())


def test_bfloat16_halves_the_residuals_of_the_full_model_at_512():
  """The paper's full model, 512x512, batch 4: the backward pass's residuals (traced only, no
  compile: the same on every backend) in bf16 at most 60 % of float32's (measured: 5.29 / 13.99
  GiB = 0.38; before BatchNorm's input stayed bf16: 11.3 / 14.0). On a GPU/TPU the compiled step's
  buffers are compared as well (XLA:CPU computes bf16 convolutions in float32, with float32
  copies: its bf16 buffers are not a GPU's; benchmarks/memory.py)."""
  sizes = {}
  for dtype in ('float32', 'bfloat16'):
    config = default.get_config()
    config.data.image_size, config.model.conv_impl, config.model.dtype = 512, 'xla', dtype
    sizes[dtype] = residual_bytes(config)
  assert sizes['bfloat16'] <= 0.6 * sizes['float32'], sizes
  assert sizes['float32'] > 12 * 2**30  # the full model at full size was traced


@pytest.mark.skipif(jax.default_backend() == 'cpu',
                    reason='XLA:CPU computes bf16 convolutions in float32: its buffers are not a '
                           "GPU's (the residuals test above holds on every backend)")
def test_bfloat16_compiled_step_buffers_at_most_60_percent_on_accelerators():
  from benchmarks.memory import compile_abstract_step, step_bytes  # pylint: disable=g-import-not-at-top
  sizes = {}
  for dtype in ('float32', 'bfloat16'):
    config = default.get_config()
    config.data.image_size, config.model.dtype = 512, dtype
    sizes[dtype] = step_bytes(compile_abstract_step(config)[0])[0]
  assert sizes['bfloat16'] <= 0.6 * sizes['float32'], sizes


def test_bfloat16_model_keeps_float32_where_it_should():
  """Logits float32; BatchNorm output (the next conv's input) bf16; params float32."""
  model = build_model(small_config(dtype='bfloat16'))
  x = random_input((2, 32, 32, 1))
  variables = jax.eval_shape(lambda: {'params': variable_shapes(model)['params']})
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  outputs = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=['batch_stats'])[0],
      variable_shapes(model))
  assert outputs['logits'].dtype == jnp.float32 and outputs['side_logits'].dtype == jnp.float32
  bn = BatchNorm(dtype=jnp.bfloat16)
  v = bn.init(jax.random.key(0), x, train=False)
  y, updates = bn.apply(v, x.astype(jnp.bfloat16), train=True, mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updates))


def test_16bit_batch_norm_gradient_equals_float32_arithmetic_on_the_same_values():
  """`batch_norm_train_16bit`'s backward (keeping the bf16 input) against autodiff of BatchNorm's
  float32 path on the same bf16-valued input: within bf16 rounding of the outputs (its dx is bf16;
  rel. 1e-2 of the largest), mean and variance cotangents included."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 6)) * 3 + 1, jnp.bfloat16)
  scale = jnp.asarray(rng.normal(size=6), jnp.float32)
  bias = jnp.full((6,), 0.3, jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def custom(x, scale, bias):
    y, mean, var = batch_norm_train_16bit(x, scale, bias, 1e-5, jnp.bfloat16)
    return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(mean * scale) + 3 * jnp.sum(var)

  def reference(x, scale, bias):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    y = (x - mean) * (scale * jax.lax.rsqrt(var + 1e-5)) + bias
    return jnp.sum(y * w) + jnp.sum(mean * scale) + 3 * jnp.sum(var)

  np.testing.assert_allclose(custom(x, scale, bias), reference(x, scale, bias), rtol=1e-2)
  got = jax.grad(custom, argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(reference, argnums=(0, 1, 2))(x, scale, bias)
  assert got[0].dtype == jnp.bfloat16
  for g, r in zip(got, want):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.abs(g - r).max() <= 1e-2 * np.abs(r).max()


@pytest.mark.parametrize('precision,marker', [('highest', 'HIGHEST'), ('default', None)])
def test_matmul_precision_reaches_every_convolution(precision, marker):
  """model.matmul_precision is the network's `jax.default_matmul_precision`: 'highest' lowers
  every convolution and matmul with precision HIGHEST (what a GPU needs for true float32), and
  'default' leaves JAX's. Lowering only (for a CUDA target: no GPU needed)."""
  model = build_model(small_config('unet', matmul_precision=precision))
  x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])
  with jax.default_matmul_precision('default'):  # the suite's conftest sets 'highest'
    text = jax.export.export(fn, platforms=['cuda'])(variable_shapes(model), x).mlir_module()
  convs = text.count('stablehlo.convolution') + text.count('stablehlo.dot_general')
  assert convs > 0
  if marker is None:
    assert 'HIGHEST' not in text
  else:
    assert text.count(marker) >= convs, (text.count(marker), convs)


def test_matmul_precision_config_error():
  with pytest.raises(ValueError, match='matmul_precision must be one of'):
    build_model(small_config(matmul_precision='tf32'))
