"""JAX vs PyTorch: the torch mirror (ecm_jax.torch_ref), the converters and the parity report.

Skipped when torch is not installed. Every VARIANTS row at small widths (4..16), 32x32 inputs,
batch 2 (one image per simulated device), from "trained-like" weights (PyTorch init, then random
BatchNorm affine and running statistics and DA-Net gammas, so eval mode and every branch matter);
JAX programs compiled with `models.FAST_COMPILE_OPTIONS` (compile time is all the cost here).
The full-width EC-CaM-UNet is checked at 32x32 with both conv implementations.

Relative error of a quantity: max|JAX - PyTorch| / max|PyTorch| (for gradients against at least
`parity.GRADIENT_FLOOR` x the model's largest gradient entry; see ecm_jax/parity.py). Asserted:
  * loss <= 1e-5; every block output (eval and train) <= 1e-5, every gradient <= 1e-4 and every
    BatchNorm statistic after 10 steps <= 1e-4, each unless PyTorch float32 itself misses the
    float64 value by more than tolerance / ROUNDING_FACTOR (ill-conditioned train-mode BatchNorm
    gradients at these tiny shapes), then within ROUNDING_FACTOR x that miss;
  * all parameters after 10 steps, as one vector, <= 1e-4. Per parameter tensor the difference is
    not bounded by rounding: Adam turns a gradient entry at rounding level into a +-lr update of
    either sign (on either side and in float32 PyTorch alike), a 2 lr difference per step.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='PyTorch is optional (pip install -r requirements-torch.txt); the '
    'JAX-vs-PyTorch parity tests need it')

from configs.default import VARIANTS, get_config  # noqa: E402
from ecm_jax import checkpoint, parity, training  # noqa: E402
from ecm_jax.models import DTYPES, FAST_COMPILE_OPTIONS, build_model, init_variables  # noqa: E402
from ecm_jax.torch_ref import convert  # noqa: E402
from ecm_jax.torch_ref.models import build_torch_model  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(features=(4, 8, 8, 16, 16), mus_channels=4, side_features=(8, 4, 4), cc_hidden=2,
            se_reduction=4, conv_impl='xla')
STEPS = 10
FORWARD_TOL, LOSS_TOL, GRADIENT_TOL, PARAMS_TOL, BATCH_STATS_TOL = 1e-5, 1e-5, 1e-4, 1e-4, 1e-4
ROUNDING_FACTOR = 4


def tiny_config(variant):
  config = get_config(variant)
  config.model.update(TINY)
  config.data.image_size = 32
  config.train.batch_size = 2
  return config


def _variant_groups() -> dict[str, list[str]]:
  """Test id -> the VARIANTS rows with that (tiny) model config ('ec_cam_unet=fusion_fuse')."""
  groups = {}
  for name in VARIANTS:
    key = json.dumps(tiny_config(name).model.to_dict(), sort_keys=True)
    groups.setdefault(key, []).append(name)
  return {'='.join(names): names for names in groups.values()}


GROUPS = _variant_groups()


def trained_like(model_config, seed=0) -> dict:
  """Flax variables from a PyTorch-initialised mirror with random BatchNorm scale ~ U(0.5, 1.5),
  bias and running mean ~ U(-0.5, 0.5), running var ~ U(0.5, 1.5), DA-Net gammas 0.5."""
  torch.manual_seed(seed)
  model = build_torch_model(model_config)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 1.5)
    for name, p in model.named_parameters():
      if name.endswith('gamma'):
        p.fill_(0.5)
  return convert.state_dict_to_variables(model, model.state_dict())


def assert_within(diffs, tol, what):
  """Every Difference within `tol` or within ROUNDING_FACTOR x PyTorch's own float32 error."""
  bad = [f'{d.name}: {d.max_rel:.2e} (PyTorch float32 vs float64: {d.rounding:.2e})'
         for d in diffs if d.max_rel > max(tol, ROUNDING_FACTOR * d.rounding)]
  assert not bad, f'{what}, relative error above {tol:g}: ' + '; '.join(bad)


_REPORTS = {}


