"""EC fold: trained Enhanced-Convolution blocks to one 3x3 conv with bias each, for deployment.

In eval mode each EC branch is an affine map BN_b(conv_b(x)) = conv_b(x) * g_b + (beta_b - mu_b * g_b)
with g_b = scale_b / sqrt(var_b + eps). Convolution is linear in the kernel, and with 'SAME' padding
a 1x3 (3x1) kernel is a 3x3 kernel that is zero outside its centre row (column). So the three
branches sum to one 3x3 conv with kernel sum_b pad(k_b) * g_b and bias sum_b (beta_b - mu_b * g_b)
(ACNet, Ding et al. 2019). Exact up to float rounding.
"""

from collections.abc import Mapping

import flax
import jax.numpy as jnp
import ml_collections

from ecm_jax.models.layers import EC_BRANCHES


def fold_ec_block(params: Mapping, batch_stats: Mapping, epsilon: float) -> dict:
  """One EC block's params (`conv3x3`, `bn3x3`, `conv1x3`, ...) and batch_stats (`bn3x3`, ...)
  to the params of its folded form: {'conv_folded': {'kernel' (3,3,Cin,Cout), 'bias' (Cout,)}}."""
  kernel, bias = 0.0, 0.0
  for branch, (kh, kw) in EC_BRANCHES.items():
    bn, stats = params[f'bn{branch}'], batch_stats[f'bn{branch}']
    gain = bn['scale'] / jnp.sqrt(stats['var'] + epsilon)
    branch_kernel = params[f'conv{branch}']['kernel'] * gain
    # Centre the 1x3 / 3x1 kernel in the 3x3 window ('SAME' padding keeps the alignment).
    top, left = (3 - kh) // 2, (3 - kw) // 2
    kernel = kernel + jnp.pad(branch_kernel, ((top, 3 - kh - top), (left, 3 - kw - left), (0, 0),
                                              (0, 0)))
    bias = bias + bn['bias'] - stats['mean'] * gain
  return {'conv_folded': {'kernel': kernel, 'bias': bias}}


def has_ec_blocks(model_config: ml_collections.ConfigDict) -> bool:
  """Whether `build_model(model_config)` has EC blocks (`fold_ec` folds them)."""
  return model_config.name == 'ec_cam_unet' and bool(model_config.ec)


def fold_ec(model_config: ml_collections.ConfigDict,
            variables: Mapping) -> tuple[ml_collections.ConfigDict, dict]:
  """(model config, trained variables) of an EC model -> (deploy config, deploy variables).

  The deploy config is a copy with `ec_folded=True`; `build_model` of it gives an encoder with one
  3x3 conv with bias per EC block, and `apply(deploy_variables, x, train=False)` equals the
  original eval-mode output. Everything outside the EC blocks is passed through unchanged; the EC
  blocks' batch_stats are dropped (folded into the kernels).
  """
  if not has_ec_blocks(model_config):
    raise ValueError(f'fold_ec needs model.name=ec_cam_unet with ec=True, got name='
                     f'{model_config.name!r}, ec={model_config.ec}')
  if model_config.ec_folded:
    raise ValueError('fold_ec: model.ec_folded is already True (the variables are folded)')
  params = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables['params']))
  batch_stats = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables['batch_stats']))
  # The `conv3x3` child exists only in EC blocks (`layers.EnhancedConv`).
  blocks = {path[:-2] for path in params if path[-2:] == ('conv3x3', 'kernel')}
  if not blocks:
    raise ValueError('fold_ec: variables["params"] has no EC blocks (no conv3x3 subtree)')
  deploy_params, deploy_stats = dict(params), dict(batch_stats)
  for block in blocks:
    inside = lambda tree: {p[len(block):]: v for p, v in tree.items() if p[:len(block)] == block}
    block_params = flax.traverse_util.unflatten_dict(inside(params))
    block_stats = flax.traverse_util.unflatten_dict(inside(batch_stats))
    for tree in (deploy_params, deploy_stats):
      for path in [p for p in tree if p[:len(block)] == block]:
        del tree[path]
    folded = fold_ec_block(block_params, block_stats, model_config.bn_epsilon)
    deploy_params.update({block + path: value for path, value in
                          flax.traverse_util.flatten_dict(folded).items()})
  deploy_variables = dict(variables)
  deploy_variables['params'] = flax.traverse_util.unflatten_dict(deploy_params)
  deploy_variables['batch_stats'] = flax.traverse_util.unflatten_dict(deploy_stats)
  deploy_config = ml_collections.ConfigDict(model_config.to_dict())
  deploy_config.ec_folded = True
  return deploy_config, deploy_variables
