"""Inference benchmark: eval forward with and without the EC fold, interleaved; prints a table.

  python -m benchmarks.inference --config configs/kits.py:ec_cam_unet --size 128 \
      --batch 8 --slices 32 --repeats 3 [--features 64,128,256,512,1024] [--conv_impl auto] \
      [--host_memory auto] [--csv inference.csv]
  python -m benchmarks.inference --workdir runs/kits [--checkpoint best] ...   # a trained run

(from the repository root; the variant after the colon is a row of configs/default.VARIANTS,
and `--config.key=value` overrides fields of the config file).

The eval-mode main-head logits of the model, jitted for one batch shape on one device (as
`ecm_jax.inference.Predictor` runs it), in two forms: 'unfolded' (the trained graph: three
conv+BN branches per EC block) and 'folded' (`ecm_jax.fold.fold_ec`: one 3x3 conv with bias per EC
block), when the model has EC blocks. Timed interleaved, median of --repeats rounds after a warm-up:
  slices/s        --batch slices per call, already on the device;
  volume latency  a volume of --slices slices at the config size, host numpy in -> host numpy out,
                  in batches of --batch (the last one padded), as `Predictor.logits` does.
Weights: random (`random_variables`: numpy draws, random BatchNorm statistics so that the fold has
scales and shifts to fold), or the checkpoint of a training run with --workdir (then its config is
used and --config, --size, --features, --conv_impl are ignored). The sanity check is
max |folded - unfolded| over the volume's logits: float32 rounding, grown through the network
(measured: ~1e-6 of max |logits| at widths 4..16, ~2e-4 at 64..1024 with CoA attention).
"""

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.common import machine_summary, median, random_variables, time_interleaved, write_csv
from ecm_jax import tables
from ecm_jax.evaluate.inference import batched_logits
from ecm_jax.models.fold import fold_ec, has_ec_blocks
from ecm_jax.models.networks import build_model

HEADER = ('form', 'compile s', 'GFLOP / slice', 'slices/s (batch)', 'volume latency s',
          'volume slices/s', 'speed-up (volume)')
ALIGN = 'lrrrrrr'


def model_forms(model_config: ml_collections.ConfigDict, variables: dict) -> dict:
  """{'unfolded': (model, variables)[, 'folded': (deploy model, deploy variables)]}."""
  forms = {'unfolded': (build_model(model_config), variables)}
  if has_ec_blocks(model_config):
    deploy_config, deploy_variables = fold_ec(model_config, variables)
    forms['folded'] = (build_model(deploy_config), deploy_variables)
  return forms


def compile_forward(model, variables: dict, batch_shape: tuple) -> tuple:
  """(compiled eval forward `(variables, x) -> logits`, lower + compile seconds, FLOPs per call)."""
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])
  start = time.perf_counter()
  compiled = forward.lower(variables, jax.ShapeDtypeStruct(batch_shape, jnp.float32)).compile()
  return compiled, time.perf_counter() - start, compiled.cost_analysis()['flops']


def benchmark(model_config: ml_collections.ConfigDict, variables: dict, *, size: int, batch: int,
              slices: int, repeats: int) -> tuple[list[dict], float, float]:
  """(one CSV row per form, max |folded - unfolded| logits (NaN without EC), max |logits|)."""
  rng = np.random.default_rng(0)
  volume = rng.standard_normal((slices, size, size, model_config.in_channels), np.float32)
  device_batch = jnp.asarray(volume[:batch])
  thunks, compiled, outputs = {}, {}, {}  # outputs: each form's latest volume logits

  def run_volume(form, forward, form_variables):
    outputs[form] = batched_logits(forward, form_variables, volume, batch)
    return outputs[form]

  for form, (model, form_variables) in model_forms(model_config, variables).items():
    form_variables = jax.device_put(form_variables)
    forward, seconds, flops = compile_forward(model, form_variables, device_batch.shape)
    compiled[form] = (seconds, flops)
    thunks[form, 'batch'] = functools.partial(forward, form_variables, device_batch)
    thunks[form, 'volume'] = functools.partial(run_volume, form, forward, form_variables)
  times = {key: median(t) for key, t in time_interleaved(thunks, repeats).items()}
  rows = []
  for form, (seconds, flops) in compiled.items():
    rows.append({'form': form, 'model': model_config.name, 'size': size, 'batch': batch,
                 'slices': slices, 'compile_s': seconds, 'gflop_per_slice': flops / batch / 1e9,
                 'slices_per_s': batch / times[form, 'batch'],
                 'volume_latency_s': times[form, 'volume'],
                 'volume_slices_per_s': slices / times[form, 'volume'],
                 'volume_speedup': times['unfolded', 'volume'] / times[form, 'volume']})
  scale = float(np.abs(outputs['unfolded']).max())
  difference = (float(np.abs(outputs['folded'] - outputs['unfolded']).max())
                if 'folded' in outputs else float('nan'))
  return rows, difference, scale


