"""JAX vs PyTorch: the torch mirror (ecm_jax.torch_ref), the converters and the parity report.

Skipped when torch is not installed. Every VARIANTS row at small widths (4..16), 32x32 inputs,
batch 2 (one image per simulated device), from "trained-like" weights (PyTorch init, then random
BatchNorm affine and running statistics and DA-Net gammas, so eval mode and every branch matter):
forward (eval and train, per block), loss and every gradient. The 10 optimizer steps are compared
on the full model, the plain U-Net and each baseline architecture (`STEP_VARIANTS`): the optimizer
is the same code for every parameter tree, and the other rows only add blocks those contain. The
full-width EC-CaM-UNet is checked at 32x32 through the command line, from a training checkpoint,
in float64 on both sides (in float32 its gradients are not determined to 1e-4 by either side: see
that test).

Cost: XLA compile time is nearly all of it (about one gradient program per model), so JAX
programs are compiled with `models.FAST_COMPILE_OPTIONS`, PyTorch runs single-threaded (its thread
pool only adds overhead at these shapes), and the full-width run starts in a subprocess as the
module begins, beside the rest.

Relative error of a quantity: max|JAX - PyTorch| / max|PyTorch| (for gradients against at least
`parity.GRADIENT_FLOOR` x the model's largest gradient entry; see ecm_jax/torch_ref/parity.py). Asserted:
  * loss <= 1e-5; every block output (eval and train) <= 1e-5, every gradient <= 1e-4 and every
    BatchNorm statistic after 10 steps <= 1e-4, each unless PyTorch float32 itself misses the
    float64 value by more than tolerance / ROUNDING_FACTOR (ill-conditioned train-mode BatchNorm
    gradients at these tiny shapes), then within ROUNDING_FACTOR x that miss;
  * all parameters after 10 steps, as one vector, <= 1e-4. Per parameter tensor the difference is
    not bounded by rounding: Adam turns a gradient entry at rounding level into a +-lr update of
    either sign (on either side and in float32 PyTorch alike), a 2 lr difference per step;
  * full width in float64 (both sides): forward, loss, gradients, BatchNorm statistics and
    parameters after 2 steps <= 1e-10.
"""

import ast
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='PyTorch is optional (pip install -r requirements-torch.txt); the '
    'JAX-vs-PyTorch parity tests need it')

from torch_helpers import (  # noqa: E402
  BATCH_STATS_TOL,
  FORWARD_TOL,
  GRADIENT_TOL,
  LOSS_TOL,
  PARAMS_TOL,
  assert_within,
  trained_like,
)

from configs.default import VARIANTS, get_config  # noqa: E402
from ecm_jax.models.fold import fold_ec  # noqa: E402
from ecm_jax.models.networks import (  # noqa: E402
  FAST_COMPILE_OPTIONS,
  OTHER_NAMES,
  build_model,
  init_variables,
)
from ecm_jax.torch_ref import (
  convert,  # noqa: E402
  parity,  # noqa: E402
)
from ecm_jax.torch_ref.models import build_torch_model  # noqa: E402
from ecm_jax.train import (
  checkpoint,  # noqa: E402
  train_state,  # noqa: E402
)
from helpers import REPO  # noqa: E402

# mus_rates: at 32x32 the bottleneck is 2x2, where a 3x3 conv of dilation >= 2 reads only its
# centre tap (the paper's 6, 12, 18 would all be 1x1 convs); dilation 1 keeps one a real 3x3.
TINY = dict(features=(4, 8, 8, 16, 16), mus_channels=4, mus_rates=(1, 2, 3), side_features=(8, 4, 4),
            cc_hidden=2, se_reduction=4, conv_impl='xla')
STEPS = 10
# VARIANTS rows whose groups also compare STEPS optimizer steps: the full model, the plain U-Net and
# each baseline architecture.
STEP_VARIANTS = ('ec_cam_unet', 'unet', 'unet_se', 'unet_cbam', 'attention_unet', 'unet_pp', 'danet')
FLOAT64_STEPS, FLOAT64_TOL = 2, 1e-10


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
    if VARIANTS[name].get('name') in OTHER_NAMES:  # each has its own test module
      continue
    key = json.dumps(tiny_config(name).model.to_dict(), sort_keys=True)
    groups.setdefault(key, []).append(name)
  return {'='.join(names): names for names in groups.values()}


GROUPS = _variant_groups()


def group_steps(group: str) -> int:
  return STEPS if set(GROUPS[group]) & set(STEP_VARIANTS) else 0


@pytest.fixture(autouse=True, scope='module')
def single_threaded_torch():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def save_checkpoint(config, variables, directory, step=0):
  """A training checkpoint (`ecm_jax.train.checkpoint`) of `variables`, Adam state at zero."""
  tx = train_state.make_optimizer(config, 1)
  state = train_state.state_from_variables(variables, tx).replace(
      step=jnp.asarray(step, jnp.int32))
  manager = checkpoint.checkpoint_manager(directory, keep_latest=1)
  checkpoint.save(manager, step, state)
  manager.wait_until_finished()
  manager.close()


