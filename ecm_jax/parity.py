"""JAX-vs-PyTorch numerics report: the Flax model and its torch mirror on one set of weights.

  python -m ecm_jax.parity --config configs/kits.py --config.data.image_size=64 \
      --config.train.batch_size=2 [--config.model.x=...] [--steps 10] [--float64] \
      [--workdir runs/kits [--checkpoint best]]

Initialises the variables of `build_model(config.model)` from `config.seed` (or restores them from a
training run's checkpoint with --workdir), copies them into `torch_ref.build_torch_model(config.model)`
(`torch_ref.convert`, bit-exact), feeds both the same synthetic batches (`config.train.batch_size`
images of `config.data.image_size`, normal noise, labels thresholded from it; derived from
`config.seed`) and prints markdown tables of max absolute and max relative differences of:
  * the forward pass in eval and in train mode, per block output (flax `capture_intermediates`,
    torch forward hooks; rows named by the Flax module path, e.g. `encoder/level2`,
    `bottleneck/coa/sc`, `decoder1/convs`), and the logits;
  * the hybrid loss and its terms, and every parameter's gradient (max over all, worst five);
  * after K optimizer steps (Adam + L2 weight decay + per-step cosine, `training.train_step` vs
    `torch_ref.training.train_step`) on K identical batches: BatchNorm running statistics, every
    parameter, and the change of every parameter over the K steps.
The relative difference of a quantity is max|a - b| / max|b|, a the JAX value and b the PyTorch one
(0 when both are all zero). The JAX side runs the product code: `training.loss_and_gradients` and
`training.jit_train_step` on the data-parallel mesh over every device, `training.create_train_state`.
--float64 runs both sides in float64 (jax_enable_x64, model.dtype float64) to tell implementation
differences from float32 rounding.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from ecm_jax import checkpoint
from ecm_jax import training
from ecm_jax.models import build_model
from ecm_jax.torch_ref import convert
from ecm_jax.torch_ref import losses as torch_losses
from ecm_jax.torch_ref import models as torch_models
from ecm_jax.torch_ref import training as torch_training

# Torch mirror classes whose outputs are the report's per-block rows (encoder levels, decoder
# stages and U-Net++ nodes are DoubleConv; CoAGMuSFu is the fused bottleneck output F_out).
BLOCK_TYPES = (
    torch_models.DoubleConv, torch_models.CoAGMuSFu, torch_models.CollaborativeAttention,
    torch_models.ChannelCorrelation, torch_models.SpatialCorrelation, torch_models.MultiScale,
    torch_models.SqueezeExcitation, torch_models.CBAM, torch_models.AttentionGate,
    torch_models.DualAttention, torch_models.PositionAttention, torch_models.ChannelAttention,
)
WORST = 5  # per-parameter sections list this many worst entries
# A gradient's relative difference is taken against max(its max|b|, GRADIENT_FLOOR x the largest
# gradient entry of the model): a gradient that is zero up to rounding (e.g. PAM's key bias, which
# the softmax is invariant to) is measured against the model's gradient scale, not its own noise.
GRADIENT_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class Difference:
  """max|a - b| and max|a - b| / max|b| of one quantity (a JAX, b PyTorch)."""
  name: str
  max_abs: float
  max_rel: float


def difference(name: str, a, b, floor: float = 0.0) -> Difference:
  """The Difference of arrays `a` (JAX) and `b` (PyTorch) of the same shape, in float64; the
  relative one is max|a - b| / max(max|b|, floor)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'{name}: JAX shape {a.shape} != PyTorch shape {b.shape}')
  max_abs = float(np.max(np.abs(a - b), initial=0.0))
  scale = max(float(np.max(np.abs(b), initial=0.0)), floor)
  if scale == 0.0:
    return Difference(name, max_abs, 0.0 if max_abs == 0.0 else float('inf'))
  return Difference(name, max_abs, max_abs / scale)


