"""Memory of the train step by compute dtype and rematerialisation, nothing executed.

  python -m benchmarks.memory --config configs/kits.py --variant unet,ec_cam_unet --size 512 \
      --batch 4 --dtype float32,bfloat16 --remat none,blocks,levels [--conv_impl xla] \
      [--nocompile] [--csv memory.csv]

(from the repository root; `--config.key=value` overrides fields of the config file). For each
variant x dtype x remat, two figures, from abstract inputs (`jax.eval_shape` of the train state,
`ShapeDtypeStruct` batch: no initialiser, no data):
  residuals   the bytes the backward pass reads from the forward pass: the leaves of `jax.vjp`'s
              backward function of the train loss (activations, BatchNorm inputs, masks; the
              parameters themselves included), from the traced program alone, so the same on every
              backend. Tracing only: seconds even at 512x512.
  step        XLA's buffer assignment of the compiled product step (`ecm_jax.train.step.train_step`
              with the run's optimizer, state donated) on one device: arguments + outputs - donated
              aliases + temporaries (`compiled.memory_analysis()`), i.e. the step's peak without
              allocator overheads, as compiled for THIS process's backend, with
              `networks.compiler_options` (remat on the CPU needs one). XLA fuses some residuals
              away, so the step can hold less than arguments + residuals. On the CPU, XLA
              computes bfloat16 convolutions and matmuls in float32 (with float32 copies of their
              operands), so CPU bfloat16 step figures are not what a GPU/TPU holds: there read the
              residuals, or run benchmarks/device_check.sh.
--nocompile prints the residuals alone. The default --conv_impl is 'xla' (the GPU/TPU kernels).
"""

from collections.abc import Sequence
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.common import TOTAL_STEPS, benchmark_config, machine_summary, write_csv
from ecm_jax import tables
from ecm_jax.models.networks import build_model, compiler_options, variable_shapes
from ecm_jax.train import losses, step, train_state

GIB = 2**30
HEADER = ('variant', 'dtype', 'remat', 'residuals GiB', 'vs float32', 'step GiB', 'temp GiB',
          'vs float32 ', 'compile s')
ALIGN = 'lllrrrrrr'


def abstract_step_inputs(config: ml_collections.ConfigDict):
  """(state, batch) as `jax.ShapeDtypeStruct` trees for `config`'s train step (global batch)."""
  tx = train_state.make_optimizer(config, TOTAL_STEPS)
  state = jax.eval_shape(lambda v: train_state.state_from_variables(v, tx),
                         variable_shapes(build_model(config.model)))
  size, batch = config.data.image_size, config.train.batch_size
  images = jax.ShapeDtypeStruct((batch, size, size, config.model.in_channels), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch, size, size), jnp.int32)
  return state, {'image': images, 'label': labels}


def residual_bytes(config: ml_collections.ConfigDict) -> int:
  """Bytes of the residuals of `config`'s train loss: the leaves of the `jax.vjp` backward
  function with respect to the parameters (traced abstractly: nothing runs)."""
  state, batch = abstract_step_inputs(config)
  model = build_model(config.model)

  def backward_function(params, batch_stats, image, label):
    def loss_fn(p):
      outputs, _ = model.apply({'params': p, 'batch_stats': batch_stats}, image, train=True,
                               mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
      return losses.segmentation_loss(outputs, label, config.loss)[0]
    return jax.vjp(loss_fn, params)[1]

  tree = jax.eval_shape(backward_function, state.params, state.batch_stats, batch['image'],
                        batch['label'])
  return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def compile_abstract_step(config: ml_collections.ConfigDict) -> tuple[jax.stages.Compiled, float]:
  """(the train step of `config` compiled for abstract inputs on one device, compile seconds)."""
  fn = functools.partial(step.train_step, model=build_model(config.model),
                         tx=train_state.make_optimizer(config, TOTAL_STEPS),
                         loss_config=config.loss,
                         schedule=train_state.learning_rate_schedule(config, TOTAL_STEPS),
                         seed=config.seed)
  state, batch = abstract_step_inputs(config)
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, batch).compile(
      compiler_options=compiler_options(config.model))
  return compiled, time.perf_counter() - start


def step_bytes(compiled: jax.stages.Compiled) -> tuple[int, int]:
  """(arguments + outputs - aliases + temporaries, temporaries) of `compiled`, bytes."""
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
  return total, m.temp_size_in_bytes