def full_width_config():
  config = get_config('ec_cam_unet')
  config.model.conv_impl = 'xla'  # as the other tests; 'gemm' (CPU's 'auto') vs 'xla': test_ops.py
  config.data.image_size = 32
  config.train.batch_size = 2
  return config


FULL_WIDTH_COMMAND = [
    '-m', 'ecm_jax.torch_ref.parity', '--config', 'configs/kits.py', '--config.model.conv_impl=xla',
    '--config.data.image_size=32', '--config.train.batch_size=2', f'--steps={FLOAT64_STEPS}',
    '--float64', '--checkpoint=latest']


@pytest.fixture(autouse=True, scope='module')
def full_width_float64_command(request, tmp_path_factory):
  """Starts `test_full_width_command_line_in_float64`'s run (when that test is selected) as the
  module begins: a subprocess, so that it keeps the second core busy while this process compiles
  the tiny models (XLA compilation here is only partly parallel), and so that jax_enable_x64 stays
  out of this session. Yields {'process', 'stdout', 'stderr'} or None."""
  if not any(item.name == 'test_full_width_command_line_in_float64'
             for item in request.session.items):
    yield None
    return
  directory = tmp_path_factory.mktemp('full_width')
  config = full_width_config()
  save_checkpoint(config, trained_like(config.model), directory / 'run')
  # Compiled as the other tests compile (`FAST_COMPILE_OPTIONS`: backend optimisation level 1;
  # level 0 gives NaN max-pool gradients on this XLA), with conftest's two devices.
  env = dict(os.environ, OMP_NUM_THREADS='1', XLA_FLAGS=' '.join(
      [os.environ.get('XLA_FLAGS', '')] + [f'--{key}={value}'
                                           for key, value in FAST_COMPILE_OPTIONS.items()]))
  run = {'stdout': directory / 'stdout.txt', 'stderr': directory / 'stderr.txt'}
  with open(run['stdout'], 'w') as stdout, open(run['stderr'], 'w') as stderr:
    run['process'] = subprocess.Popen(
        [sys.executable, *FULL_WIDTH_COMMAND, f'--workdir={directory / "run"}'], cwd=REPO,
        env=env, stdout=stdout, stderr=stderr)
  yield run
  if run['process'].poll() is None:
    run['process'].kill()
    run['process'].wait()


_REPORTS = {}


def variant_report(group: str) -> parity.ParityReport:
  """The parity report of a VARIANTS group (computed once per session)."""
  if group not in _REPORTS:
    config = tiny_config(GROUPS[group][0])
    _REPORTS[group] = parity.run(config, steps=group_steps(group),
                                 variables=trained_like(config.model),
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
  # The plain U-Net: its init compiles in half the time of the full model's, whose tree (every kind
  # of layer) the torch-initialised round trip above checks; the command-line test loads a Flax
  # initialised full model into the mirror.
  config = tiny_config('unet').model
  variables = jax.device_get(init_variables(build_model(config), 3))
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


def test_folded_ec_mirror_equals_the_unfolded_one_in_eval_mode():
  config = tiny_config('unet+ec').model
  variables = trained_like(config)
  deploy_config, deploy_variables = fold_ec(config, variables)
  models = [convert.load_variables(build_torch_model(c), v).eval()
            for c, v in ((config, variables), (deploy_config, jax.device_get(deploy_variables)))]
  x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32))
  with torch.no_grad():
    original, folded = (m(x)['logits'] for m in models)
  np.testing.assert_allclose(folded, original, rtol=0, atol=1e-5 * float(original.abs().max()))


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
  worst = lambda diffs: max(diffs, key=lambda d: d.max_rel)
  rows = [('forward', worst(report.forward_eval + report.forward_train)),
          ('gradient', worst(report.gradients))]
  assert report.steps == group_steps(group)
  if report.steps:
    assert report.params_overall.max_rel <= PARAMS_TOL, report.params_overall
    assert_within(report.batch_stats, BATCH_STATS_TOL, f'BatchNorm stats after {STEPS} steps')
    assert set(report.num_batches_tracked) == {STEPS}
    assert len(report.params) == len(report.gradients)
    rows += [('BN stats', worst(report.batch_stats)), ('params', worst(report.params)),
             ('params as a vector', report.params_overall)]
  print(f'{group}: ' + ', '.join(
      f'{what} {d.max_rel:.1e} (PT32 vs PT64 {d.rounding:.1e}, JAX vs PT64 {d.jax_rounding:.1e})'
      for what, d in rows))


