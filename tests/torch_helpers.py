"""What the JAX-vs-PyTorch tests share: tolerances and "trained-like" weights. Import only from
tests that have skipped without torch (`pytest.importorskip('torch')`)."""

import torch

from ecm_jax.torch_ref import convert
from ecm_jax.torch_ref.models import build_torch_model

# Relative error bounds (max|JAX - PyTorch| / max|PyTorch|; ecm_jax/torch_ref/parity.py).
FORWARD_TOL, LOSS_TOL, GRADIENT_TOL, PARAMS_TOL, BATCH_STATS_TOL = 1e-5, 1e-5, 1e-4, 1e-4, 1e-4
# A quantity PyTorch float32 itself misses (against float64) by more than tol / ROUNDING_FACTOR
# passes within ROUNDING_FACTOR x that miss (ill-conditioned train-mode BatchNorm at tiny shapes).
ROUNDING_FACTOR = 4


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




def parity_report(config, steps):
  """`parity.run` from `trained_like` weights, PyTorch single-threaded (its thread pool only adds
  overhead at these shapes), JAX compiled with FAST_COMPILE_OPTIONS."""
  from ecm_jax.models.networks import FAST_COMPILE_OPTIONS  # pylint: disable=g-import-not-at-top
  from ecm_jax.torch_ref import parity  # pylint: disable=g-import-not-at-top
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    return parity.run(config, steps=steps, variables=trained_like(config.model),
                      compiler_options=FAST_COMPILE_OPTIONS)
  finally:
    torch.set_num_threads(threads)


def assert_forward_loss_and_gradients(report, blocks, parameter_paths):
  """Every block (in order, then the logits), the loss and every parameter's gradient within the
  tolerances."""
  for forward in (report.forward_eval, report.forward_train):
    assert [d.name for d in forward] == blocks
  assert_within(report.forward_eval, FORWARD_TOL, 'eval forward')
  assert_within(report.forward_train, FORWARD_TOL, 'train forward')
  assert report.loss and all(d.max_rel <= LOSS_TOL for d in report.loss), report.loss
  assert sorted(d.name for d in report.gradients) == sorted('/'.join(p) for p in parameter_paths)
  assert_within(report.gradients, GRADIENT_TOL, 'gradient')


def assert_after_steps(report, steps):
  """Every parameter (as one vector) and BatchNorm statistic after `steps` optimizer steps."""
  assert report.steps == steps and set(report.num_batches_tracked) == {steps}
  assert len(report.params) == len(report.gradients)
  assert report.params_overall.max_rel <= PARAMS_TOL, report.params_overall
  assert_within(report.batch_stats, BATCH_STATS_TOL, f'BatchNorm stats after {steps} steps')