def variant_report(group: str) -> parity.ParityReport:
  """The parity report of a VARIANTS group (computed once per session)."""
  if group not in _REPORTS:
    config = tiny_config(GROUPS[group][0])
    _REPORTS[group] = parity.run(config, steps=STEPS, variables=trained_like(config.model),
                                 compiler_options=FAST_COMPILE_OPTIONS)
  return _REPORTS[group]


def assert_round_trips(torch_model, variables):
  """JAX -> torch -> JAX and torch -> JAX -> torch are bit-exact, trees and key order kept."""
  state = convert.variables_to_state_dict(torch_model, variables, num_batches_tracked=7)
  assert list(state) == list(torch_model.state_dict())
  back = convert.state_dict_to_variables(torch_model, state)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  torch_model.load_state_dict(state)
  again = convert.variables_to_state_dict(
      torch_model, convert.state_dict_to_variables(torch_model, torch_model.state_dict()), 7)
  for key, value in torch_model.state_dict().items():
    assert torch.equal(again[key], value), key


def test_converted_variables_have_the_flax_tree_and_round_trip_bit_exactly():
  config = tiny_config('ec_cam_unet').model
  model = build_model(config)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
  variables = trained_like(config)  # torch -> JAX
  assert jax.tree.structure(variables) == jax.tree.structure(abstract)
  for v, a in zip(jax.tree.leaves(variables), jax.tree.leaves(abstract)):
    assert (v.shape, v.dtype) == (a.shape, a.dtype)
  assert_round_trips(build_torch_model(config), variables)


def test_flax_initialised_variables_round_trip_bit_exactly():
  config = tiny_config('ec_cam_unet').model
  variables = jax.device_get(init_variables(build_model(config), jax.random.key(3)))
  assert_round_trips(build_torch_model(config), variables)


def test_converter_rejects_mismatched_variables():
  config = tiny_config('unet').model
  torch_model = build_torch_model(config)
  variables = trained_like(config)
  del variables['params']['head']['bias']
  with pytest.raises(ValueError, match='head/bias'):
    convert.variables_to_state_dict(torch_model, variables)
  state = dict(torch_model.state_dict(), extra=torch.zeros(1))
  with pytest.raises(ValueError, match='extra'):
    convert.state_dict_to_variables(torch_model, state)


