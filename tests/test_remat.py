"""model.remat: the same loss, gradients and BatchNorm statistics as without, fewer residuals, a
smaller compiled step (on the CPU with `networks.compiler_options`), and its config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.memory import residual_bytes
from configs import default
from ecm_jax.models.networks import build_model, compiler_options, variable_shapes
from ecm_jax.train import step
from ecm_jax.train.train_state import TrainState
from helpers import FAST_COMPILE_OPTIONS, random_input, randomized, small_config

REMATS = ('none', 'blocks', 'levels')


# (variant, remat) pairs compared with remat 'none' of the same variant: 'blocks' on the full model
# (every block kind: EC encoder, CoAG-MuSFu, DWS side output, decoder), 'levels' on the U-Net
# (the same level and stage units, a graph that compiles in a fraction of the time).
CASES = (('ec_cam_unet', 'blocks'), ('unet', 'levels'))


def _compiled_gradients(variant: str, remat: str):
  """(compiled loss_and_gradients of the small `variant` with `remat`, its inputs)."""
  model_config = small_config(variant, remat=remat)
  model = build_model(model_config)
  variables = randomized(variable_shapes(model), 0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                     batch_stats=variables['batch_stats'], opt_state=None)
  image = random_input((2, 32, 32, 1))
  batch = {'image': image, 'label': (image[..., 0] > 0.5).astype(jnp.int32)}
  loss_config = default.get_config(variant).loss
  fn = jax.jit(lambda s, b: step.loss_and_gradients(s, b, model=model, loss_config=loss_config))
  options = dict(FAST_COMPILE_OPTIONS, **compiler_options(model_config))
  return fn.lower(state, batch).compile(compiler_options=options), (state, batch)


@pytest.fixture(scope='module')
def results():
  """{(variant, remat): (loss, grads, batch_stats, temp bytes)} for CASES and their 'none'."""
  out = {}
  for variant, remat in CASES:
    for r in ('none', remat):
      compiled, args = _compiled_gradients(variant, r)
      loss, _, grads, stats = jax.device_get(compiled(*args))
      out[variant, r] = (loss, grads, stats, compiled.memory_analysis().temp_size_in_bytes)
  return out


@pytest.mark.parametrize('variant,remat', CASES)
def test_remat_gives_the_same_loss_gradients_and_statistics(results, variant, remat):
  """Recomputing runs the same operations on the same values, fused differently: equal to float32
  rounding: rtol 1e-5, atol 1e-6 of the tree's largest entry (the ASPP image-pool kernel's
  gradient, ~1e-8 here from a BatchNorm over 2 values, differs by 2 % of itself: 1e-8 of the
  largest gradient)."""
  loss0, grads0, stats0, _ = results[variant, 'none']
  loss, grads, stats, _ = results[variant, remat]
  np.testing.assert_allclose(loss, loss0, rtol=1e-5)
  for name, a, b in (('grads', grads0, grads), ('batch_stats', stats0, stats)):
    largest = max(np.abs(x).max() for x in jax.tree.leaves(a))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6 * largest,
                                 err_msg=f'{name} {jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('variant,remat', CASES)
def test_remat_shrinks_the_compiled_step(results, variant, remat):
  """XLA's temporaries of the compiled gradient (with `compiler_options` on the CPU) below those
  without remat (at 32x32, small widths)."""
  assert results[variant, remat][3] < 0.85 * results[variant, 'none'][3], (
      results[variant, remat][3], results[variant, 'none'][3])


@pytest.mark.parametrize('variant', ['ec_cam_unet', 'unet_pp', 'attention_unet'])
def test_remat_keeps_fewer_residuals(variant):
  """The backward pass's residuals (traced only), small widths at 64x64, batch 4: 'blocks' at most
  half of 'none', 'levels' at most 'blocks'."""
  sizes = {}
  for remat in REMATS:
    config = default.get_config(variant)
    config.model.update(small_config(variant, remat=remat))
    config.data.image_size = 64
    sizes[remat] = residual_bytes(config)
  assert sizes['blocks'] <= 0.5 * sizes['none'], sizes
  assert sizes['levels'] <= sizes['blocks'], sizes


def test_compiler_options_only_for_remat_on_the_cpu():
  config = small_config(remat='blocks')
  assert compiler_options(config, 'cpu') == {'xla_disable_hlo_passes': 'cse_barrier_expander'}
  assert compiler_options(config, 'cuda') == {} and compiler_options(config, 'tpu') == {}
  assert compiler_options(small_config(), 'cpu') == {}


def test_remat_config_errors():
  with pytest.raises(ValueError, match="model.remat must be one of"):
    build_model(small_config(remat='all'))
  with pytest.raises(ValueError, match='U-Net family'):
    build_model(small_config('hrnet', remat='blocks'))
