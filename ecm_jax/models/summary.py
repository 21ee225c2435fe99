"""The models summary table: per VARIANTS row, parameters, forward GFLOPs per image, outputs.

  python -m ecm_jax.models.summary --config configs/kits.py [--variants unet,ec_cam_unet]

FLOPs are XLA's cost analysis of the lowered eval forward (a multiply-add = 2 FLOPs); nothing is
compiled or allocated, so the paper's 512x512 takes about a minute on 2 CPU cores.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from ecm_jax import tables
from ecm_jax.models.networks import build_model, variable_shapes


def summary_table(model_configs: Mapping[str, ml_collections.ConfigDict], image_size: int) -> str:
  """Markdown table: per model, parameter count, forward GFLOPs per image and the output shapes.

  FLOPs: XLA's cost analysis of the lowered (not compiled: seconds, not minutes, at 512x512) eval
  forward at batch 1, image_size x image_size, with `lax.conv` kernels (`conv_impl='xla'`): the
  network's arithmetic, whatever kernels run it. Nothing is allocated: shapes are abstract.
  """
  rows = []
  for variant, model_config in model_configs.items():
    model = build_model(ml_collections.ConfigDict(dict(model_config.to_dict(), conv_impl='xla')))
    x = jax.ShapeDtypeStruct((1, image_size, image_size, model_config.in_channels), jnp.float32)
    variables = variable_shapes(model)
    params = sum(leaf.size for leaf in jax.tree.leaves(variables['params']))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    flops = forward.lower(variables, x).cost_analysis()['flops']
    outputs = jax.eval_shape(forward, variables, x)
    side = outputs['side_logits'].shape if 'side_logits' in outputs else '-'
    rows.append((variant, model_config.name, f'{params:,}', f'{flops / 1e9:.2f}',
                 outputs['logits'].shape, side))
  return tables.markdown_table(
      ('variant', 'model', 'parameters', 'GFLOPs / image', 'logits', 'side_logits'), rows, 'llrrll')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  from configs.default import VARIANTS, with_variant
  from ecm_jax import cli

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/kits.py')
  _VARIANTS = flags.DEFINE_list('variants', None, 'VARIANTS rows to summarise (default: all)')
  flags.mark_flag_as_required('config')

  def main(argv):
    del argv
    config = _CONFIG.value
    names = _VARIANTS.value or list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
      raise app.UsageError(f'--variants: unknown {unknown}; choose from {", ".join(VARIANTS)}')
    model_configs = {name: with_variant(config.model, name) for name in names}
    size = config.data.image_size
    print(f'Input (1, {size}, {size}, {config.model.in_channels}), '
          f'features {tuple(config.model.features)}, dtype {config.model.dtype}.\n')
    print(summary_table(model_configs, size))

  cli.run(main)