def test_batch_norm_uses_the_torch_momentum_convention():
  config = tiny_config('ec_cam_unet').model
  config.bn_momentum, config.bn_epsilon = 0.8, 1e-3
  norms = [m for m in build_torch_model(config).modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  assert norms and all(m.momentum == pytest.approx(0.2) and m.eps == 1e-3 for m in norms)


@pytest.mark.parametrize('group', list(GROUPS))
def test_every_variant_round_trips_and_matches_pytorch(group):
  config = tiny_config(GROUPS[group][0])
  torch_model = build_torch_model(config.model)
  assert_round_trips(torch_model, trained_like(config.model))
  report = variant_report(group)
  outputs = ['side_logits', 'logits'] if config.model.dws else ['logits']
  names = [d.name for d in report.forward_eval]
  assert names == [d.name for d in report.forward_train]
  assert sorted(names) == sorted(parity.block_names(torch_model) + outputs)
  assert_within(report.forward_eval, FORWARD_TOL, 'eval forward')
  assert_within(report.forward_train, FORWARD_TOL, 'train forward')
  assert all(d.max_rel <= LOSS_TOL for d in report.loss), report.loss
  assert len(report.gradients) == len(list(torch_model.parameters()))
  assert_within(report.gradients, GRADIENT_TOL, 'gradient')
  assert report.params_overall.max_rel <= PARAMS_TOL, report.params_overall
  assert_within(report.batch_stats, BATCH_STATS_TOL, f'BatchNorm stats after {STEPS} steps')
  assert set(report.num_batches_tracked) <= {STEPS}
  worst = lambda diffs: max(diffs, key=lambda d: d.max_rel)
  print(f'{group}: ' + ', '.join(
      f'{what} {d.max_rel:.1e} (f32 rounding {d.rounding:.1e})' for what, d in (
          ('forward', worst(report.forward_eval + report.forward_train)),
          ('gradient', worst(report.gradients)), ('BN stats', worst(report.batch_stats)),
          ('params', worst(report.params)), ('params as a vector', report.params_overall))))


def test_report_rows_point_at_blocks():
  report = variant_report(next(g for g in GROUPS if g.startswith('ec_cam_unet')))
  names = [d.name for d in report.forward_eval]
  for block in ('encoder/level0', 'encoder/level4', 'bottleneck/coa/cc', 'bottleneck/coa/sc',
                'bottleneck/coa', 'bottleneck/mus', 'bottleneck', 'decoder0/convs', 'side_logits',
                'logits'):
    assert block in names
  text = report.markdown()
  for heading in ('| forward, block output |', '| bottleneck/coa/sc |', '| loss_side |',
                  'f32 rounding',
                  'gradient, per parameter', f'BatchNorm running stats after {STEPS} steps',
                  f'parameters after {STEPS} steps', f'num_batches_tracked after {STEPS} steps: '
                  f'{STEPS}'):
    assert heading in text


@pytest.mark.parametrize('conv_impl', ['xla', 'auto'])
def test_full_width_ec_cam_unet_matches_pytorch(conv_impl):
  config = get_config('ec_cam_unet')
  config.model.conv_impl = conv_impl
  config.data.image_size = 32
  config.train.batch_size = 2
  report = parity.run(config, steps=0, variables=trained_like(config.model),
                      compiler_options=FAST_COMPILE_OPTIONS)
  assert_within(report.forward_eval, FORWARD_TOL, 'eval forward')
  assert_within(report.forward_train, FORWARD_TOL, 'train forward')
  assert all(d.max_rel <= LOSS_TOL for d in report.loss), report.loss
  assert_within(report.gradients, GRADIENT_TOL, 'gradient')


def test_restore_variables_reads_a_training_checkpoint(tmp_path):
  config = tiny_config('unet')
  variables = trained_like(config.model)
  tx = training.make_optimizer(config, 1)
  state = training.TrainState(step=jnp.asarray(5, jnp.int32), params=variables['params'],
                              batch_stats=variables['batch_stats'],
                              opt_state=tx.init(variables['params']))
  manager = checkpoint.checkpoint_manager(tmp_path, keep_latest=1)
  checkpoint.save(manager, 5, state, None)
  manager.wait_until_finished()
  manager.close()
  restored = parity.restore_variables(config, tmp_path, 'latest')
  jax.tree.map(np.testing.assert_array_equal, restored, variables)


def test_command_line_prints_the_report():
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0 '
             '--xla_llvm_disable_expensive_passes=true')
  result = subprocess.run(
      [sys.executable, '-m', 'ecm_jax.parity', '--config', 'configs/kits.py:unet',
       '--config.model.features=(4, 8, 8, 16, 16)', '--config.model.conv_impl=xla',
       '--config.data.image_size=32', '--config.train.batch_size=2', '--steps=2'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '| encoder/level4 |' in result.stdout
  assert 'parameters after 2 steps' in result.stdout


def test_only_torch_ref_and_parity_import_torch():
  allowed = {REPO / 'ecm_jax' / 'parity.py', *(REPO / 'ecm_jax' / 'torch_ref').glob('*.py')}
  offenders = []
  for path in sorted((REPO / 'ecm_jax').rglob('*.py')):
    if path in allowed:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [f'{node.module}.{a.name}' for a in node.names]
      else:
        continue
      if any(n.split('.')[0] == 'torch' or n.startswith(('ecm_jax.torch_ref', 'ecm_jax.parity'))
             for n in names):
        offenders.append(str(path.relative_to(REPO)))
  assert not offenders


def test_float64_needs_a_float64_flax_model():
  # The Flax layers and losses compute in float32 whatever model.dtype says; until the model
  # accepts model.dtype='float64', the report's 'f32 rounding' column plays that part.
  assert 'float64' not in DTYPES
  with pytest.raises(ValueError, match="DTYPES has no 'float64'"):
    parity.run(tiny_config('unet'), steps=0, float64=True)
