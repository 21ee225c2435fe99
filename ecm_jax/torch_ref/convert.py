"""Flax variables <-> torch state_dict of the `torch_ref.models` mirror, both ways, bit-exact.

A torch key is the Flax path joined by dots (the mirror uses the Flax module names); values are
moved by axis permutations only (no arithmetic), so JAX -> torch -> JAX returns the same bits:

  torch module          torch tensor                        Flax leaf
  Conv2D (Conv2d)       weight (Cout, Cin, kh, kw)          params kernel (kh, kw, Cin, Cout)
  PatchUpsample         weight (Cin, Cout, s, s)            params kernel (s, s, Cin, Cout)
    (ConvTranspose2d)
  ConvTranspose2D       weight (Cin, Cout, k, k)            params kernel (k, k, Cin, Cout)
    (ConvTranspose2d)
  Dense (Linear)        weight (Cout, Cin)                  params kernel (Cin, Cout)
  Conv1D (Conv1d)       weight (Cout, Cin, k)               params kernel (k, Cin, Cout)
  PatchUpsample1D       weight (Cin, Cout, s)               params kernel (s, Cin, Cout)
    (ConvTranspose1d)
  any of these          bias (Cout,)                        params bias
  LayerNorm             weight, bias                        params scale, bias
  BatchNorm1d/2d        weight, bias                        params scale, bias
                        running_mean, running_var           batch_stats mean, var
                        num_batches_tracked                 (none: Flax does not count; set to
                                                            the train step when converting)
  other modules         own parameters, e.g. gamma (1,)     params <same name>, unchanged

BatchNorm momentum is a constructor constant on both sides, not a variable: the mirror builds
`BatchNorm*d(momentum=1 - config.model.bn_momentum)` (Flax momentum m = torch momentum 1 - m).
"""

from collections.abc import Mapping

import flax
import numpy as np
import torch
from torch import nn

# Per torch convolution / linear class: the axes taking the Flax kernel to the torch weight layout.
_CONV_LAYOUTS = (
    (nn.Conv2d, (3, 2, 0, 1)),
    (nn.ConvTranspose2d, (2, 3, 0, 1)),
    (nn.Conv1d, (2, 1, 0)),
    (nn.ConvTranspose1d, (1, 2, 0)),
    (nn.Linear, (1, 0)),
)
_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def _module_leaves(module: nn.Module) -> dict[str, tuple[str, str, tuple[int, ...] | None]]:
  """The module's own tensors (not its children's): torch name -> (collection, Flax name, axes)."""
  for cls, axes in _CONV_LAYOUTS:
    if isinstance(module, cls):
      leaves = {'weight': ('params', 'kernel', axes)}
      if module.bias is not None:
        leaves['bias'] = ('params', 'bias', None)
      return leaves
  if isinstance(module, nn.modules.batchnorm._BatchNorm):
    return {name: (collection, leaf, None) for name, (collection, leaf) in _BN_LEAVES.items()}
  if isinstance(module, nn.LayerNorm):
    return {'weight': ('params', 'scale', None), 'bias': ('params', 'bias', None)}
  return {name: ('params', name, None) for name, _ in module.named_parameters(recurse=False)}


def leaf_table(model: nn.Module) -> dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]:
  """Every converted torch key of `model` -> (Flax path incl. the collection, axes to torch).

  `num_batches_tracked` buffers are not in the table (no Flax counterpart).
  """
  table = {}
  for name, module in model.named_modules():
    prefix = tuple(name.split('.')) if name else ()
    for local, (collection, leaf, axes) in _module_leaves(module).items():
      table['.'.join(prefix + (local,))] = ((collection, *prefix, leaf), axes)
  return table


def _to_torch(value, axes) -> torch.Tensor:
  array = np.asarray(value)
  if axes is not None:
    array = array.transpose(axes)
  return torch.from_numpy(np.array(array, copy=True, order='C'))


def _to_jax(tensor: torch.Tensor, axes) -> np.ndarray:
  array = tensor.detach().cpu().numpy()
  if axes is not None:
    array = array.transpose(np.argsort(axes))
  return np.ascontiguousarray(array)


def variables_to_state_dict(model: nn.Module, variables: Mapping,
                            num_batches_tracked: int = 0) -> dict[str, torch.Tensor]:
  """Flax variables ({'params', 'batch_stats'}) of `build_model(c)` -> state_dict of
  `build_torch_model(c)` (`model`), every BatchNorm's `num_batches_tracked` set to the given count
  (e.g. the train step). Raises ValueError when a leaf on either side has no counterpart."""
  flat = flax.traverse_util.flatten_dict(
      {k: flax.core.unfreeze(variables[k]) for k in ('params', 'batch_stats') if k in variables})
  table = leaf_table(model)
  state = {}
  for key in model.state_dict():  # the model's own order
    if key.endswith('.num_batches_tracked'):
      state[key] = torch.tensor(num_batches_tracked, dtype=torch.long)
      continue
    path, axes = table[key]
    if path not in flat:
      raise ValueError(f'torch {key} needs Flax variable {"/".join(path)}, which is missing')
    state[key] = _to_torch(flat.pop(path), axes)
  if flat:
    raise ValueError('Flax variables with no torch counterpart: '
                     + ', '.join('/'.join(path) for path in flat))
  return state


def load_variables(model: nn.Module, variables: Mapping, num_batches_tracked: int = 0) -> nn.Module:
  """Copies Flax variables into `model` (strict: every tensor of the model is set); returns it."""
  model.load_state_dict(variables_to_state_dict(model, variables, num_batches_tracked), strict=True)
  return model


def state_dict_to_variables(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
  """state_dict of `build_torch_model(c)` (`model`) -> Flax variables {'params', 'batch_stats'}
  of `build_model(c)` (without batch_stats when the model has no BatchNorm), as numpy arrays (JAX
  takes them as they are; numpy keeps float64 whatever jax_enable_x64 says). The inverse of
  `variables_to_state_dict`; `num_batches_tracked` is dropped."""
  table = leaf_table(model)
  unknown = [key for key in state_dict
             if key not in table and not key.endswith('.num_batches_tracked')]
  if unknown:
    raise ValueError(f'state_dict keys the model does not have: {", ".join(unknown)}')
  flat = {}
  for key, (path, axes) in table.items():
    if key not in state_dict:
      raise ValueError(f'state_dict lacks {key} (Flax {"/".join(path)})')
    flat[path] = _to_jax(state_dict[key], axes)
  return flax.traverse_util.unflatten_dict(flat)


def parameters_to_jax(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict:
  """{torch parameter name: tensor} (e.g. each parameter's `.grad`) -> a Flax params tree of the
  same structure as `variables['params']`, in the Flax layouts."""
  table = leaf_table(model)
  flat = {}
  for key, tensor in tensors.items():
    path, axes = table[key]
    if path[0] != 'params':
      raise ValueError(f'{key} is not a parameter (Flax collection {path[0]})')
    flat[path[1:]] = _to_jax(tensor, axes)
  return flax.traverse_util.unflatten_dict(flat)