def tree_differences(a: Mapping, b: Mapping, relative_floor: float = 0.0) -> list[Difference]:
  """Per-leaf Differences of two nested dicts of the same structure, named by '/'-joined path.

  relative_floor: each leaf's relative difference is taken against at least this fraction of the
  largest |b| over all leaves (0: against the leaf's own max|b|).
  """
  flat_a = flax.traverse_util.flatten_dict(flax.core.unfreeze(a))
  flat_b = flax.traverse_util.flatten_dict(flax.core.unfreeze(b))
  if set(flat_a) != set(flat_b):
    raise ValueError(f'trees differ: only JAX {sorted(set(flat_a) - set(flat_b))}, only PyTorch '
                     f'{sorted(set(flat_b) - set(flat_a))}')
  floor = relative_floor * max((float(np.max(np.abs(v), initial=0.0)) for v in flat_b.values()),
                               default=0.0)
  return [difference('/'.join(path), flat_a[path], flat_b[path], floor) for path in sorted(flat_a)]


@dataclasses.dataclass
class ParityReport:
  """Every comparison of one run; `markdown()` is the printed report."""
  description: str
  forward_eval: list[Difference]  # per block, in execution order, then the outputs
  forward_train: list[Difference]
  loss: list[Difference]  # 'loss' and its terms
  gradients: list[Difference]  # per parameter
  steps: int
  batch_stats: list[Difference]  # per BatchNorm statistic after `steps` steps
  params: list[Difference]  # per parameter after `steps` steps
  param_changes: list[Difference]  # per parameter, p_K - p_0
  num_batches_tracked: list[int]  # of every torch BatchNorm after `steps` steps

  def markdown(self) -> str:
    lines = [self.description, '',
             'Relative difference: max|JAX - PyTorch| / max|PyTorch| per quantity.', '',
             '| forward, block output | eval: max abs | eval: max rel | train: max abs | '
             'train: max rel |', '|---|---:|---:|---:|---:|']
    for ev, tr in zip(self.forward_eval, self.forward_train):
      lines.append(f'| {ev.name} | {ev.max_abs:.2e} | {ev.max_rel:.2e} | {tr.max_abs:.2e} | '
                   f'{tr.max_rel:.2e} |')
    lines += ['', '| quantity | max abs | max rel |', '|---|---:|---:|']
    row = lambda label, d: lines.append(f'| {label} | {d.max_abs:.2e} | {d.max_rel:.2e} |')
    for d in self.loss:
      row(d.name, d)

    def section(title: str, diffs: Sequence[Difference]) -> None:
      if not diffs:
        return
      row(f'{title}: max over {len(diffs)}', _max_difference(diffs))
      for d in sorted(diffs, key=lambda d: d.max_rel, reverse=True)[:WORST]:
        row(f'&nbsp;&nbsp;{d.name}', d)

    section(f'gradient, per parameter (relative to max(max|b|, {GRADIENT_FLOOR:g} x largest '
            f'gradient))', self.gradients)
    if self.steps:
      section(f'BatchNorm running stats after {self.steps} steps', self.batch_stats)
      section(f'parameters after {self.steps} steps', self.params)
      section(f'parameter change p_{self.steps} - p_0', self.param_changes)
      counts = sorted(set(self.num_batches_tracked))
      lines += ['', f'torch BatchNorm num_batches_tracked after {self.steps} steps: '
                    f'{", ".join(map(str, counts)) or "(no BatchNorm)"}']
    return '\n'.join(lines)


def _max_difference(diffs: Sequence[Difference]) -> Difference:
  return Difference('max', max(d.max_abs for d in diffs), max(d.max_rel for d in diffs))


# --- inputs and weights --------------------------------------------------------------------------

