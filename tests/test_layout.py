"""The package layering, and the CPU-only code fenced off from GPU/TPU processes.

Layers (each imports only from itself and the layers before it):
  base      ecm_jax.{errors, files, tables, config, cluster, runtime, cli}
  models    ecm_jax.models          data    ecm_jax.data
  metrics   ecm_jax.evaluate.{metrics, plots}
  train     ecm_jax.train
  evaluate  ecm_jax.evaluate.{inference, evaluation, report}
  entry points (train.py, eval.py, python -m ...) on top; ecm_jax.cpu apart (loaded only by
  ecm_jax.models.ops and ecm_jax.runtime, and only on the CPU); ecm_jax.torch_ref optional.
"""

import ast
import subprocess
import sys

import pytest

from helpers import REPO

BASE = {'ecm_jax', 'ecm_jax.errors', 'ecm_jax.files', 'ecm_jax.tables', 'ecm_jax.config',
        'ecm_jax.cluster', 'ecm_jax.runtime', 'ecm_jax.cli'}
METRICS = {'ecm_jax.evaluate.metrics', 'ecm_jax.evaluate.plots'}


def _allowed(module: str) -> set[str] | None:
  """Project packages/modules `module` may import (prefixes), None for no rule."""
  if module.startswith('ecm_jax.models'):
    return BASE | {'ecm_jax.models'}
  if module.startswith('ecm_jax.data'):
    return BASE | {'ecm_jax.data'}
  if module in METRICS:
    return BASE | METRICS
  if module.startswith('ecm_jax.train'):
    return BASE | {'ecm_jax.models', 'ecm_jax.data', 'ecm_jax.train'} | METRICS
  if module.startswith('ecm_jax.evaluate'):
    return BASE | {'ecm_jax.models', 'ecm_jax.data', 'ecm_jax.train', 'ecm_jax.evaluate'}
  if module.startswith('ecm_jax.cpu'):
    return BASE | {'ecm_jax.cpu'}
  if module in BASE:
    return BASE
  return None


def _imports(path):
  """(imported module, line, inside a function) for every ecm_jax import in `path`."""
  tree = ast.parse(path.read_text())
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith('ecm_jax'):
        for alias in child.names:
          name = f'{child.module}.{alias.name}'
          found.append((name, child.lineno, in_function))
      elif isinstance(child, ast.Import):
        found.extend((a.name, child.lineno, in_function) for a in child.names
                     if a.name.startswith('ecm_jax'))
      visit(child, nested)

  visit(tree, False)
  return found


def _inside(name: str, prefixes: set[str]) -> bool:
  return any(name == p or name.startswith(p + '.') for p in prefixes)


def test_each_layer_imports_only_the_layers_below_it():
  bad = []
  for path in sorted((REPO / 'ecm_jax').rglob('*.py')):
    module = '.'.join(path.relative_to(REPO).with_suffix('').parts).removesuffix('.__init__')
    allowed = _allowed(module)
    if allowed is None:  # torch_ref: the optional reference side may use anything
      continue
    for name, line, in_function in _imports(path):
      if _inside(name, {'ecm_jax.cpu'}) and not module.startswith('ecm_jax.cpu'):
        if not (in_function and module in ('ecm_jax.models.ops', 'ecm_jax.runtime')):
          bad.append(f'{module}:{line} imports {name} (CPU code: only lazily, from ops/runtime)')
      elif not _inside(name, allowed | {'ecm_jax.cpu'}):
        bad.append(f'{module}:{line} imports {name}')
  assert not bad, '\n'.join(bad)


def test_nothing_outside_torch_ref_imports_it():
  for path in list((REPO / 'ecm_jax').rglob('*.py')) + [REPO / 'train.py', REPO / 'eval.py']:
    if 'torch_ref' in path.parts:
      continue
    names = [name for name, *_ in _imports(path)]
    assert not [n for n in names if n.startswith('ecm_jax.torch_ref')], path
    assert 'import torch' not in path.read_text(), path


def test_training_and_evaluation_load_without_pytorch_where_it_is_installed():
  """tensorboardX would import PyTorch (seconds at each start of train.py and eval.py)."""
  pytest.importorskip('torch', reason='only where PyTorch is installed')
  result = subprocess.run([sys.executable, '-c', 'import sys, ecm_jax.train.loop, '
                           'ecm_jax.evaluate.evaluation; print("torch" in sys.modules)'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'False'


_GPU_LIKE = '''
import os, sys
os.environ['JAX_PLATFORMS'] = 'cpu'
from ecm_jax import runtime
runtime.runs_on_cpu = lambda: False  # as on a GPU/TPU host
runtime.start(host_memory='auto')
import jax, jax.numpy as jnp
from configs import demo
from ecm_jax.models import networks
config = demo.get_config().model
config.conv_impl = 'xla'  # what 'auto' resolves to on a GPU/TPU (tests/test_ops.py)
model = networks.build_model(config)
variables = networks.init_variables(model, 0)
grads = jax.grad(lambda p: model.apply({**variables, 'params': p}, jnp.ones((2, 32, 32, 1)),
                 train=True, mutable=['batch_stats'])[0]['logits'].sum())(variables['params'])
print(sorted(m for m in sys.modules if m.startswith('ecm_jax.cpu')))
'''


def test_a_gpu_process_never_imports_the_cpu_package():
  result = subprocess.run([sys.executable, '-c', _GPU_LIKE], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == '[]'


def test_the_cpu_backend_resolves_auto_to_the_cpu_kernels():
  from configs import demo
  from ecm_jax.models import networks
  model = networks.build_model(demo.get_config().model)
  assert model.settings.conv_impl == 'gemm'  # resolved at build, not per lowering