def test_report_rows_point_at_blocks():
  report = variant_report(next(g for g in GROUPS if g.startswith('ec_cam_unet')))
  names = [d.name for d in report.forward_eval]
  for block in ('encoder/level0', 'encoder/level4', 'bottleneck/coa/cc', 'bottleneck/coa/sc',
                'bottleneck/coa', 'bottleneck/mus', 'bottleneck', 'decoder0/convs', 'side_logits',
                'logits'):
    assert block in names
  text = report.markdown()
  for heading in ('| forward, block output |', '| bottleneck/coa/sc |', '| loss_side |',
                  'JAX vs PT64',
                  'gradient, per parameter', f'BatchNorm running stats after {STEPS} steps',
                  f'parameters after {STEPS} steps', f'num_batches_tracked after {STEPS} steps: '
                  f'{STEPS}'):
    assert heading in text


def test_restore_variables_reads_a_training_checkpoint(tmp_path):
  config = tiny_config('unet')
  variables = trained_like(config.model)
  save_checkpoint(config, variables, tmp_path, step=5)
  restored = parity.restore_variables(config, tmp_path, 'latest')
  jax.tree.map(np.testing.assert_array_equal, restored, variables)


def report_rows(markdown: str) -> list[tuple[str, str, list[float], list[str]]]:
  """The numeric rows of a printed report: (section: the row itself or, for an indented row, the
  row above it; name; its 'max rel' values, eval and train for a forward row; its 'PT32 vs PT64'
  and 'JAX vs PT64' cells)."""
  rows, section = [], None
  for line in markdown.splitlines():
    cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
    if not line.startswith('| ') or len(cells) not in (5, 9) or 'max abs' in line:
      continue
    name = cells[0].replace('&nbsp;', '')
    section = section if cells[0].startswith('&nbsp;') else name
    groups = [cells[1:5], cells[5:9]] if len(cells) == 9 else [cells[1:5]]
    rows.append((section, name, [float(group[1]) for group in groups],
                 [cell for group in groups for cell in group[2:]]))
  return rows


def test_full_width_command_line_in_float64(full_width_float64_command):
  """The command line on a training checkpoint of the full-width EC-CaM-UNet (widths 64..1024,
  every block, trained-like weights), 32x32, both sides in float64, FLOAT64_STEPS optimizer steps.

  Why float64 at full width: with about 1.5 million activations some ReLU inputs lie within float32
  rounding of 0 (seen: 2.5e-7 of the layer's scale, in decoder2), and whichever side rounds one
  across 0 switches that pixel's gradient on or off: a few per-parameter float32 gradients then
  differ by up to 7%, and all gradients as one vector by ~1e-4, between any two float32
  computations (PyTorch float32 against float64 as well, depending on its thread count). In
  float64 only implementation differences and 1e-16 rounding are left.

  Asserted <= FLOAT64_TOL: every block output, the loss, every gradient, every BatchNorm statistic
  and every parameter after the steps. Not the parameter changes p_K - p_0 per tensor: an entry
  whose gradient is below Adam's eps (1e-8) moves by about lr x g / eps, so its float64 rounding is
  scaled by lr / eps (seen: 7e-8 of the tensor's largest change).
  """
  run = full_width_float64_command
  run['process'].wait(timeout=900)
  stdout, stderr = run['stdout'].read_text(), run['stderr'].read_text()
  assert run['process'].returncode == 0, stderr[-3000:]
  assert ', float64, batch 2 x 32x32' in stdout and 'features (64, 128, 256, 512, 1024)' in stdout
  rows = report_rows(stdout)
  names = [name for _, name, _, _ in rows]
  for prefix in ('encoder/level4', 'bottleneck/coa/cc', 'bottleneck/coa/sc', 'bottleneck/mus',
                 'bottleneck', 'side_logits', 'logits', 'loss', 'loss_side',
                 'gradient, per parameter: max over', 'gradient, all as one vector',
                 f'BatchNorm running stats after {FLOAT64_STEPS} steps: max over',
                 f'parameters after {FLOAT64_STEPS} steps: max over',
                 f'parameters after {FLOAT64_STEPS} steps, all as one vector'):
    assert any(name.startswith(prefix) for name in names), (prefix, names)
  assert f'num_batches_tracked after {FLOAT64_STEPS} steps: {FLOAT64_STEPS}' in stdout
  checked = [(name, values) for section, name, values, _ in rows
             if not section.startswith('parameter change')]
  bad = [(name, values) for name, values in checked if max(values) > FLOAT64_TOL]
  assert not bad, f'float64 relative differences above {FLOAT64_TOL:g}: {bad}'
  # No float32 reference columns in a float64 report.
  assert {cell for *_, reference in rows for cell in reference} == {'-'}
  worst = lambda prefix: max(max(v) for section, _, v, _ in rows if section.startswith(prefix))
  print(', '.join(f'{prefix} {worst(prefix):.1e}' for prefix in (
      'encoder', 'bottleneck', 'logits', 'loss', 'gradient', 'BatchNorm', 'parameters after',
      'parameter change')))


def test_only_torch_ref_and_parity_import_torch():
  allowed = set((REPO / 'ecm_jax' / 'torch_ref').glob('*.py'))
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
      if any(n.split('.')[0] == 'torch' or n.startswith('ecm_jax.torch_ref')
             for n in names):
        offenders.append(str(path.relative_to(REPO)))
  assert not offenders