def make_batches(config: ml_collections.ConfigDict, count: int, dtype=np.float32) -> list[dict]:
  """`count` batches {'image' (B,H,W,C), 'label' (B,H,W) int32} of normal noise (seed
  `config.seed`), labels the noise of channel 0 thresholded into `num_classes` classes."""
  rng = np.random.default_rng(config.seed)
  b, size, k = config.train.batch_size, config.data.image_size, config.model.num_classes
  batches = []
  for _ in range(count):
    image = rng.normal(size=(b, size, size, config.model.in_channels)).astype(dtype)
    label = np.digitize(image[..., 0], np.linspace(0.5, 1.5, max(k - 1, 1))).astype(np.int32)
    batches.append({'image': image, 'label': label})
  return batches


def init_variables(config: ml_collections.ConfigDict) -> dict:
  """{'params', 'batch_stats'} as a training run from `config.seed` starts (`create_train_state`).

  Initial values do not depend on `conv_impl`; the init is compiled with 'xla', the fastest to
  compile.
  """
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  model_config.conv_impl = 'xla'
  state = training.create_train_state(build_model(model_config), training.make_optimizer(config, 1),
                                      config.seed, _image_shape(config))
  return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})


def restore_variables(config: ml_collections.ConfigDict, workdir: str, which: str = 'best') -> dict:
  """{'params', 'batch_stats'} of a training run's checkpoint (`which`: best | latest | a step)."""
  model, tx = build_model(config.model), training.make_optimizer(config, 1)
  abstract = jax.eval_shape(
      lambda: training.create_train_state(model, tx, config.seed, _image_shape(config)))
  manager = checkpoint.checkpoint_manager(workdir, keep_latest=1, read_only=True)
  try:
    state = checkpoint.restore(manager, checkpoint.resolve_step(manager, which), abstract)
  finally:
    manager.close()
  return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})


def _image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.model.in_channels)


def _to_torch_batch(batch: dict) -> dict:
  return {'image': torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2))),
          'label': torch.from_numpy(batch['label']).long()}


def _nhwc(t: torch.Tensor) -> np.ndarray:
  """A torch output in the JAX layout: 4D NCHW -> NHWC, other ranks as they are."""
  array = t.detach().cpu().numpy()
  return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


# --- the comparisons -----------------------------------------------------------------------------

def block_names(torch_model: torch.nn.Module) -> list[str]:
  """Module paths ('/'-joined, as Flax's) of the blocks whose outputs the report compares."""
  return [name.replace('.', '/') for name, module in torch_model.named_modules()
          if isinstance(module, BLOCK_TYPES)]


def _torch_pass(torch_model, batch: dict, names: Sequence[str], train: bool, loss_config):
  """(block outputs by name in execution order, model outputs, loss terms, gradients); eval mode
  (no loss, no gradients: None) or train mode (loss and backward)."""
  captured = {}
  wanted = set(names)
  record = lambda name: lambda module, args, out: captured.__setitem__(name, _nhwc(out))
  hooks = [module.register_forward_hook(record(name.replace('.', '/')))
           for name, module in torch_model.named_modules() if name.replace('.', '/') in wanted]
  torch_model.train(train)
  try:
    if not train:
      with torch.no_grad():
        return captured, torch_model(batch['image']), None, None
    torch_model.zero_grad()
    outputs = torch_model(batch['image'])
    loss, terms = torch_losses.segmentation_loss(outputs, batch['label'], loss_config)
    loss.backward()
    grads = convert.parameters_to_jax(
        torch_model, {name: p.grad for name, p in torch_model.named_parameters()})
    terms = {'loss': loss.item(), **{k: v.item() for k, v in terms.items()}}
    return captured, outputs, terms, grads
  finally:
    for hook in hooks:
      hook.remove()