def measure(config: ml_collections.ConfigDict, compile_step: bool = True) -> dict:
  """One row: residual bytes and, with `compile_step`, the compiled step's buffers and compile
  time (NaN without)."""
  row = {'variant': config.variant, 'dtype': config.model.dtype, 'remat': config.model.remat,
         'size': config.data.image_size, 'batch': config.train.batch_size,
         'conv_impl': config.model.conv_impl, 'platform': jax.default_backend(),
         'residual_bytes': residual_bytes(config), 'step_bytes': float('nan'),
         'temp_bytes': float('nan'), 'compile_s': float('nan')}
  if compile_step:
    compiled, row['compile_s'] = compile_abstract_step(config)
    row['step_bytes'], row['temp_bytes'] = step_bytes(compiled)
  return row


def _cell(value: float, fmt: str) -> str:
  return '-' if np.isnan(value) else format(value, fmt)


def run(config: ml_collections.ConfigDict, *, variants: Sequence[str], dtypes: Sequence[str],
        remats: Sequence[str], size: int, batch: int, conv_impl: str | None = 'xla',
        compile_step: bool = True, csv: str | None = None,
        command: str | None = None) -> list[dict]:
  """Measures every variant x dtype x remat, prints a markdown table; returns the rows. The
  'vs float32' columns divide by the variant's float32 row of the same remat (NaN without one)."""
  rows = []
  for variant in variants:
    for dtype in dtypes:
      for remat in remats:
        c = benchmark_config(config, variant=variant, size=size, batch=batch, conv_impl=conv_impl)
        c.model.dtype, c.model.remat = dtype, remat
        rows.append(measure(c, compile_step))
        r = rows[-1]
        print(f"{variant} {dtype} remat={remat}: residuals {r['residual_bytes'] / GIB:.2f} GiB, "
              f"step {r['step_bytes'] / GIB:.2f} GiB, compiled in {r['compile_s']:.0f} s",
              flush=True)
  for r in rows:
    base = next((b for b in rows if (b['variant'], b['remat'], b['dtype'])
                 == (r['variant'], r['remat'], 'float32')), None)
    r['residual_ratio'] = r['residual_bytes'] / base['residual_bytes'] if base else float('nan')
    r['step_ratio'] = r['step_bytes'] / base['step_bytes'] if base else float('nan')
  print(f'\n# Train-step memory: {size}x{size}, batch {batch}, conv_impl '
        f'{rows[0]["conv_impl"]}; residuals from the traced program, step buffers from XLA\'s '
        f'memory analysis ({jax.default_backend()} compiler)')
  print(machine_summary())
  if command:
    print(command + '\n')
  print(tables.markdown_table(HEADER, [
      (r['variant'], r['dtype'], r['remat'], f"{r['residual_bytes'] / GIB:.2f}",
       _cell(r['residual_ratio'], '.2f'), _cell(r['step_bytes'] / GIB, '.2f'),
       _cell(r['temp_bytes'] / GIB, '.2f'), _cell(r['step_ratio'], '.2f'),
       _cell(r['compile_s'], '.0f')) for r in rows], ALIGN))
  if csv:
    write_csv(csv, rows)
  return rows


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags

  from benchmarks.common import command_line
  from ecm_jax import cli
  from ecm_jax.errors import UserError
  from ecm_jax.models import ops

  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/kits.py', 'config file[:variant]')
  _VARIANT = flags.DEFINE_list('variant', ['unet', 'ec_cam_unet'], 'rows of VARIANTS')
  _DTYPE = flags.DEFINE_list('dtype', ['float32', 'bfloat16'], 'model.dtype values')
  _REMAT = flags.DEFINE_list('remat', ['none', 'blocks', 'levels'], 'model.remat values')
  _SIZE = flags.DEFINE_integer('size', 512, 'image size')
  _BATCH = flags.DEFINE_integer('batch', 4, 'global batch')
  _CONV = flags.DEFINE_enum('conv_impl', 'xla', ops.IMPLS, 'model.conv_impl')
  _COMPILE = flags.DEFINE_bool('compile', True, 'also compile each step (--nocompile: residuals '
                               'only, seconds)')
  _CSV = flags.DEFINE_string('csv', None, 'also write the rows to this CSV file')

  def main(argv):
    del argv
    run(_CONFIG.value, variants=_VARIANT.value, dtypes=_DTYPE.value, remats=_REMAT.value,
        size=_SIZE.value, batch=_BATCH.value, conv_impl=_CONV.value, compile_step=_COMPILE.value,
        csv=_CSV.value, command=command_line('memory'))

  cli.run(main, UserError)