def run(config: ml_collections.ConfigDict, variables: dict | None = None, *,
        source: str = 'random (numpy draws)', batch: int = 8, slices: int = 32, repeats: int = 3,
        host_memory: str = 'default', csv: str | None = None,
        command: str | None = None) -> tuple[list[dict], float, float]:
  """Runs the benchmark of `config` with `variables` (None: `random_variables`; `source` says
  where they come from) and prints the table (after the command line `command`, if given);
  returns `benchmark`'s result (its rows written to `csv`, if given). `host_memory`: this
  process's allocator in effect, for the report."""
  if variables is None:
    variables = random_variables(config.model)
  model_config, size = config.model, config.data.image_size
  rows, difference, scale = benchmark(model_config, variables, size=size, batch=batch,
                                      slices=slices, repeats=repeats)
  print(f'\n# Inference (eval forward, main-head logits): {config.get("variant", "-")} '
        f'({model_config.name}), '
        f'{size}x{size}, features {"-".join(map(str, model_config.features))}, conv_impl '
        f'{model_config.conv_impl}, batch {batch}, volume {slices} slices; weights: '
        f'{source}; median of {repeats} interleaved rounds after 1 warm-up; host memory '
        f'{host_memory}')
  print(machine_summary())
  if command is not None:
    print(command + '\n')
  print(tables.markdown_table(HEADER, [
      (r['form'], f"{r['compile_s']:.1f}", f"{r['gflop_per_slice']:.2f}",
       f"{r['slices_per_s']:.2f}", f"{r['volume_latency_s']:.2f}",
       f"{r['volume_slices_per_s']:.2f}", f"{r['volume_speedup']:.2f}x") for r in rows], ALIGN))
  print(f'\nmax |folded - unfolded| logits over the volume: {difference:.3g} '
        f'(max |logits| {scale:.3g})')
  if csv:
    write_csv(csv, rows)
  return rows, difference, scale


if __name__ == '__main__':
  from absl import flags

  from benchmarks.common import command_line, define_config_flags
  from ecm_jax import cli, runtime
  from ecm_jax.errors import UserError
  from ecm_jax.evaluate.inference import Predictor

  _CONFIG = define_config_flags(config='configs/kits.py', size=128)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'a training run: its config and checkpoint')
  _CHECKPOINT = flags.DEFINE_string('checkpoint', 'best',
                                    'with --workdir: best | latest | a step')
  _BATCH = flags.DEFINE_integer('batch', 8, 'slices per forward call')
  _SLICES = flags.DEFINE_integer('slices', 32, 'slices of the timed volume')
  _REPEATS = flags.DEFINE_integer('repeats', 3, 'timed rounds (median)')
  _CSV = flags.DEFINE_string('csv', None, 'also write the rows to this CSV file')

  def main(argv):
    del argv
    allocator = runtime.host_memory_in_effect()
    if _WORKDIR.value:
      predictor = Predictor(_WORKDIR.value, _CHECKPOINT.value, fold=False)
      config, variables = predictor.config, predictor.variables
      source = f'{_WORKDIR.value} step {predictor.step}'
    else:
      config, variables, source = _CONFIG.get(), None, 'random (numpy draws)'
    run(config, variables, source=source, batch=_BATCH.value, slices=_SLICES.value,
        repeats=_REPEATS.value, host_memory=allocator, csv=_CSV.value,
        command=command_line('inference'))

  cli.run(main, UserError, compilation_cache=False)  # compile times are measured