class _JaxSide:
  """The JAX functions the report runs, compiled with `compiler_options` (None: as training)."""

  def __init__(self, config, model, tx, mesh, compiler_options):
    self.model, self.tx, self.options = model, tx, compiler_options
    replicated = NamedSharding(mesh, P())
    # The product's gradient function, jitted as `training.jit_train_step` places its arguments.
    self.gradients = jax.jit(
        functools.partial(training.loss_and_gradients, model=model, loss_config=config.loss),
        in_shardings=(replicated, NamedSharding(mesh, P('data'))), out_shardings=replicated)
    self.apply_gradients = jax.jit(self._apply_gradients, in_shardings=replicated,
                                   out_shardings=replicated)
    self.compiled = {}

  def run(self, name: str, fn, *args):
    """fn(*args), compiled once per name."""
    if name not in self.compiled:
      self.compiled[name] = fn.lower(*args).compile(compiler_options=self.options)
    return self.compiled[name](*args)

  def _apply_gradients(self, state: training.TrainState, grads, batch_stats) -> training.TrainState:
    """The second half of `training.train_step`: the optimizer update."""
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    return training.TrainState(step=state.step + 1,
                               params=optax.apply_updates(state.params, updates),
                               batch_stats=batch_stats, opt_state=opt_state)

  def forward(self, variables: dict, image: np.ndarray, names: Sequence[str], train: bool):
    """(block outputs by name, model outputs) of `model.apply` with `capture_intermediates`."""
    wanted = set(names)
    capture = lambda module, method: method == '__call__' and '/'.join(module.path) in wanted
    mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
    apply = jax.jit(lambda v, x: self.model.apply(v, x, train=train, mutable=mutable,
                                                  capture_intermediates=capture))
    outputs, state = jax.device_get(self.run(f'forward_{train}', apply, variables, image))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state['intermediates']))
    captured = {'/'.join(path[:-1]): value[0] for path, value in flat.items()
                if path[-1] == '__call__'}
    return captured, outputs


def _forward_differences(jax_blocks, jax_outputs, torch_blocks, torch_outputs) -> list[Difference]:
  diffs = [difference(name, jax_blocks[name], torch_blocks[name]) for name in torch_blocks]
  for key in sorted(torch_outputs, reverse=True):  # side_logits before logits
    diffs.append(difference(key, jax_outputs[key], _nhwc(torch_outputs[key])))
  return diffs


