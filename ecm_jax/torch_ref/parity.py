"""JAX-vs-PyTorch numerics report: the Flax model and its torch mirror on one set of weights.

  python -m ecm_jax.torch_ref.parity --config configs/kits.py --config.data.image_size=64 \
      --config.train.batch_size=2 [--config.model.x=...] [--steps 10] [--float64] \
      [--workdir runs/kits [--checkpoint best]]

Initialises the variables of `build_model(config.model)` as training does from `config.seed` (or
restores a training run's checkpoint with --workdir), copies them into
`torch_ref.build_torch_model(config.model)` (`torch_ref.convert`, bit-exact), feeds both the same
synthetic batches (`config.train.batch_size` images of `config.data.image_size`: normal noise,
labels thresholded from it, drawn from `config.seed`) and prints markdown tables of the max absolute
and max relative differences of:
  * the forward pass in eval and in train mode, per block output (flax `capture_intermediates`,
    torch forward hooks; rows named by Flax module path, e.g. `encoder/level2`, `bottleneck/coa/sc`,
    `decoder1/convs`), then the logits;
  * the hybrid loss and its terms, and every parameter's gradient (max over all, worst five, and
    all gradients as one vector);
  * after K optimizer steps (Adam + L2 weight decay + per-step cosine) on K identical batches:
    BatchNorm running statistics, every parameter, and every parameter's change p_K - p_0.

Relative difference of a quantity: max|JAX - PyTorch| / max|PyTorch|; for gradients the
denominator is at least `GRADIENT_FLOOR` x the model's largest gradient entry, for BatchNorm
statistics `STATISTICS_FLOOR` x the largest statistic. The columns
"PT32 vs PT64" and "JAX vs PT64" are the same measure of PyTorch float32 and of JAX float32
against PyTorch float64 on the same weights and batches: how far float32 itself is from the exact
value of that quantity on each side. A JAX-vs-PyTorch difference of that order is rounding; one
far above it is an implementation difference. --float64 runs both sides in float64 instead
(jax_enable_x64 and `model.dtype='float64'`: params, activations, statistics, loss and optimizer
state all float64): differences are then implementation differences, plus float64 rounding.

The JAX side is the product code: `train_state.create_train_state` for the initial weights,
`step.loss_and_gradients` jitted with the shardings `sharding.jit_train_step` uses, on the
data-parallel mesh over every device, and `train_state.make_optimizer` for the steps.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools

import flax
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import torch

from ecm_jax import tables
from ecm_jax.data.synthetic import noise_batches
from ecm_jax.models import networks
from ecm_jax.models.networks import build_model
from ecm_jax.torch_ref import cenet as torch_cenet
from ecm_jax.torch_ref import convert
from ecm_jax.torch_ref import hrnet as torch_hrnet
from ecm_jax.torch_ref import losses as torch_losses
from ecm_jax.torch_ref import models as torch_models
from ecm_jax.torch_ref import msunet as torch_msunet
from ecm_jax.torch_ref import segformer as torch_segformer
from ecm_jax.torch_ref import training as torch_training
from ecm_jax.train import checkpoint, sharding, step, train_state

# Torch mirror classes whose outputs are the report's per-block rows (encoder levels, decoder
# stages and U-Net++ nodes are DoubleConv; CoAGMuSFu is the fused bottleneck output F_out; each
# Table I network of its own design names its own).
BLOCK_TYPES = (
    torch_models.DoubleConv, torch_models.CoAGMuSFu, torch_models.CollaborativeAttention,
    torch_models.ChannelCorrelation, torch_models.SpatialCorrelation, torch_models.MultiScale,
    torch_models.SqueezeExcitation, torch_models.CBAM, torch_models.AttentionGate,
    torch_models.DualAttention, torch_models.PositionAttention, torch_models.ChannelAttention,
    *torch_cenet.BLOCK_TYPES, *torch_msunet.BLOCK_TYPES, *torch_hrnet.BLOCK_TYPES,
    *torch_segformer.BLOCK_TYPES,
)
WORST = 5  # per-parameter sections list this many worst entries
# A gradient's relative difference is taken against max(its max|b|, GRADIENT_FLOOR x the largest
# gradient entry of the model): a gradient that is zero up to rounding (e.g. PAM's key bias, which
# the softmax is invariant to) is measured against the model's gradient scale, not its own noise.
GRADIENT_FLOOR = 1e-3
# Likewise a BatchNorm statistic after K steps against at least STATISTICS_FLOOR x the largest
# statistic: a running mean near zero (e.g. 2.4e-3 in a 1-channel attention-gate BN, where the
# statistics are O(1)) is measured against the statistics' scale, not its own size.
STATISTICS_FLOOR = 1e-2


@dataclasses.dataclass(frozen=True)
class Difference:
  """One quantity: max|JAX - PyTorch| and the relative difference; with a PyTorch float64
  reference, the same relative measure of PyTorch float32 (`rounding`) and of JAX float32
  (`jax_rounding`) against it (None without one)."""
  name: str
  max_abs: float
  max_rel: float
  rounding: float | None = None
  jax_rounding: float | None = None


def _relative(a: np.ndarray, b: np.ndarray, floor: float) -> tuple[float, float]:
  max_abs = float(np.max(np.abs(a - b), initial=0.0))
  scale = max(float(np.max(np.abs(b), initial=0.0)), floor)
  if scale == 0.0:
    return max_abs, 0.0 if max_abs == 0.0 else float('inf')
  return max_abs, max_abs / scale


def compare(name: str, jax_value, torch_value, reference=None, floor: float = 0.0) -> Difference:
  """The Difference of one quantity (arrays of one shape; compared in float64). `reference`: the
  PyTorch float64 value; relative differences use max(max|PyTorch|, floor) as denominator."""
  a, b = np.asarray(jax_value, np.float64), np.asarray(torch_value, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'{name}: JAX shape {a.shape} != PyTorch shape {b.shape}')
  max_abs, max_rel = _relative(a, b, floor)
  if reference is None:
    return Difference(name, max_abs, max_rel)
  reference = np.asarray(reference, np.float64)
  return Difference(name, max_abs, max_rel, _relative(b, reference, floor)[1],
                    _relative(a, reference, floor)[1])


def compare_trees(jax_tree: Mapping, torch_tree: Mapping, reference_tree: Mapping | None = None,
                  relative_floor: float = 0.0) -> list[Difference]:
  """Per-leaf Differences of nested dicts of one structure, named by '/'-joined path.

  relative_floor: each leaf's relative difference is taken against at least this fraction of the
  largest |PyTorch| entry over all leaves.
  """
  flat = [flax.traverse_util.flatten_dict(flax.core.unfreeze(t)) if t is not None else None
          for t in (jax_tree, torch_tree, reference_tree)]
  if set(flat[0]) != set(flat[1]):
    raise ValueError(f'trees differ: only JAX {sorted(set(flat[0]) - set(flat[1]))}, only '
                     f'PyTorch {sorted(set(flat[1]) - set(flat[0]))}')
  floor = relative_floor * max((float(np.max(np.abs(v), initial=0.0)) for v in flat[1].values()),
                               default=0.0)
  return [compare('/'.join(path), flat[0][path], flat[1][path],
                  None if flat[2] is None else flat[2][path], floor) for path in sorted(flat[0])]


@dataclasses.dataclass
class ParityReport:
  """Every comparison of one run; `markdown()` is the printed report."""
  description: str
  forward_eval: list[Difference]  # per block in execution order, then the outputs
  forward_train: list[Difference]
  loss: list[Difference]  # 'loss' and its terms
  gradients: list[Difference]  # per parameter
  steps: int
  batch_stats: list[Difference]  # per BatchNorm statistic after `steps` steps
  params: list[Difference]  # per parameter after `steps` steps
  params_overall: Difference | None  # every parameter after `steps` steps, as one vector
  param_changes: list[Difference]  # per parameter, p_K - p_0
  num_batches_tracked: list[int]  # of every torch BatchNorm after `steps` steps
  # Every gradient as one vector (relative to the largest gradient entry): far less sensitive than
  # the per-parameter rows to a ReLU input within rounding of 0 switching a pixel's gradient on or
  # off, which can move a small parameter's gradient by percent.
  gradients_overall: Difference | None = None

  def markdown(self) -> str:
    optional = lambda value: '-' if value is None else f'{value:.2e}'
    cell = lambda d: (f'{d.max_abs:.2e}', f'{d.max_rel:.2e}', optional(d.rounding),
                      optional(d.jax_rounding))
    columns = ('max abs', 'max rel', 'PT32 vs PT64', 'JAX vs PT64')
    references = ('the relative measure of PyTorch float32 and of JAX float32 against PyTorch '
                  'float64 on the same weights and batches (float32 rounding of each).'
                  if self.loss[0].rounding is not None else
                  'not computed: both sides ran in float64.')
    lines = [self.description, '',
             'max abs: max|JAX - PyTorch|; max rel: that / max|PyTorch| (gradients: denominator at '
             f'least {GRADIENT_FLOOR:g} x the largest gradient entry, BatchNorm statistics '
             f'{STATISTICS_FLOOR:g} x the largest statistic). PT32 vs PT64, JAX vs PT64: '
             + references, '',
             tables.markdown_table(
                 ['forward, block output',
                  *(f'{mode}: {c}' for mode in ('eval', 'train') for c in columns)],
                 [(ev.name, *cell(ev), *cell(tr))
                  for ev, tr in zip(self.forward_eval, self.forward_train)], 'l' + 'r' * 8), '']
    rows = [(d.name, *cell(d)) for d in self.loss]

    def section(title: str, diffs: Sequence[Difference]) -> None:
      if not diffs:
        return
      rows.append((f'{title}: max over {len(diffs)}', *cell(_max_difference(diffs))))
      for d in sorted(diffs, key=lambda d: d.max_rel, reverse=True)[:WORST]:
        rows.append((f'&nbsp;&nbsp;{d.name}', *cell(d)))

    section('gradient, per parameter', self.gradients)
    if self.gradients_overall is not None:
      rows.append(('gradient, all as one vector', *cell(self.gradients_overall)))
    if self.steps:
      section(f'BatchNorm running stats after {self.steps} steps', self.batch_stats)
      section(f'parameters after {self.steps} steps', self.params)
      rows.append((f'parameters after {self.steps} steps, all as one vector',
                   *cell(self.params_overall)))
      section(f'parameter change p_{self.steps} - p_0', self.param_changes)
    lines.append(tables.markdown_table(('quantity', *columns), rows, 'lrrrr'))
    if self.steps:
      counts = sorted(set(self.num_batches_tracked))
      lines += ['', f'PyTorch BatchNorm num_batches_tracked after {self.steps} steps: '
                    f'{", ".join(map(str, counts)) or "(no BatchNorm)"}']
    return '\n'.join(lines)


def _max_difference(diffs: Sequence[Difference]) -> Difference:
  largest = lambda values: max(values) if None not in values else None
  return Difference('max', max(d.max_abs for d in diffs), max(d.max_rel for d in diffs),
                    largest([d.rounding for d in diffs]), largest([d.jax_rounding for d in diffs]))


# --- inputs and weights ---------------------------------------------------------------------------

def init_variables(config: ml_collections.ConfigDict) -> dict:
  """{'params', 'batch_stats'} as a training run from `config.seed` starts (`init_variables`)."""
  return jax.device_get(networks.init_variables(build_model(config.model), config.seed))


def restore_variables(config: ml_collections.ConfigDict, workdir, which: str = 'best') -> dict:
  """{'params', 'batch_stats'} of a training run's checkpoint (`which`: best | latest | a step)."""
  return jax.device_get(checkpoint.restore_variables(workdir, config, which)[1])