def run(config: ml_collections.ConfigDict, *, steps: int, variables: Mapping | None = None,
        float64: bool = False, compiler_options: Mapping | None = None) -> ParityReport:
  """Every comparison of the module docstring for `config` (model, loss, train, seed, data size).

  steps: K, optimizer steps compared (0: forward, loss and gradients only).
  variables: {'params', 'batch_stats'} to start from (default: initialised from `config.seed`).
  float64: both sides in float64; needs `jax.config.update('jax_enable_x64', True)` beforehand.
  compiler_options: XLA options for the JAX compilations (None: the defaults training uses; the
    tests pass `models.FAST_COMPILE_OPTIONS`).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  dtype = np.float64 if float64 else np.float32
  if float64:
    if not jax.config.jax_enable_x64:
      raise ValueError('float64 needs jax_enable_x64 set before any JAX computation')
    config.model.dtype = 'float64'
  model = build_model(config.model)
  torch_model = torch_models.build_torch_model(config.model).to(
      torch.float64 if float64 else torch.float32)
  mesh = training.make_mesh()
  training.check_batch_divisible(config.train.batch_size, mesh)
  if variables is None:
    variables = init_variables(config)
  variables = jax.tree.map(lambda v: np.asarray(v, dtype), dict(variables))
  batches = make_batches(config, max(steps, 1), dtype)
  torch_batches = [_to_torch_batch(batch) for batch in batches]
  tx = training.make_optimizer(config, max(steps, 1))
  jax_side = _JaxSide(config, model, tx, mesh, compiler_options)
  names = block_names(torch_model)

  # Forward per block in eval, then train mode; the train pass also gives loss and gradients.
  convert.load_variables(torch_model, variables)
  forward = {}
  for train in (False, True):
    torch_blocks, torch_outputs, torch_terms, torch_grads = _torch_pass(
        torch_model, torch_batches[0], names, train, config.loss)
    jax_blocks, jax_outputs = jax_side.forward(variables, batches[0]['image'], names, train)
    forward[train] = _forward_differences(jax_blocks, jax_outputs, torch_blocks, torch_outputs)

  state = training.replicate(training.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(variables['params'])), mesh)
  loss, terms, grads, _ = jax.device_get(jax_side.run(
      'gradients', jax_side.gradients, state, training.shard_batch(batches[0], mesh)))
  jax_terms = {'loss': loss, **terms}
  report = ParityReport(
      description=_describe(config, steps, float64), forward_eval=forward[False],
      forward_train=forward[True],
      loss=[difference(key, jax_terms[key], torch_terms[key]) for key in torch_terms],
      gradients=tree_differences(grads, torch_grads, GRADIENT_FLOOR), steps=steps,
      batch_stats=[], params=[], param_changes=[], num_batches_tracked=[])
  if steps:
    _compare_training(report, config, jax_side, state, torch_model, variables, batches,
                      torch_batches, mesh)
  return report


def _compare_training(report: ParityReport, config, jax_side: _JaxSide, state, torch_model,
                      variables, batches, torch_batches, mesh) -> None:
  """K optimizer steps on both sides from `state` / `variables`; fills the after-K sections.

  The JAX step is `training.train_step` in two compiled halves, `training.loss_and_gradients`
  (compiled once, for the gradient comparison as well) and the update of
  `training.make_optimizer`: the same functions, one compilation of the network fewer.
  """
  steps = report.steps
  convert.load_variables(torch_model, variables)
  optimizer, scheduler = torch_training.make_optimizer(torch_model, config, steps)
  for batch, torch_batch in zip(batches, torch_batches):
    _, _, grads, batch_stats = jax_side.run('gradients', jax_side.gradients, state,
                                            training.shard_batch(batch, mesh))
    state = jax_side.run('apply_gradients', jax_side.apply_gradients, state, grads, batch_stats)
    torch_training.train_step(torch_model, optimizer, scheduler, torch_batch, config.loss)
  jax_after = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  torch_after = convert.state_dict_to_variables(torch_model, torch_model.state_dict())
  report.batch_stats = tree_differences(jax_after.get('batch_stats', {}),
                                        torch_after.get('batch_stats', {}))
  report.params = tree_differences(jax_after['params'], torch_after['params'])
  change = lambda after: jax.tree.map(lambda p, p0: np.asarray(p, np.float64) - p0,
                                      after['params'], variables['params'])
  report.param_changes = tree_differences(change(jax_after), change(torch_after))
  report.num_batches_tracked = [int(module.num_batches_tracked) for module in torch_model.modules()
                                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]


def _describe(config: ml_collections.ConfigDict, steps: int, float64: bool) -> str:
  m = config.model
  return (f'JAX {jax.__version__} / flax {flax.__version__} vs PyTorch {torch.__version__}: '
          f'{m.name} (variant {config.get("variant", "-")}), features {tuple(m.features)}, '
          f'conv_impl {m.conv_impl}, {"float64" if float64 else "float32"}, batch '
          f'{config.train.batch_size} x {config.data.image_size}x{config.data.image_size}, '
          f'{steps} optimizer steps (lr {config.train.learning_rate:g}, weight decay '
          f'{config.train.weight_decay:g}), {jax.device_count()} JAX device(s).')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/kits.py')
  _STEPS = flags.DEFINE_integer('steps', 10, 'optimizer steps K compared on identical batches')
  _FLOAT64 = flags.DEFINE_bool('float64', False, 'run both sides in float64')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'restore the weights of this training run')
  _CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', 'with --workdir: best | latest | a step')
  flags.mark_flag_as_required('config')

  def main(argv):
    del argv
    if _FLOAT64.value:
      jax.config.update('jax_enable_x64', True)
    config = _CONFIG.value
    variables = None
    if _WORKDIR.value:
      variables = restore_variables(config, _WORKDIR.value, _CHECKPOINT.value)
    print(run(config, steps=_STEPS.value, variables=variables, float64=_FLOAT64.value).markdown())

  app.run(main)