def _cast(tree, dtype):
  return jax.tree.map(lambda v: np.asarray(v, dtype), tree)


# --- one side's results ---------------------------------------------------------------------------

@dataclasses.dataclass
class SideResults:
  """What one implementation computes, in JAX layouts: per train flag (False: eval) the block
  outputs by name and the model outputs; the train-mode loss terms and gradients on the first
  batch; {'params', 'batch_stats'} after the K steps (None for K = 0)."""
  blocks: dict[bool, dict[str, np.ndarray]]
  outputs: dict[bool, dict[str, np.ndarray]]
  loss: dict[str, float]
  gradients: dict
  after: dict | None
  num_batches_tracked: list[int] = dataclasses.field(default_factory=list)


def block_names(torch_model: torch.nn.Module) -> list[str]:
  """Module paths ('/'-joined, as Flax's) of the blocks whose outputs the report compares."""
  return [name.replace('.', '/') for name, module in torch_model.named_modules()
          if isinstance(module, BLOCK_TYPES)]


def _nhwc(t: torch.Tensor) -> np.ndarray:
  """A torch output in the JAX layout: 4D NCHW -> NHWC, other ranks as they are."""
  array = t.detach().cpu().numpy()
  return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def run_torch(config: ml_collections.ConfigDict, variables: Mapping, batches: Sequence[dict],
              steps: int, dtype: torch.dtype = torch.float32) -> SideResults:
  """The PyTorch mirror in `dtype` from `variables` on `batches` (JAX layout)."""
  model = torch_models.build_torch_model(config.model).to(dtype)
  variables = _cast(variables, np.float64 if dtype == torch.float64 else np.float32)
  # A copy, not a view: a 1-channel transpose keeps a stride on its size-1 channel axis that makes
  # torch run every layer channels-last, where torch 2.13 CPU's oneDNN backward of a strided 1x1
  # conv corrupts the heap (seen in CE-Net's encoder).
  torch_batches = [
      {'image': torch.from_numpy(b['image'].transpose(0, 3, 1, 2).copy()).to(dtype),
       'label': torch.from_numpy(b['label']).long()} for b in batches]
  wanted = set(block_names(model))
  captured = {}
  record = lambda name: lambda module, args, out: captured.__setitem__(name, _nhwc(out))
  hooks = [module.register_forward_hook(record(name.replace('.', '/')))
           for name, module in model.named_modules() if name.replace('.', '/') in wanted]
  convert.load_variables(model, variables)
  blocks, outputs = {}, {}
  model.eval()
  with torch.no_grad():
    outputs[False] = {k: _nhwc(v) for k, v in model(torch_batches[0]['image']).items()}
  blocks[False] = dict(captured)
  captured.clear()
  model.train()
  result = model(torch_batches[0]['image'])
  loss, terms = torch_losses.segmentation_loss(result, torch_batches[0]['label'], config.loss)
  loss.backward()
  outputs[True] = {k: _nhwc(v) for k, v in result.items()}
  blocks[True] = dict(captured)
  for hook in hooks:
    hook.remove()
  gradients = convert.parameters_to_jax(
      model, {name: p.grad for name, p in model.named_parameters()})
  results = SideResults(blocks, outputs, {'loss': loss.item(), **{k: v.item() for k, v in
                                                                   terms.items()}},
                        gradients, None)
  if steps:
    convert.load_variables(model, variables)
    optimizer, scheduler = torch_training.make_optimizer(model, config, steps)
    for batch in torch_batches:
      torch_training.train_step(model, optimizer, scheduler, batch, config.loss)
    results.after = convert.state_dict_to_variables(model, model.state_dict())
    results.num_batches_tracked = [
        int(m.num_batches_tracked) for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  return results


def _captured_blocks(intermediates) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  return {'/'.join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == '__call__'}


def run_jax(config: ml_collections.ConfigDict, variables: Mapping, batches: Sequence[dict],
            steps: int, names: Sequence[str],
            compiler_options: Mapping | None = None) -> SideResults:
  """The Flax model from `variables` on `batches`, capturing the outputs of modules `names`.

  Everything is the product's code, placed as training places it (state replicated, batch sharded
  over the mesh of every device, as `sharding.jit_train_step`): one jitted program runs the forward
  pass in eval and in train mode with the block outputs captured, `step.loss_and_gradients`, and
  `step.train_step` itself (the run's optimizer and schedule) for the next state; K calls on K
  batches are the K steps (K = 0: one call, and no train step in the program). One program, so the
  network compiles once (compile time is nearly the whole cost at test shapes). The forwards, loss
  and gradients compared are those at the initial state. `compiler_options`: XLA options for the
  compilation (None: as training compiles).
  """
  model = build_model(config.model)
  mesh = sharding.make_mesh()
  sharding.check_batch_divisible(config.train.batch_size, mesh)
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  total_steps = max(steps, 1)
  tx = train_state.make_optimizer(config, total_steps)
  schedule = train_state.learning_rate_schedule(config, total_steps)
  wanted = set(names)
  capture = lambda module, method: method == '__call__' and '/'.join(module.path) in wanted

  @functools.partial(jax.jit, in_shardings=(replicated, sharded), out_shardings=replicated)
  def inspect_and_step(state: train_state.TrainState, batch: dict):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    forward = {}
    for train in (False, True):
      outputs, captured = model.apply(variables, batch['image'], train=train,
                                      mutable=['intermediates', 'batch_stats'],
                                      capture_intermediates=capture)
      forward[train] = (outputs, captured['intermediates'])
    loss, terms, grads, _ = step.loss_and_gradients(state, batch, model=model,
                                                    loss_config=config.loss, seed=config.seed)
    new_state = step.train_step(state, batch, model=model, tx=tx, loss_config=config.loss,
                                schedule=schedule, seed=config.seed)[0] if steps else None
    return (forward, loss, terms, grads), new_state

  state = sharding.replicate(train_state.state_from_variables(dict(variables), tx), mesh)
  first = sharding.shard_batch(batches[0], mesh)
  compiled = inspect_and_step.lower(state, first).compile(compiler_options=compiler_options)
  results = None
  for batch in batches[:total_steps]:
    inspected, new_state = compiled(state, sharding.shard_batch(batch, mesh))
    if results is None:
      forward, loss, terms, grads = jax.device_get(inspected)
      results = SideResults(
          blocks={train: _captured_blocks(forward[train][1]) for train in (False, True)},
          outputs={train: forward[train][0] for train in (False, True)},
          loss={'loss': float(loss), **{k: float(v) for k, v in terms.items()}},
          gradients=grads, after=None)
    if steps:
      state = new_state
  if steps:
    results.after = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  return results


# --- the report -----------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, *, steps: int, variables: Mapping | None = None,
        float64: bool = False, compiler_options: Mapping | None = None) -> ParityReport:
  """Every comparison of the module docstring for `config` (model, loss, train, seed, data size).

  steps: K, the optimizer steps compared (0: forward, loss and gradients only).
  variables: {'params', 'batch_stats'} to start from (default: `init_variables(config)`).
  float64: both sides in float64 (`model.dtype='float64'`; needs `jax_enable_x64` set beforehand);
    otherwise float32 with a PyTorch float64 reference.
  compiler_options: XLA options for the JAX compilations (None: as training compiles; the tests
    pass `networks.FAST_COMPILE_OPTIONS`).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if float64:
    config.model.dtype = 'float64'
  # True float32 matmuls and convolutions on every backend (GPUs default to TF32, TPUs to bf16
  # passes): the report measures implementation differences, not a faster precision's rounding.
  config.model.matmul_precision = 'highest'
  build_model(config.model)  # its config errors (e.g. float64 without jax_enable_x64) before any work
  if variables is None:
    variables = init_variables(config)
  variables = _cast(dict(variables), np.float64 if float64 else np.float32)
  batches = noise_batches(config, max(steps, 1))
  if float64:
    batches = [dict(batch, image=batch['image'].astype(np.float64)) for batch in batches]
  torch_side = run_torch(config, variables, batches, steps,
                         torch.float64 if float64 else torch.float32)
  reference = None if float64 else run_torch(config, variables, batches, steps, torch.float64)
  names = list(torch_side.blocks[False])  # execution order
  jax_side = run_jax(config, variables, batches, steps, names, compiler_options)
  ref = lambda get: None if reference is None else get(reference)

  def forward(train: bool) -> list[Difference]:
    diffs = [compare(name, jax_side.blocks[train][name], torch_side.blocks[train][name],
                     ref(lambda r: r.blocks[train][name])) for name in names]
    for key in sorted(torch_side.outputs[train], reverse=True):  # side_logits, then logits
      diffs.append(compare(key, jax_side.outputs[train][key], torch_side.outputs[train][key],
                           ref(lambda r: r.outputs[train][key])))
    return diffs

  report = ParityReport(
      description=_describe(config, steps, float64), forward_eval=forward(False),
      forward_train=forward(True),
      loss=[compare(key, jax_side.loss[key], torch_side.loss[key], ref(lambda r: r.loss[key]))
            for key in torch_side.loss],
      gradients=compare_trees(jax_side.gradients, torch_side.gradients,
                              ref(lambda r: r.gradients), GRADIENT_FLOOR),
      steps=steps, batch_stats=[], params=[], params_overall=None, param_changes=[],
      num_batches_tracked=torch_side.num_batches_tracked)
  vector = lambda tree: np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                                        for leaf in jax.tree.leaves(tree)])
  report.gradients_overall = compare('all gradients', vector(jax_side.gradients),
                                     vector(torch_side.gradients),
                                     ref(lambda r: vector(r.gradients)))
  if steps:
    after = lambda side, collection: side.after.get(collection, {})
    report.batch_stats = compare_trees(after(jax_side, 'batch_stats'),
                                       after(torch_side, 'batch_stats'),
                                       ref(lambda r: after(r, 'batch_stats')), STATISTICS_FLOOR)
    report.params = compare_trees(jax_side.after['params'], torch_side.after['params'],
                                  ref(lambda r: r.after['params']))
    params = lambda side: vector(side.after['params'])
    report.params_overall = compare('all parameters', params(jax_side), params(torch_side),
                                    ref(params))
    change = lambda side: jax.tree.map(lambda p, p0: np.asarray(p, np.float64) - p0,
                                       side.after['params'], variables['params'])
    report.param_changes = compare_trees(change(jax_side), change(torch_side),
                                         ref(change))
  return report


def _size(m: ml_collections.ConfigDict) -> str:
  """The size fields `build_model` reads for the model's name."""
  sizes = {'cenet': ('cenet_features',), 'msunet': ('msunet_features',), 'hrnet': ('hrnet_size',),
           'segformer': ('segformer_size',)}
  return ', '.join(f'{key} {m[key]!r}' if isinstance(m[key], str) else f'{key} {tuple(m[key])}'
                   for key in sizes.get(m.name, ('features',)))


def _describe(config: ml_collections.ConfigDict, steps: int, float64: bool) -> str:
  m = config.model
  return (f'JAX {jax.__version__} / flax {flax.__version__} vs PyTorch {torch.__version__}: '
          f'{m.name} (variant {config.get("variant", "-")}), {_size(m)}, '
          f'conv_impl {m.conv_impl}, {"float64" if float64 else "float32"}, batch '
          f'{config.train.batch_size} x {config.data.image_size}x{config.data.image_size} '
          f'(seed {config.seed}), {steps} optimizer steps (lr {config.train.learning_rate:g}, '
          f'weight decay {config.train.weight_decay:g}), {jax.device_count()} JAX device(s) '
          f'({jax.default_backend()}, matmul precision {m.get("matmul_precision", "default")}).')


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags

  from ecm_jax import cli
  from ecm_jax.errors import UserError

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

  cli.run(main, UserError)
